"""The MX host side: serve ``GET /.well-known/acme-challenge/<token>`` from files ``DIR/<token>``.

Each file holds a key authorization (as an ACME client writes it for HTTP-01). Everything else is
404. The request target is matched *raw*, before any percent-decoding: it must be exactly the
challenge prefix followed by a token of base64url characters, so ``..``, ``%2F``, ``%2e``,
backslashes, query strings and absolute paths can never reach the file system. The file must be
a regular file whose real path (symlinks resolved) lies inside DIR, at most :data:`MAX_FILE`
bytes. Requests are bounded (head at most :data:`MAX_REQUEST` bytes, read within a timeout, one
request per connection, caps on concurrent connections in total and per client address) and each
is logged in one line; connections refused over a cap get a 503 and, all together, at most one
log line per 10 s, as does running out of file descriptors (docs/security.md).

An asyncio server: :class:`Responder` for the CLI (``mtls-milter acme respond``) and
:class:`ResponderThread` to run one in a background thread (tests, embedding).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from mtls_milter.acme.keyauth import is_token
from mtls_milter.acme.validator import CHALLENGE_PATH
from mtls_milter.runtime.service_thread import ServiceThread
from mtls_milter.runtime.stream_service import (
    ConnectionLimits,
    Listener,
    OpenConnections,
    RateLimitedLog,
    peer_identity,
    tcp_listener_sockets,
)

__all__ = [
    "MAX_FILE",
    "MAX_REQUEST",
    "Responder",
    "ResponderThread",
    "lookup_token",
]

log = logging.getLogger("mtls_milter.acme.respond")

MAX_REQUEST = 8192  # request line + headers
MAX_FILE = 8192  # a key authorization is ~90 bytes
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 256
MAX_PER_PEER = 32  # a CA validates from a handful of addresses, one request each
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
SERVER = "mtls-milter-acme-responder"


def lookup_token(directory: Path, token: str) -> tuple[bytes | None, str]:
    """(content, "") for a servable token file, else (None, why not) — never raises."""
    if not is_token(token):
        return None, "not a token"
    try:
        root = directory.resolve(strict=True)
        real = (root / token).resolve(strict=True)
    except (OSError, RuntimeError):
        return None, "no such token"
    if real.parent != root:
        return None, "token file leaves the directory (symlink)"
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return None, f"cannot open: {exc.strerror}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file"
        if info.st_size > MAX_FILE:
            return None, f"file larger than {MAX_FILE} bytes"
        data = b""
        while len(data) <= MAX_FILE and (chunk := os.read(fd, MAX_FILE + 1 - len(data))):
            data += chunk
    except OSError as exc:
        return None, f"cannot read: {exc.strerror}"
    finally:
        os.close(fd)
    if len(data) > MAX_FILE:
        return None, f"file larger than {MAX_FILE} bytes"
    return data, ""


@dataclass(frozen=True, slots=True)
class _Request:
    method: str = "-"
    target: str = "-"
    host: str = "-"
    agent: str = "-"


class Responder:
    """The HTTP-01 responder: ``await start()``, then ``await serve_forever()`` or ``close()``."""

    def __init__(
        self,
        directory: Path | str,
        listen: Sequence[tuple[str, int]],
        *,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_per_peer: int = MAX_PER_PEER,
        optional: Sequence[tuple[str, int]] = (),
    ) -> None:
        """``optional`` listeners are skipped with a warning when their address is unusable."""
        self.directory = Path(directory)
        self._listen = list(listen)
        self._optional = list(optional)
        self._read_timeout = read_timeout
        self.connections = OpenConnections(ConnectionLimits(log, max_connections, max_per_peer))
        self._accept_log = RateLimitedLog(log)
        self._servers: list[Listener] = []
        self.addresses: list[tuple[str, int]] = []

    async def start(self) -> list[tuple[str, int]]:
        """Bind every listener; return the bound (host, port) pairs. OSError if one fails."""
        for (host, port), optional in [(a, False) for a in self._listen] + [
            (a, True) for a in self._optional
        ]:
            try:
                sockets = tcp_listener_sockets(host, port)
            except OSError as exc:
                if optional and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    log.warning("not listening on %s:%d: %s", host, port, exc.strerror)
                    continue
                await self.close()
                raise
            server = Listener(sockets, self._handle, log=self._accept_log, limit=MAX_REQUEST)
            self._servers.append(server)
            for sock in server.sockets:
                bound = sock.getsockname()
                self.addresses.append((str(bound[0]), int(bound[1])))
        if not self.addresses:
            raise OSError(errno.EADDRNOTAVAIL, "no listener could be bound")
        for host, port in self.addresses:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            log.info("listening on %s, serving %s", where, self.directory)
        return self.addresses

    async def serve_forever(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (forever without one), then close."""
        try:
            await (stop or asyncio.Event()).wait()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop listening and end the connections still in progress."""
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        await self.connections.cancel_all()

    # -- one connection, one request -------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with self.connections.admitted(writer) as peer:
                if peer is None:  # refused by a limit (logged there, rate-limited)
                    writer.write(BUSY)
                else:
                    await self._serve_request(reader, writer, peer)
        except Exception as exc:  # one bad connection never stops the server
            log.warning(
                "%s: internal error: %s: %s", peer_identity(writer), type(exc).__name__, exc
            )
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), timeout=self._read_timeout)

    async def _serve_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        """Read one request head and answer it."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=self._read_timeout)
        except asyncio.LimitOverrunError:
            await self._reply(writer, peer, _Request(), 431, b"request too large\n", "")
            return
        except TimeoutError:
            await self._reply(writer, peer, _Request(), 408, b"timeout\n", "")
            return
        except (asyncio.IncompleteReadError, ConnectionError):
            _log_line(peer, _Request(), 0, 0, "incomplete request")
            return
        request, status, note = self._parse(head)
        if status:
            await self._reply(writer, peer, request, status, b"bad request\n", note)
            return
        token = request.target[len(CHALLENGE_PATH) :]
        if not request.target.startswith(CHALLENGE_PATH):
            body, note = None, "not a challenge path"
        else:
            body, note = lookup_token(self.directory, token)
        if body is None:
            await self._reply(writer, peer, request, 404, b"not found\n", note)
            return
        await self._reply(writer, peer, request, 200, body, "")

    def _parse(self, head: bytes) -> tuple[_Request, int, str]:
        """(request, 0, "") or (partial request, error status, why)."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return _Request(target=_clean(lines[0])), 400, "malformed request line"
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                return _Request(method, target), 400, "malformed header line"
            headers.setdefault(name.lower(), value.strip())
        request = _Request(method, target, headers.get("host", "-"), headers.get("user-agent", "-"))
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            return request, 505, "unsupported HTTP version"
        if method not in ("GET", "HEAD"):
            return request, 405, "method not allowed"
        if version == "HTTP/1.1" and "host" not in headers:
            return request, 400, "HTTP/1.1 request without Host"
        if target.startswith(("http://", "https://")):  # absolute-form (RFC 9112 §3.2.2)
            after = target.split("//", 1)[1]
            slash = after.find("/")
            target = after[slash:] if slash >= 0 else "/"
            request = _Request(method, target, request.host, request.agent)
        return request, 0, ""

    async def _reply(
        self,
        writer: asyncio.StreamWriter,
        peer: str,
        request: _Request,
        status: int,
        body: bytes,
        note: str,
    ) -> None:
        kind = "application/octet-stream" if status == 200 else "text/plain; charset=us-ascii"
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Server: {SERVER}\r\n"
            f"Content-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\n"
            + ("Allow: GET, HEAD\r\n" if status == 405 else "")
            + "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        writer.write(head if request.method == "HEAD" else head + body)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), timeout=self._read_timeout)
        _log_line(peer, request, status, len(body), note)


def _clean(text: str, limit: int = 200) -> str:
    """Untrusted text for a log line: printable ASCII, no spaces or quotes, bounded."""
    out = "".join(c if 0x21 <= ord(c) < 0x7F and c not in '"\\' else "?" for c in text[:limit])
    return out + ("..." if len(text) > limit else "") or "-"


def _log_line(peer: str, request: _Request, status: int, size: int, note: str) -> None:
    log.info(
        '%s %s %s %d %d host=%s ua="%s"%s',
        peer,
        _clean(request.method, 16),
        _clean(request.target),
        status,
        size,
        _clean(request.host, 100),
        _clean(request.agent, 100),
        f" ({note})" if note else "",
    )


class ResponderThread(ServiceThread):
    """A :class:`Responder` on its own event loop in a daemon thread (context manager)."""

    def __init__(self, directory: Path | str, listen: Sequence[tuple[str, int]]) -> None:
        self.responder = Responder(directory, listen)
        super().__init__(self._serve_tokens, name="acme-responder", log=log)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) pairs."""
        return self.responder.addresses

    async def _serve_tokens(self, stop: asyncio.Event, ready: Callable[[], None]) -> None:
        await self.responder.start()
        ready()
        await self.responder.serve_forever(stop)


async def run_until_signal(responder: Responder) -> None:
    """Start ``responder`` and serve until SIGTERM or SIGINT."""
    await responder.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await responder.serve_forever(stop)
