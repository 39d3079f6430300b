"""Netstrings (``LEN:payload,``) as Postfix's socketmap protocol uses them.

:class:`NetstringReader` is an incremental parser in the style of :class:`ssl.MemoryBIO`: feed it
whatever bytes a read returned, in any split, and take out the complete payloads. It never
buffers more than one payload of the configured maximum plus the length prefix, and it fails
for good on the first framing error (after which the byte stream has no boundaries left to trust):
the caller answers ``PERM`` and closes the connection.
"""

from __future__ import annotations

__all__ = ["NetstringError", "NetstringReader", "encode"]


class NetstringError(ValueError):
    """The byte stream is not a sequence of netstrings (or one is too long)."""


def encode(payload: bytes) -> bytes:
    """``payload`` as one netstring."""
    return b"%d:%s," % (len(payload), payload)


class NetstringReader:
    """Incremental netstring decoder: :meth:`feed` bytes, then :meth:`next_payload` until None."""

    __slots__ = ("_buffer", "_error", "_length", "_max_digits", "max_length")

    def __init__(self, max_length: int) -> None:
        """Payloads longer than ``max_length`` bytes are an error."""
        self.max_length = max_length
        self._max_digits = len(str(max_length))
        self._buffer = bytearray()
        self._length: int | None = None  # parsed length of the payload being read
        self._error: NetstringError | None = None

    def feed(self, data: bytes) -> None:
        """Add received bytes (any amount, any split)."""
        if self._error is None:
            self._buffer += data

    @property
    def pending(self) -> bool:
        """True when bytes of an incomplete netstring are buffered (EOF now means truncation)."""
        return self._length is not None or bool(self._buffer)

    def next_payload(self) -> bytes | None:
        """The next complete payload, or None when more bytes are needed.

        Raises :class:`NetstringError` on a framing error, and again on every later call.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except NetstringError as exc:
            self._error = exc
            self._buffer.clear()
            raise

    def _next(self) -> bytes | None:
        buffer = self._buffer
        if self._length is None:
            colon = buffer.find(b":", 0, self._max_digits + 1)
            if colon < 0:
                digits = bytes(buffer[: self._max_digits + 1])
                if not digits.isdigit() and digits:
                    raise NetstringError(f"netstring length is not a number: {_show(digits)}")
                if len(digits) > self._max_digits:
                    raise NetstringError(f"netstring longer than {self.max_length} bytes")
                return None
            digits = bytes(buffer[:colon])
            if not digits.isdigit():  # also rejects "", "+5", " 5" and non-ASCII digits
                raise NetstringError(f"netstring length is not a number: {_show(digits)}")
            length = int(digits)
            if length > self.max_length:
                raise NetstringError(
                    f"netstring of {length} bytes is longer than {self.max_length}"
                )
            del buffer[: colon + 1]
            self._length = length
        length = self._length
        if len(buffer) < length + 1:
            return None
        if buffer[length] != ord(","):
            raise NetstringError("netstring not terminated by ','")
        payload = bytes(buffer[:length])
        del buffer[: length + 1]
        self._length = None
        return payload


def _show(data: bytes) -> str:
    """A short printable rendering of hostile bytes for an error message."""
    text = data[:16].decode("ascii", "backslashreplace")
    return repr("".join(c if c.isprintable() else "?" for c in text))
