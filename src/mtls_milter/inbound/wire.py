"""Milter protocol version 6 on the wire: constants, framing, payload decoding and encoding.

A frame is a 4-byte big-endian length (counting the command byte and the payload), one command
byte and the payload. Strings in payloads are NUL-terminated. The constants and their values are
libmilter's (``mfdef.h``, ``mfapi.h``); the decoders are stricter than libmilter's: anything an
MTA cannot produce raises :class:`WireError`, which the protocol core turns into closing the
conversation, never into an exception for its caller.
"""

from __future__ import annotations

import ipaddress
import struct
from enum import IntEnum, IntFlag

from mtls_milter.core.quote import quote
from mtls_milter.errors import InputError

PROTOCOL_VERSION = 6
MIN_PROTOCOL_VERSION = 2  # libmilter refuses older MTAs
HEADER_SIZE = 5  # length (4) + command (1)

# Payload size limits: libmilter's MILTER_MAX_DATA_SIZE (also MILTER_CHUNK_SIZE, the body chunk
# size MTAs use) and the two larger sizes an MTA may offer with SMFIP_MDS_256K / SMFIP_MDS_1M.
MAX_DATA_SIZE_64K = 64 * 1024 - 1
MAX_DATA_SIZE_256K = 256 * 1024 - 1
MAX_DATA_SIZE_1M = 1024 * 1024 - 1

# Commands (MTA to milter).
SMFIC_ABORT = ord("A")
SMFIC_BODY = ord("B")
SMFIC_CONNECT = ord("C")
SMFIC_MACRO = ord("D")
SMFIC_BODYEOB = ord("E")
SMFIC_HELO = ord("H")
SMFIC_QUIT_NC = ord("K")
SMFIC_HEADER = ord("L")
SMFIC_MAIL = ord("M")
SMFIC_EOH = ord("N")
SMFIC_OPTNEG = ord("O")
SMFIC_QUIT = ord("Q")
SMFIC_RCPT = ord("R")
SMFIC_DATA = ord("T")
SMFIC_UNKNOWN = ord("U")

# Replies and actions (milter to MTA).
SMFIR_ACCEPT = ord("a")
SMFIR_CONTINUE = ord("c")
SMFIR_DISCARD = ord("d")
SMFIR_ADDHEADER = ord("h")
SMFIR_INSHEADER = ord("i")
SMFIR_CHGHEADER = ord("m")
SMFIR_QUARANTINE = ord("q")
SMFIR_REJECT = ord("r")
SMFIR_SKIP = ord("s")
SMFIR_TEMPFAIL = ord("t")
SMFIR_REPLYCODE = ord("y")


class ActionFlag(IntFlag):
    """SMFIF_*: what the milter may do at end of message (negotiated)."""

    ADDHDRS = 0x001
    CHGBODY = 0x002
    ADDRCPT = 0x004
    DELRCPT = 0x008
    CHGHDRS = 0x010
    QUARANTINE = 0x020
    CHGFROM = 0x040
    ADDRCPT_PAR = 0x080
    SETSYMLIST = 0x100


V1_ACTIONS = 0x0000000F  # what an MTA offering no actions (0) means
ALL_ACTIONS = 0x000001FF


class ProtocolFlag(IntFlag):
    """SMFIP_*: protocol steps the milter does not want (NO*), replies it will not send (NR_*)."""

    NOCONNECT = 0x00000001
    NOHELO = 0x00000002
    NOMAIL = 0x00000004
    NORCPT = 0x00000008
    NOBODY = 0x00000010
    NOHDRS = 0x00000020
    NOEOH = 0x00000040
    NR_HDR = 0x00000080
    NOUNKNOWN = 0x00000100
    NODATA = 0x00000200
    SKIP = 0x00000400
    RCPT_REJ = 0x00000800
    NR_CONN = 0x00001000
    NR_HELO = 0x00002000
    NR_MAIL = 0x00004000
    NR_RCPT = 0x00008000
    NR_DATA = 0x00010000
    NR_UNKN = 0x00020000
    NR_EOH = 0x00040000
    NR_BODY = 0x00080000
    HDR_LEADSPC = 0x00100000
    MDS_256K = 0x10000000
    MDS_1M = 0x20000000


