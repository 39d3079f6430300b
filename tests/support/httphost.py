"""A scriptable HTTP(S) host for tests of the ACME validator: it can misbehave on purpose.

``HttpHost(address, port, handler)`` serves in a background thread; ``handler(request)``
returns a :class:`Reply` (status, body, headers, a delay before answering, a Content-Length
that lies or is absent, a body streamed without end). Every request is recorded in
:attr:`HttpHost.requests`. With ``tls=`` (an ``ssl.SSLContext``) it speaks HTTPS.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from support.lifecycle import Running

__all__ = ["HttpHost", "Reply", "Request"]


@dataclass(frozen=True, slots=True)
class Request:
    """What a client sent: the local address it reached, method, target, headers."""

    local: str
    method: str
    target: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    """How to answer."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds before anything is sent
    content_length: bool = True  # False: close-delimited body
    endless: bool = False  # stream b"x" until the client goes away


Handler = Callable[[Request], Reply]


class HttpHost(Running):
    """A threaded test HTTP server on ``address``:``port``."""

    __test__ = False

    def __init__(
        self,
        address: str,
        port: int,
        handler: Handler,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.port = port
        self.handler = handler
        self.requests: list[Request] = []
        self._tls = tls
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> HttpHost:
        """Bind and serve in the background."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.address, self.port))
        sock.listen(32)
        sock.settimeout(0.1)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        thread = threading.Thread(target=self._accept, name="test-http", daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def stop(self) -> None:
        """Stop and join."""
        self._stop.set()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)
        if self._sock is not None:
            self._sock.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._session, args=(conn,), daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _session(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError), conn:
            conn.settimeout(5)
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, target, _ = [*lines[0].split(" "), "", "", ""][:3]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            request = Request(self.address, method, target, headers)
            with self._lock:
                self.requests.append(request)
            reply = self.handler(request)
            if reply.delay and self._stop.wait(reply.delay):
                return
            out = [f"HTTP/1.1 {reply.status} X", "Connection: close"]
            out += [f"{name}: {value}" for name, value in reply.headers]
            if reply.content_length and not reply.endless:
                out.append(f"Content-Length: {len(reply.body)}")
            conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + reply.body)
            block = b"x" * 65536
            while reply.endless and not self._stop.is_set():
                conn.sendall(block)
