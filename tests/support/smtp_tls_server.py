"""A small threaded SMTP server with STARTTLS for tests of the outbound side.

It listens on any loopback address (``127.0.0.2``, ``::1``…), serves a given certificate chain,
can omit STARTTLS or hang after accepting, and records every session and message, including
whether the message arrived inside TLS - so a test can prove that nothing was sent in the clear.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["ReceivedMessage", "SmtpSession", "StartTlsServer"]


@dataclass
class ReceivedMessage:
    """One message the server accepted."""

    mail_from: str
    rcpts: list[str]
    data: bytes
    tls: bool  # True when the DATA arrived inside TLS


@dataclass
class SmtpSession:
    """What happened on one connection."""

    peer: str
    commands: list[str] = field(default_factory=list)
    tls: bool = False  # the TLS handshake completed
    tls_error: str = ""  # the handshake failed (e.g. the client rejected the certificate)
    sni: str | None = None


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        owner = self.server.owner
        session = SmtpSession(peer=str(self.client_address[0]))
        with owner.lock:
            owner.sessions.append(session)
        if owner.hang:
            owner.stopping.wait(owner.hang_seconds)
            return
        sock: socket.socket = self.request
        sock.settimeout(30)
        try:
            self._converse(owner, session, sock)
        except (OSError, ValueError) as exc:
            if not session.tls and session.commands and session.commands[-1] == "STARTTLS":
                session.tls_error = str(exc)

    def _converse(self, owner: StartTlsServer, session: SmtpSession, sock: socket.socket) -> None:
        reader = sock.makefile("rb")

        def reply(text: str) -> None:
            sock.sendall(text.encode("ascii") + b"\r\n")

        reply(f"220 {owner.hostname} ESMTP test")
        mail_from, rcpts = "", list[str]()
        while True:
            line = reader.readline(2048)
            if not line:
                return
            text = line.decode("ascii", "replace").rstrip("\r\n")
            verb = text.split(" ", 1)[0].upper()
            session.commands.append(verb)
            if verb in ("EHLO", "HELO"):
                extensions = ["PIPELINING", "8BITMIME"]
                if owner.starttls and not session.tls:
                    extensions.append("STARTTLS")
                lines = [owner.hostname, *extensions]
                for i, item in enumerate(lines):
                    reply(f"250{'-' if i < len(lines) - 1 else ' '}{item}")
            elif verb == "STARTTLS":
                if not owner.starttls or session.tls or owner.context is None:
                    reply("502 5.5.1 STARTTLS not available")
                    continue
                reply("220 2.0.0 Ready to start TLS")
                tls_sock = owner.context.wrap_socket(sock, server_side=True)
                session.tls = True
                session.sni = owner.last_sni
                sock = tls_sock
                reader = sock.makefile("rb")
                mail_from, rcpts = "", []
            elif verb == "MAIL":
                mail_from, rcpts = text[10:].strip(), []
                reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpts.append(text[8:].strip())
                reply("250 2.1.5 Ok")
            elif verb == "DATA":
                reply("354 End data with <CR><LF>.<CR><LF>")
                chunks: list[bytes] = []
                while True:
                    data_line = reader.readline(65536)
                    if not data_line or data_line in (b".\r\n", b".\n"):
                        break
                    chunks.append(data_line[1:] if data_line.startswith(b"..") else data_line)
                with owner.lock:
                    owner.messages.append(
                        ReceivedMessage(mail_from, list(rcpts), b"".join(chunks), session.tls)
                    )
                reply("250 2.0.0 Ok: queued")
            elif verb in ("RSET", "NOOP"):
                reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                reply("221 2.0.0 Bye")
                return
            else:
                reply("502 5.5.2 Error: command not recognized")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: StartTlsServer, address: tuple[str, int]) -> None:
        self.owner = owner
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)


class StartTlsServer:
    """SMTP server on ``host:port`` (port 0: ephemeral) offering STARTTLS with ``chain``/``key``.

    ``starttls=False`` omits the extension; ``hang=True`` accepts connections and never speaks.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        chain: Path | None = None,
        key: Path | None = None,
        starttls: bool = True,
        hang: bool = False,
        hang_seconds: float = 60.0,
        hostname: str = "mx.test",
    ) -> None:
        self.host = host
        self.port = port
        self.starttls = starttls and chain is not None
        self.hang = hang
        self.hang_seconds = hang_seconds
        self.hostname = hostname
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sessions: list[SmtpSession] = []
        self.messages: list[ReceivedMessage] = []
        self.last_sni: str | None = None
        self.context: ssl.SSLContext | None = None
        if chain is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(chain, key)
            context.sni_callback = self._on_sni
            self.context = context
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _on_sni(self, _sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: object) -> None:
        self.last_sni = name

    def start(self) -> Self:
        """Bind and serve in a background thread."""
        self._server = _Server(self, (self.host, self.port))
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release hung connections."""
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def wait_messages(self, count: int = 1, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Wait until ``count`` messages arrived; return all received (maybe fewer on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    break
            time.sleep(0.05)
        with self.lock:
            return list(self.messages)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            self.stop()
