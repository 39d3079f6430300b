"""One HTTP(S) GET for the validator: to a given IP address, with a given ``Host:``, bounded.

This is the only module of the ACME validator that opens sockets. It uses the standard library
(``socket``, ``ssl``, ``http.client`` for parsing) and nothing that consults the environment:
no system resolver (the caller passes the address), no proxy variables, no ``.netrc``.
It follows no redirects itself: the validator decides about them (policy, DNS, counting).

Bounds, all per exchange: one deadline for connect + TLS + request + response (enforced on every
read and, as a backstop, by a timer that shuts the socket down); the response head is limited
to :data:`MAX_HEAD` bytes and the body to ``max_body`` (a larger ``Content-Length`` is refused
before reading the body).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from mtls_milter import __version__
from mtls_milter.core.quote import clip

__all__ = [
    "MAX_HEAD",
    "REDIRECT_STATUSES",
    "Fetch",
    "FetchError",
    "FetchRequest",
    "FetchResponse",
    "http_fetch",
]

MAX_HEAD = 16 * 1024  # status line + headers
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = f"mtls-milter-acme-validator/{__version__}"
_CHUNK = 4096


class FetchError(StrEnum):
    """Why an exchange produced no usable HTTP response."""

    NONE = ""
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    TLS = "tls"
    TOO_LARGE = "too-large"
    PROTOCOL = "protocol"


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """One GET: connect to ``address``:``port``, send ``Host: host`` and ``path``."""

    scheme: str  # "http" or "https"
    address: str  # IPv4 or IPv6 address to connect to
    port: int
    host: str  # host name for Host: and (https) SNI
    path: str  # origin-form request target, starts with "/"
    timeout: float  # seconds for the whole exchange
    max_body: int  # body bytes accepted; more is FetchError.TOO_LARGE

    @property
    def host_header(self) -> str:
        """``host``, with ``:port`` when the port is not the scheme's default (RFC 9110 §7.2)."""
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class FetchResponse:
    """The outcome: an HTTP status (0 if none), Location, body, or an error."""

    status: int = 0
    location: str | None = None
    body: bytes = b""
    error: FetchError = FetchError.NONE
    detail: str = ""  # for errors: what happened, one line
    elapsed: float = 0.0


class Fetch(Protocol):
    """What the validator needs: perform one exchange, never raise."""

    def __call__(self, request: FetchRequest) -> FetchResponse: ...


class _TooLarge(Exception):
    pass


class _Deadline(Exception):
    pass


class _BoundedRaw(io.RawIOBase):
    """Raw reader over a socket that enforces a deadline and a byte limit on every read."""

    def __init__(self, sock: socket.socket, deadline: float, limit: int) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline
        self.limit = limit
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline
        if self.total > self.limit:
            raise _TooLarge
        self._sock.settimeout(remaining)
        view = memoryview(buffer)
        want = min(len(view), self.limit + 1 - self.total)
        count = self._sock.recv_into(view[:want])
        self.total += count
        if self.total > self.limit:
            raise _TooLarge
        return count


class _SocketShim:
    """What ``http.client.HTTPResponse`` wants from a socket: ``makefile``."""

    def __init__(self, raw: _BoundedRaw) -> None:
        self._raw = raw

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(self._raw, buffer_size=_CHUNK)


def _tls_context() -> ssl.SSLContext:
    # http-01 bootstraps certificates: a redirect to https may land on a self-signed or expired
    # certificate, so the certificate is deliberately not validated (Let's Encrypt's practice).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _request_bytes(request: FetchRequest) -> bytes:
    if not request.path.startswith("/") or any(
        ord(c) <= 0x20 or ord(c) >= 0x7F for c in request.path + request.host_header
    ):
        raise ValueError(f"unusable request target {request.path!r}")
    return (
        f"GET {request.path} HTTP/1.1\r\n"
        f"Host: {request.host_header}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")