V1_PROTOCOL = 0x0000003F  # what an MTA offering no protocol flags (0) means
ALL_PROTOCOL = 0x001FFFFF
INTERNAL_FLAGS = 0x70000000  # MDS_* and a reserved bit: between MTA and library only
NO_REPLY_FLAGS = 0x000FF080  # every NR_* flag


class Stage(IntEnum):
    """SMFIM_*: the macro stages, indexes of the per-stage macro sets (EOH after EOM)."""

    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6


# The command whose macros a macro packet carries, for the stages libmilter keeps. Macro packets
# for other commands (Postfix sends them for headers, body chunks and unknown commands) are
# accepted and dropped, as libmilter does.
STAGE_OF_COMMAND = {
    SMFIC_CONNECT: Stage.CONNECT,
    SMFIC_HELO: Stage.HELO,
    SMFIC_MAIL: Stage.ENVFROM,
    SMFIC_RCPT: Stage.ENVRCPT,
    SMFIC_DATA: Stage.DATA,
    SMFIC_BODYEOB: Stage.EOM,
    SMFIC_EOH: Stage.EOH,
}
KNOWN_COMMANDS = frozenset(b"ABCDEHKLMNOQRTU")

FAMILY_UNKNOWN = "U"
FAMILY_UNIX = "L"
FAMILY_INET = "4"
FAMILY_INET6 = "6"

_U32 = struct.Struct(">I")
_OPTNEG = struct.Struct(">III")
_PORT = struct.Struct(">H")


class WireError(InputError):
    """A frame or payload no MTA can send; the conversation must end."""


def flag_names(flags: type[IntFlag], value: int) -> str:
    """``ADDHDRS|CHGHDRS`` for the flags set in ``value`` (for log lines)."""
    return "|".join(str(member.name) for member in flags if value & member) or "none"


def command_name(command: int) -> str:
    """``'M'`` for a printable command byte, ``0x00`` otherwise (for log lines)."""
    return f"'{chr(command)}'" if 0x21 <= command <= 0x7E else f"0x{command:02x}"


def frame(command: int, payload: bytes = b"") -> bytes:
    """One frame: length, command, payload."""
    return _U32.pack(len(payload) + 1) + bytes((command,)) + payload


def read_length(buffer: bytes | bytearray | memoryview, offset: int) -> int:
    """The frame length at ``offset`` (four bytes must be there)."""
    length: int = _U32.unpack_from(buffer, offset)[0]
    return length


def strings(payload: bytes, what: str) -> list[bytes]:
    """The NUL-terminated strings of ``payload``; the last one must be terminated."""
    if not payload or payload[-1] != 0:
        raise WireError(f"{what}: string not NUL-terminated: {quote(payload)}")
    return payload[:-1].split(b"\0")


def one_string(payload: bytes, what: str) -> bytes:
    """Exactly one NUL-terminated string."""
    parts = strings(payload, what)
    if len(parts) != 1:
        raise WireError(f"{what}: expected one string, got {len(parts)}: {quote(payload)}")
    return parts[0]


def decode_optneg(payload: bytes) -> tuple[int, int, int]:
    """(version, actions, protocol) offered by the MTA."""
    if len(payload) != _OPTNEG.size:
        raise WireError(f"option negotiation: {len(payload)} bytes instead of {_OPTNEG.size}")
    version, actions, protocol = _OPTNEG.unpack(payload)
    return version, actions, protocol


def encode_optneg(version: int, actions: int, protocol: int, lists: dict[Stage, bytes]) -> bytes:
    """Our option-negotiation reply, with the macro lists appended as libmilter does."""
    parts = [_OPTNEG.pack(version, actions, protocol)]
    for stage in sorted(lists):
        parts.append(_U32.pack(stage) + lists[stage] + b"\0")
    return frame(SMFIC_OPTNEG, b"".join(parts))


