"""A raw milter-protocol client (version 6 framing) for tests: normal and hostile conversations.

Every packet is ``uint32 length`` (big-endian, counting the command byte) + ``command byte`` +
payload, in both directions. :class:`MilterClient` speaks the commands an MTA sends (OPTNEG,
CONNECT, HELO, MACRO, MAIL, RCPT, DATA, HEADER, EOH, BODY, EOM, ABORT, QUIT) and honours the
protocol flags the milter negotiated (a step it asked not to receive is not sent, a step it
answers with no reply is not waited for) — but it also sends any bytes a test hands it
(:meth:`MilterClient.send_raw`, :meth:`MilterClient.send_frame`), which is the point.

Replies are :class:`Reply` objects; end of message gives an :class:`EomResult`: the
modification actions (``h`` add, ``i`` insert, ``m`` change header) followed by the final reply
(``a`` accept, ``c`` continue, ``r`` reject, ``t`` tempfail, ``y`` reply code, ``d`` discard).
Reference: libmilter's ``mfdef.h`` (command, reply and flag values), Sendmail 8.14+.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

__all__ = [
    "ACTIONS_ALL",
    "PROTOCOL_ALL",
    "EomResult",
    "HeaderAction",
    "MilterClient",
    "MilterClosed",
    "Negotiated",
    "Reply",
    "frame",
    "full_conversation",
]

VERSION = 6
ACTIONS_ALL = 0x1FF  # every SMFIF_* action an MTA offers (add/change headers, body, rcpts...)
PROTOCOL_ALL = 0x1FFFFF  # every SMFIP_* step flag an MTA offers (the milter picks its subset)

# Protocol flags (SMFIP_*): the milter does not want a step (NO*) or sends no reply (NR_*).
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT = 0x1, 0x2, 0x4, 0x8
P_NOBODY, P_NOHDRS, P_NOEOH, P_NR_HDR = 0x10, 0x20, 0x40, 0x80
P_NODATA = 0x200
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
P_NR_DATA, P_NR_EOH, P_NR_BODY = 0x10000, 0x40000, 0x80000

# command byte → (flag: milter does not want it, flag: milter sends no reply)
_STEP_FLAGS: dict[bytes, tuple[int, int]] = {
    b"C": (P_NOCONNECT, P_NR_CONN),
    b"H": (P_NOHELO, P_NR_HELO),
    b"M": (P_NOMAIL, P_NR_MAIL),
    b"R": (P_NORCPT, P_NR_RCPT),
    b"T": (P_NODATA, P_NR_DATA),
    b"L": (P_NOHDRS, P_NR_HDR),
    b"N": (P_NOEOH, P_NR_EOH),
    b"B": (P_NOBODY, P_NR_BODY),
}
FINAL_REPLIES = frozenset(b"acdrtyf")  # accept continue discard reject tempfail reply connfail
_HEADER_ACTIONS = frozenset(b"him")  # add, insert, change a header field


class MilterClosed(ConnectionError):
    """The milter closed the connection (or reset it) where the client expected a reply."""


def frame(command: bytes, payload: bytes = b"") -> bytes:
    """One packet: length (command byte + payload), command, payload."""
    return struct.pack(">I", len(command) + len(payload)) + command + payload


def _z(*parts: str | bytes) -> bytes:
    """Each part NUL-terminated (str as UTF-8)."""
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


@dataclass(frozen=True, slots=True)
class Reply:
    """One packet from the milter."""

    command: bytes  # one byte, e.g. b"c"
    payload: bytes = b""

    @property
    def text(self) -> str:
        """The payload as text without its NUL terminator (for ``y`` replies)."""
        return self.payload.rstrip(b"\0").decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class HeaderAction:
    """``h`` (add), ``i`` (insert at ``index``) or ``m`` (change the ``index``-th field)."""

    command: bytes
    name: str
    value: str
    index: int = -1

    @classmethod
    def parse(cls, reply: Reply) -> HeaderAction:
        body = reply.payload
        index = -1
        if reply.command in (b"i", b"m"):
            (index,) = struct.unpack(">I", body[:4])
            body = body[4:]
        name, _, rest = body.partition(b"\0")
        value = rest.rstrip(b"\0")
        return cls(reply.command, name.decode("utf-8", "replace"), value.decode(), index)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The milter's OPTNEG reply."""

    version: int
    actions: int
    protocol: int
    macros: dict[int, str] = field(default_factory=dict)  # stage → requested macro names


@dataclass(frozen=True, slots=True)
class EomResult:
    """What the milter answered at end of message."""

    actions: list[Reply]
    final: Reply

    @property
    def headers(self) -> list[HeaderAction]:
        return [HeaderAction.parse(r) for r in self.actions if r.command[0] in _HEADER_ACTIONS]

    def header_values(self, name: str) -> list[str]:
        """Values of the fields named ``name`` the milter added or inserted."""
        return [
            h.value
            for h in self.headers
            if h.command in (b"h", b"i") and h.name.lower() == name.lower()
        ]


Address = tuple[str, int] | str  # (host, port) for TCP, a path for a unix socket