def http_fetch(request: FetchRequest) -> FetchResponse:
    """Perform ``request``; every failure is a :class:`FetchResponse` with ``error`` set."""
    start = time.monotonic()
    deadline = start + max(0.0, request.timeout)
    fired = threading.Event()

    def result(**kwargs: Any) -> FetchResponse:
        return FetchResponse(elapsed=time.monotonic() - start, **kwargs)

    try:
        payload = _request_bytes(request)
        family = socket.AF_INET6 if ":" in request.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (ValueError, OSError) as exc:
        return result(error=FetchError.PROTOCOL, detail=str(exc))

    def kill() -> None:
        fired.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(max(0.0, request.timeout), kill)
    timer.daemon = True
    timer.start()
    conn: socket.socket = sock
    raw: _BoundedRaw | None = None
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.connect((request.address, request.port))
        if request.scheme == "https":
            conn = _tls_context().wrap_socket(sock, server_hostname=request.host)
        conn.settimeout(max(0.001, deadline - time.monotonic()))
        conn.sendall(payload)
        raw = _BoundedRaw(conn, deadline, MAX_HEAD)
        response = http.client.HTTPResponse(_SocketShim(raw), method="GET")  # type: ignore[arg-type]
        response.begin()
        return result(**_read_response(response, raw, request))
    except _TooLarge:
        what = "response head" if raw is not None and raw.limit == MAX_HEAD else "response"
        return result(error=FetchError.TOO_LARGE, detail=f"{what} too large")
    except (_Deadline, TimeoutError):
        return result(error=FetchError.TIMEOUT, detail=f"timeout after {request.timeout:g} s")
    except ssl.SSLError as exc:
        if fired.is_set():
            return result(error=FetchError.TIMEOUT, detail=f"timeout after {request.timeout:g} s")
        return result(error=FetchError.TLS, detail=f"TLS handshake failed: {exc.reason or exc}")
    except (http.client.HTTPException, OSError) as exc:
        if fired.is_set() or time.monotonic() >= deadline:
            return result(error=FetchError.TIMEOUT, detail=f"timeout after {request.timeout:g} s")
        return result(**_connection_failure(exc))
    finally:
        timer.cancel()
        with contextlib.suppress(OSError):
            conn.close()
        with contextlib.suppress(OSError):
            sock.close()


def _read_response(
    response: http.client.HTTPResponse, raw: _BoundedRaw, request: FetchRequest
) -> dict[str, Any]:
    """The result fields of a response whose head has been read: status, location, body."""
    status = response.status
    location = response.getheader("Location")
    if status != 200:
        return {"status": status, "location": location}
    if response.length is not None and response.length > request.max_body:
        return {
            "status": status,
            "error": FetchError.TOO_LARGE,
            "detail": f"response too large: Content-Length {response.length} "
            f"> {request.max_body} bytes",
        }
    raw.limit = raw.total + request.max_body + MAX_HEAD  # body plus chunked framing
    body = bytearray()
    while len(body) <= request.max_body:
        chunk = response.read(min(_CHUNK, request.max_body + 1 - len(body)))
        if not chunk:
            break
        body += chunk
    if len(body) > request.max_body:
        return {
            "status": status,
            "error": FetchError.TOO_LARGE,
            "detail": f"response too large: more than {request.max_body} bytes",
        }
    return {"status": status, "location": location, "body": bytes(body)}


def _connection_failure(exc: http.client.HTTPException | OSError) -> dict[str, Any]:
    """The result fields of a connection or HTTP failure that is not a timeout."""
    if isinstance(exc, ConnectionRefusedError):
        return {"error": FetchError.CONNECTION, "detail": "connection refused"}
    if isinstance(exc, http.client.RemoteDisconnected):
        return {"error": FetchError.CONNECTION, "detail": "connection closed without a response"}
    if isinstance(exc, http.client.HTTPException):
        text = clip(f"{type(exc).__name__}: {exc}")  # quotes the peer's bytes
        return {"error": FetchError.PROTOCOL, "detail": f"malformed HTTP response ({text})"}
    return {"error": FetchError.CONNECTION, "detail": f"connection failed: {exc.strerror or exc}"}
