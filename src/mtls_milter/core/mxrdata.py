"""Client MX rdata: MX wire format, read strictly as RFC 3597 says.

Client MX is a record type dnspython does not know, so its rdata arrives as opaque bytes. A name
inside the rdata of a type unknown to the server is never compressed (RFC 3597 §4), so the rdata
must be a 16-bit preference followed by exactly one uncompressed domain name. A compression
pointer, a name that runs past the end of the rdata, a name longer than 255 bytes or bytes after
the name make the record unusable: :class:`MxRdataError`, which the resolver turns into
``permerror``. So does a label with a byte that no host name has: an exchange is a host name
(letters, digits, hyphen; underscore tolerated), compared with certificate names and written into
headers and logs. This module is pure: no I/O, no dnspython.
"""

from __future__ import annotations

from collections.abc import Sequence

from mtls_milter.core.quote import quote
from mtls_milter.errors import InputError

__all__ = ["MAX_NAME_WIRE", "MxRdataError", "decode_mx_rdata", "exchange_text"]

MAX_NAME_WIRE = 255  # RFC 1035 §2.3.4: a name is at most 255 bytes on the wire

# Bytes a host-name label may hold (RFC 952/1123 letters, digits, hyphen; underscore, which
# some operators use in names, is tolerated): anything else cannot match a certificate name.
_HOST_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class MxRdataError(InputError):
    """MX-format rdata that cannot be used; the message says what is wrong."""


def decode_mx_rdata(data: bytes) -> tuple[int, str]:
    """``(preference, exchange)`` of MX wire-format ``data``; :class:`MxRdataError` otherwise.

    The exchange is lower case without the trailing dot, ``"."`` for the root (null MX).
    """
    if len(data) < 3:
        raise MxRdataError(f"rdata too short ({len(data)} bytes, need at least 3)")
    preference = int.from_bytes(data[:2], "big")
    labels: list[bytes] = []
    offset = 2
    while True:
        if offset >= len(data):
            raise MxRdataError("exchange name truncated: it runs past the end of the rdata")
        length = data[offset]
        if length == 0:
            offset += 1
            break
        if length & 0xC0 == 0xC0:
            raise MxRdataError(
                f"compression pointer at byte {offset}: names in this record are never "
                "compressed (RFC 3597)"
            )
        if length & 0xC0:
            raise MxRdataError(f"unknown label type 0x{length & 0xC0:02x} at byte {offset}")
        label = data[offset + 1 : offset + 1 + length]
        if len(label) < length:
            raise MxRdataError("exchange name truncated: a label runs past the end of the rdata")
        labels.append(label)
        offset += 1 + length
        if offset - 2 >= MAX_NAME_WIRE:  # the root byte still has to follow
            raise MxRdataError(f"exchange name longer than {MAX_NAME_WIRE} bytes")
    if offset != len(data):
        raise MxRdataError(f"{len(data) - offset} trailing bytes after the exchange name")
    return preference, exchange_text(labels)


def exchange_text(labels: Sequence[bytes]) -> str:
    """The labels (without the empty root label) as a lower-case host name, ``"."`` if none.

    :class:`MxRdataError` when a label holds a byte no host name has.
    """
    if not labels:
        return "."
    for label in labels:
        if not label or not _HOST_NAME_BYTES.issuperset(label):
            shown = b".".join(labels).decode("latin-1")
            raise MxRdataError(f"exchange {quote(shown)} is not a host name")
    return b".".join(labels).decode("ascii").lower()
