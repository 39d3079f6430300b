"""Quoting outside data for reasons and log lines.

Anything that came from outside (a MAIL FROM, a macro, a DNS record, a certificate field, a
request line) may be huge or contain control characters. Reasons and log lines carry at most
:data:`MAX_QUOTE` characters of it, in ``repr``-like form so control characters stay visible and a
log line can never be split or forged: a backslash in the data is doubled, so ``\\x00`` in a
quote is always an escape and ``\\'`` never ends one.
"""

from __future__ import annotations

MAX_QUOTE = 200
_ELLIPSIS = "..."


_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    if " " <= char <= "~":
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def clip(value: str | bytes, limit: int = MAX_QUOTE) -> str:
    """``value`` as printable ASCII, cut to ``limit`` characters (with ``...`` when cut)."""
    # Every character escapes to at least one, so only the first limit + 1 can show; cutting
    # first keeps a huge value cheap (4 bytes per character at most in UTF-8).
    if isinstance(value, bytes):
        value = value[: 4 * (limit + 1)].decode("utf-8", "surrogateescape")
    text = "".join(_escape(c) for c in value[: limit + 1])
    if len(text) <= limit:
        return text
    return text[: max(limit - len(_ELLIPSIS), 0)] + _ELLIPSIS


def quote(value: str | bytes, limit: int = MAX_QUOTE) -> str:
    """``value`` clipped and in single quotes, for embedding in a reason or log line."""
    return "'" + clip(value, limit).replace("'", "\\'") + "'"
