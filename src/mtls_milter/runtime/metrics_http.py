"""The metrics HTTP endpoint: ``GET /metrics`` and ``GET /healthz``, nothing else.

A small HTTP/1.x server on the shared stream service (connection caps, accept-loop limits), in
a thread of its own with its own event loop, so a scrape never waits for the milter and the
milter never waits for a scrape. One request per connection; the request head is bounded
(:data:`MAX_HEAD` bytes within :data:`READ_TIMEOUT` seconds). Every request gets a defined answer
(400, 404, 405, 408, 431, 503) or, for a peer that sends nothing, a closed connection; nothing a
client sends stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from http import HTTPStatus

from mtls_milter.endpoints import parse_host_port, parse_socket_spec
from mtls_milter.runtime.service_thread import ServiceThread
from mtls_milter.runtime.stream_service import Listener, StreamService, tcp_listener_sockets

log = logging.getLogger("mtls_milter.metrics")

MAX_HEAD = 8192  # request line + headers
READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 64  # Prometheus holds one; a few for people with curl
MAX_PER_PEER = 16

Health = Callable[[], tuple[bool, str]]  # (healthy, reason when not)
Render = Callable[[], tuple[bytes, str]]  # (body, content type)


class MetricsHttp(StreamService):
    """Answers one request per connection with :func:`render` or ``health``."""

    def __init__(self, listen: str, render: Render, health: Health) -> None:
        host, port = parse_host_port(listen)
        super().__init__(
            f"inet:{port}@{host}",
            socket_mode=0,
            log=log,
            max_connections=MAX_CONNECTIONS,
            max_per_peer=MAX_PER_PEER,
            limit=MAX_HEAD,
        )
        self._render = render
        self._health = health
        self.host, self.port = host, port  # after the base class set port = 0
        self.sockets: list[socket.socket] = []  # the listening sockets, once open

    async def listen(self) -> Listener:
        """Listen on every address of the host (all of them for an empty host)."""
        sockets = tcp_listener_sockets(self.host, self.port)
        self.port = int(sockets[0].getsockname()[1])
        self.sockets = sockets
        return Listener(sockets, self._on_connect, log=self._accept_log, limit=MAX_HEAD)

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            return await _reply(writer, 431, "request head too large\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                await _reply(writer, 400, "incomplete request\n")
            return None
        except TimeoutError:
            return await _reply(writer, 408, "request not received in time\n")
        except ConnectionError:  # the client went away (reset): nothing to answer, nothing to log
            return None
        status, body, content_type = await self._answer(head)
        send_body = not head.startswith(b"HEAD ")
        with contextlib.suppress(ConnectionError):  # a client that left before the answer
            await _reply(writer, status, body, content_type, send_body=send_body)
        return None

    async def _answer(self, head: bytes) -> tuple[int, str | bytes, str]:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, "bad request line\n", "text/plain"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, "only GET and HEAD\n", "text/plain"
        loop = asyncio.get_running_loop()
        try:
            if target == b"/metrics":
                body, content_type = await loop.run_in_executor(None, self._render)
                return 200, body, content_type
            if target == b"/healthz":
                healthy, reason = await loop.run_in_executor(None, self._health)
                return (
                    (200, "ok\n", "text/plain") if healthy else (503, f"{reason}\n", "text/plain")
                )
        except Exception:
            log.exception("metrics endpoint: cannot answer %s", target.decode("ascii", "replace"))
            return 500, "internal error\n", "text/plain"
        return 404, "not found: try /metrics or /healthz\n", "text/plain"


async def _reply(
    writer: asyncio.StreamWriter,
    status: int,
    body: str | bytes,
    content_type: str = "text/plain",
    *,
    send_body: bool = True,
) -> None:
    data = body.encode("ascii", "replace") if isinstance(body, str) else body
    if content_type == "text/plain":
        content_type = "text/plain; charset=us-ascii"
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode("ascii") + (data if send_body else b""))
    # a peer that went away or does not read: the connection is closed after this anyway
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.drain(), READ_TIMEOUT)


class MetricsServer(ServiceThread):
    """The metrics endpoint in its own thread; :attr:`port` is the bound port."""

    def __init__(self, listen: str, render: Render, health: Health) -> None:
        self.http = MetricsHttp(listen, render, health)
        super().__init__(self._serve_http, name="metrics-http", log=log, join_timeout=5)

    @property
    def port(self) -> int:
        return self.http.port

    def close_in_child(self) -> None:
        """In a forked child: close the inherited listening sockets (the thread is not there)."""
        for sock in self.http.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    async def _serve_http(self, stop: asyncio.Event, ready: Callable[[], None]) -> None:
        listener = await self.http.listen()
        ready()
        try:
            await stop.wait()
        finally:
            listener.close()
            await self.http.close_connections()


def socket_accepts(spec: str, timeout: float = 1.0) -> str:
    """ "" when a connection to the socket ``spec`` (unix:/path, inet:PORT@HOST) succeeds, else
    the reason."""
    try:
        parsed = parse_socket_spec(spec)
        if parsed.kind == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(parsed.path)
        else:
            with socket.create_connection((parsed.host, parsed.port), timeout=timeout):
                pass
    except (OSError, ValueError) as exc:
        return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    return ""