class MilterClient:
    """One milter connection. Use as a context manager; every read is bounded by ``timeout``."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.protocol = 0  # negotiated SMFIP_* flags; 0 until OPTNEG

    @classmethod
    def connect(cls, address: Address, timeout: float = 10.0) -> MilterClient:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address)
        else:
            sock = socket.create_connection(address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- raw I/O --------------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (any framing, or none)."""
        self.sock.sendall(data)

    def send_frame(self, command: bytes, payload: bytes = b"") -> None:
        self.send_raw(frame(command, payload))

    def _read_exactly(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            try:
                chunk = self.sock.recv(size - len(chunks))
            except ConnectionResetError as exc:
                raise MilterClosed("connection reset by the milter") from exc
            if not chunk:
                raise MilterClosed(f"milter closed the connection ({len(chunks)}/{size} bytes)")
            chunks += chunk
        return bytes(chunks)

    def read_reply(self) -> Reply:
        """The next packet from the milter; MilterClosed on EOF, TimeoutError when silent."""
        (length,) = struct.unpack(">I", self._read_exactly(4))
        if not 1 <= length <= 1 << 20:
            raise ValueError(f"milter sent a packet length of {length}")
        body = self._read_exactly(length)
        return Reply(body[:1], body[1:])

    def is_closed_by_peer(self, wait: float = 2.0) -> bool:
        """True when the milter closes the connection within ``wait`` seconds (without data)."""
        deadline = time.monotonic() + wait
        old = self.sock.gettimeout()
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    data = self.sock.recv(4096)
                except TimeoutError:
                    return False
                except ConnectionResetError:
                    return True
                if not data:
                    return True
            return False
        finally:
            self.sock.settimeout(old)

    # -- MTA commands ---------------------------------------------------------------------------

    def optneg(
        self, version: int = VERSION, actions: int = ACTIONS_ALL, protocol: int = PROTOCOL_ALL
    ) -> Negotiated:
        """Negotiate; remember the milter's protocol flags for the later steps."""
        self.send_frame(b"O", struct.pack(">III", version, actions, protocol))
        reply = self.read_reply()
        if reply.command != b"O" or len(reply.payload) < 12:
            raise ValueError(f"unexpected OPTNEG reply {reply!r}")
        got_version, got_actions, got_protocol = struct.unpack(">III", reply.payload[:12])
        macros: dict[int, str] = {}
        rest = reply.payload[12:]
        while len(rest) >= 5:
            (stage,) = struct.unpack(">I", rest[:4])
            names, _, rest = rest[4:].partition(b"\0")
            macros[stage] = names.decode("ascii", "replace")
        self.protocol = got_protocol
        return Negotiated(got_version, got_actions, got_protocol, macros)

    def macro(self, stage: bytes, macros: Mapping[str, str] | Sequence[str]) -> None:
        """A ``D`` packet for the command ``stage``; a sequence is sent as is (odd counts too)."""
        items: Iterable[str]
        if isinstance(macros, Mapping):
            items = [s for pair in macros.items() for s in pair]
        else:
            items = macros
        self.send_frame(b"D", stage + _z(*items))

    def step(self, command: bytes, payload: bytes = b"") -> Reply | None:
        """Send an SMTP step; its reply, or None when the milter negotiated it away."""
        unwanted, no_reply = _STEP_FLAGS.get(command, (0, 0))
        if self.protocol & unwanted:
            return None
        self.send_frame(command, payload)
        if self.protocol & no_reply:
            return None
        return self.read_reply()

    def connect_info(
        self, hostname: str = "client.example", address: str = "192.0.2.1", port: int = 40000
    ) -> Reply | None:
        family = b"6" if ":" in address else b"4"
        payload = _z(hostname) + family + struct.pack(">H", port) + _z(address)
        return self.step(b"C", payload)

    def helo(self, name: str = "client.example") -> Reply | None:
        return self.step(b"H", _z(name))

    def mail(self, sender: str, *params: str) -> Reply | None:
        return self.step(b"M", _z(sender, *params))

    def rcpt(self, recipient: str, *params: str) -> Reply | None:
        return self.step(b"R", _z(recipient, *params))

    def data(self) -> Reply | None:
        return self.step(b"T")

    def header(self, name: str, value: str) -> Reply | None:
        return self.step(b"L", _z(name, value))

    def eoh(self) -> Reply | None:
        return self.step(b"N")

    def body(self, chunk: bytes) -> Reply | None:
        return self.step(b"B", chunk)

    def eom(self, chunk: bytes = b"") -> EomResult:
        """End of message: read modification actions until the final reply."""
        self.send_frame(b"E", chunk)
        actions: list[Reply] = []
        while True:
            reply = self.read_reply()
            if reply.command[0] in FINAL_REPLIES:
                return EomResult(actions, reply)
            actions.append(reply)

    def abort(self) -> None:
        self.send_frame(b"A")

    def quit(self) -> None:
        self.send_frame(b"Q")


def full_conversation(
    address: Address,
    *,
    sender: str = "<alice@example.org>",
    headers: Sequence[tuple[str, str]] = (("Subject", "hello"),),
    tls: Mapping[str, str] | None = None,
    helo: str = "client.example",
    j: str = "mx.example",
    timeout: float = 10.0,
) -> EomResult:
    """One normal message from connect to QUIT, as Postfix would send it; the EOM result.
    ``tls``: the TLS macros sent at HELO (default: a session without TLS)."""
    with MilterClient.connect(address, timeout) as client:
        client.optneg()
        client.macro(b"C", {"j": j, "{daemon_name}": "smtpd"})
        client.connect_info()
        client.macro(b"H", {"{tls_version}": ""} if tls is None else tls)
        client.helo(helo)
        client.macro(b"M", {"i": "4AB12C", "{mail_addr}": sender.strip("<>")})
        client.mail(sender)
        client.rcpt("<bob@example.net>")
        client.data()
        for name, value in headers:
            client.header(name, value)
        client.eoh()
        client.body(b"hello\r\n")
        result = client.eom()
        client.quit()
        return result