def decode_connect(payload: bytes) -> tuple[bytes, str, int, bytes]:
    """(host name, family, port, address) of the SMTP client.

    Family ``U`` (unknown) carries nothing after it; ``L`` (a local socket path), ``4`` and ``6``
    carry a port in network order and the address as a string.
    """
    end = payload.find(b"\0")
    if end < 0 or end + 1 >= len(payload):
        raise WireError(f"connect: no host name and family: {quote(payload)}")
    hostname, family = payload[:end], chr(payload[end + 1])
    rest = payload[end + 2 :]
    if family == FAMILY_UNKNOWN:
        if rest:
            raise WireError(f"connect: data after family 'U': {quote(rest)}")
        return hostname, family, 0, b""
    if family not in (FAMILY_UNIX, FAMILY_INET, FAMILY_INET6):
        raise WireError(f"connect: unknown address family {quote(family)}")
    if len(rest) < _PORT.size + 1:
        raise WireError(f"connect: no port and address: {quote(payload)}")
    port: int = _PORT.unpack_from(rest)[0]
    address = one_string(rest[_PORT.size :], "connect address")
    if family in (FAMILY_INET, FAMILY_INET6):
        _check_ip(address, family)
    return hostname, family, port, address


def _check_ip(address: bytes, family: str) -> None:
    text = address.decode("ascii", "replace")
    if family == FAMILY_INET6 and text[:5].lower() == "ipv6:":
        text = text[5:]  # Sendmail's form
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        raise WireError(f"connect: bad address {quote(address)}") from None
    if ip.version != (4 if family == FAMILY_INET else 6):
        raise WireError(f"connect: address {quote(address)} is not of family {family}")


def decode_header(payload: bytes) -> tuple[bytes, bytes]:
    """(name, value) of a header field."""
    parts = strings(payload, "header")
    if len(parts) != 2 or not parts[0]:
        raise WireError(f"header: expected a name and a value: {quote(payload)}")
    return parts[0], parts[1]


def decode_macros(payload: bytes, max_pairs: int, max_name: int) -> tuple[int, dict[bytes, bytes]]:
    """(command, {name: value}) of a macro packet; the first of repeated names wins.

    Names are keyed as :func:`macro_key` gives them, so ``{i}`` and ``i`` are one macro, as in
    libmilter's lookup. An odd number of strings is refused: libmilter reads past the end of
    its list on such a packet and crashes.
    """
    if not payload:
        raise WireError("macro packet without a command")
    command = payload[0]
    if command not in KNOWN_COMMANDS:
        raise WireError(f"macro packet for unknown command {command_name(command)}")
    if len(payload) == 1:
        return command, {}
    parts = strings(payload[1:], "macro packet")
    if len(parts) % 2:
        raise WireError(f"macro packet with an odd number of strings ({len(parts)})")
    if len(parts) // 2 > max_pairs:
        raise WireError(f"macro packet with {len(parts) // 2} macros (limit {max_pairs})")
    macros: dict[bytes, bytes] = {}
    for i in range(0, len(parts), 2):
        name = parts[i]
        if len(name) > max_name:
            raise WireError(f"macro name longer than {max_name} bytes: {quote(name)}")
        macros.setdefault(macro_key(name), parts[i + 1])
    return command, macros


def macro_key(name: bytes) -> bytes:
    """``{x}`` and ``x`` name the same one-character macro (libmilter's getsymval)."""
    if len(name) == 3 and name[0] == 0x7B and name[2] == 0x7D:  # {x}
        return name[1:2]
    return name


def text(value: bytes) -> str:
    """Bytes from the MTA as text: UTF-8, undecodable bytes kept as surrogates (round-trips)."""
    return value.decode("utf-8", "surrogateescape")


def to_bytes(value: str | bytes) -> bytes:
    """Text for the wire: UTF-8, surrogates from :func:`text` back to their bytes."""
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
