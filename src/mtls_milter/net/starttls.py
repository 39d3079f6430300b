"""One SMTP STARTTLS handshake that captures the whole certificate chain the server serves.

Shared by ``mtls-milter probe`` (checking MX hosts) and the chain fetcher (fetching a sending
client's chain from its own host, docs/evidence.md). Connect, read the greeting, EHLO,
STARTTLS, a TLS client handshake with SNI and **no trust decision** (the caller validates),
then a polite QUIT. One deadline covers the whole conversation, so a host that hangs, trickles
or talks garbage costs at most ``timeout`` seconds. pyOpenSSL is used because Python 3.11's
``ssl`` returns only the peer's leaf (docs/evidence.md, "How the chain is obtained").
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field

from cryptography import x509
from OpenSSL import SSL

from mtls_milter.core.quote import clip

__all__ = ["MAX_LINE", "MAX_REPLY_LINES", "StartTlsResult", "starttls_chain"]

MAX_REPLY_LINES = 100
MAX_LINE = 2048


@dataclass
class StartTlsResult:
    """What one STARTTLS conversation produced; ``error`` is "" when the handshake completed."""

    connected: bool = False
    starttls: bool = False  # the server offered STARTTLS and accepted the command
    tls_version: str = ""
    chain: list[x509.Certificate] = field(default_factory=list)  # as served, leaf first
    error: str = ""
    phase: str = ""  # where the conversation ended (for logs)


class _Timeout(Exception):
    pass


class _Smtp:
    """Just enough SMTP over a socket with one overall deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buffer = b""

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Timeout
        self.sock.settimeout(left)

    def recv(self) -> bytes:
        self._arm()
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise _Timeout from None
        if not data:
            raise ConnectionError("connection closed by the server")
        return data

    def send(self, data: bytes) -> None:
        self._arm()
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise _Timeout from None

    def reply(self) -> tuple[int, list[str]]:
        """Read one (multi-line) SMTP reply: (code, texts)."""
        lines: list[str] = []
        while len(lines) < MAX_REPLY_LINES:
            while b"\n" not in self.buffer:
                if len(self.buffer) > MAX_LINE:
                    raise ConnectionError("SMTP reply line too long")
                self.buffer += self.recv()
            raw, _, self.buffer = self.buffer.partition(b"\n")
            line = raw.rstrip(b"\r").decode("ascii", "replace")
            code = line[:3]
            if len(line) < 3 or not code.isdigit():
                raise ConnectionError(f"not an SMTP reply: {line[:80]!r}")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(code), lines
        raise ConnectionError("SMTP reply has too many lines")


def starttls_chain(
    address: str,
    port: int,
    server_name: str,
    *,
    timeout: float,
    ehlo_name: str,
    source_address: str | None = None,
) -> StartTlsResult:
    """Connect to ``address:port``, STARTTLS with SNI ``server_name`` (none when empty).

    Never raises for anything the server does; the error text says what went wrong.
    """
    result = StartTlsResult()
    deadline = time.monotonic() + timeout
    result.phase = "connect"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source_address:
            sock.bind((source_address, 0))
        try:
            sock.connect((address, port))
        except TimeoutError:
            raise _Timeout from None
        result.connected = True
        smtp = _Smtp(sock, deadline)
        if not _start_tls(smtp, ehlo_name, result):
            return result
        result.starttls = True
        result.phase = "TLS handshake"
        result.tls_version, result.chain = _handshake(smtp, server_name)
        result.phase = "done"
    except _Timeout:
        result.error = f"timed out after {timeout:g} s ({result.phase})"
    except SSL.Error as exc:
        result.error = f"{result.phase} failed: {_ssl_error(exc)}"
    except OSError as exc:
        result.error = f"{result.phase} failed: {exc.strerror or exc}"
    except Exception as exc:  # a peer must never crash the caller
        result.error = f"{result.phase} failed: {type(exc).__name__}: {exc}"
    finally:
        sock.close()
    return result


def _start_tls(smtp: _Smtp, ehlo_name: str, result: StartTlsResult) -> bool:
    """Greeting, EHLO, STARTTLS; False (with ``result.error`` set) when the server says no."""
    result.phase = "greeting"
    code, _ = smtp.reply()
    if code != 220:
        result.error = f"greeting {code}: not ready"
        return False
    result.phase = "EHLO"
    smtp.send(f"EHLO {ehlo_name}\r\n".encode())
    code, lines = smtp.reply()
    if code != 250:
        result.error = f"EHLO refused ({code})"
        return False
    if not any(line.split(" ", 1)[0].upper() == "STARTTLS" for line in lines[1:]):
        result.error = "STARTTLS not offered"
        _quit(smtp)
        return False
    result.phase = "STARTTLS"
    smtp.send(b"STARTTLS\r\n")
    code, lines = smtp.reply()
    if code != 220:
        result.error = f"STARTTLS refused ({code} {clip(' '.join(lines), 80)})"
        return False
    return True


def _quit(smtp: _Smtp) -> None:
    with contextlib.suppress(OSError, _Timeout):
        smtp.send(b"QUIT\r\n")


def _ssl_error(exc: SSL.Error) -> str:
    """OpenSSL's error queue ``[(lib, func, reason), …]`` as text."""
    items = exc.args[0] if exc.args and isinstance(exc.args[0], list) else [exc]
    parts = [str(i[-1]) if isinstance(i, tuple) and i else str(i) for i in items]
    return "; ".join(p for p in parts if p) or type(exc).__name__


def _handshake(smtp: _Smtp, server_name: str) -> tuple[str, list[x509.Certificate]]:
    """TLS client handshake through memory BIOs (so the deadline applies); no verification here."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    # VERIFY_NONE without a Python callback: a cffi callback needs memory that is writable and
    # executable, which MemoryDenyWriteExecute=yes (the shipped units) refuses. With VERIFY_NONE
    # OpenSSL completes the handshake whatever the chain; the caller validates it afterwards.
    context.set_verify(SSL.VERIFY_NONE)
    conn = SSL.Connection(context, None)
    if server_name:
        conn.set_tlsext_host_name(server_name.encode("ascii"))
    conn.set_connect_state()
    if smtp.buffer:  # bytes after the 220 reply: a server that talks TLS too early
        conn.bio_write(smtp.buffer)
        smtp.buffer = b""
    while True:
        try:
            conn.do_handshake()
            break
        except SSL.WantReadError:
            _flush(conn, smtp)
            conn.bio_write(smtp.recv())
    _flush(conn, smtp)
    chain = conn.get_peer_cert_chain(as_cryptography=True) or []
    version = conn.get_protocol_version_name()
    try:  # a polite QUIT inside TLS; nothing depends on it
        conn.send(b"QUIT\r\n")
        _flush(conn, smtp)
    except (SSL.Error, OSError, _Timeout):
        pass
    return version, list(chain)


def _flush(conn: SSL.Connection, smtp: _Smtp) -> None:
    while True:
        try:
            data = conn.bio_read(65536)
        except SSL.WantReadError:
            return
        if not data:
            return
        smtp.send(data)
