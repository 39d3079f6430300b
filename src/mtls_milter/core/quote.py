"""Quoting outside data for reasons and log lines.

Anything that came from outside (a MAIL FROM, a macro, a DNS record, a certificate field, a
request line) may be huge or contain control characters. Reasons and log lines carry at most
:data:`MAX_QUOTE` characters of it, in ``repr`` form so control characters stay visible and a
log line can never be split or forged.
"""

from __future__ import annotations

MAX_QUOTE = 200


def clip(value: str | bytes, limit: int = MAX_QUOTE) -> str:
    """``value`` as printable text, cut to ``limit`` characters (with ``...`` when cut)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = value.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in text)
    if len(text) <= limit:
        return text
    return text[: max(limit - 3, 0)] + "..."


def quote(value: str | bytes, limit: int = MAX_QUOTE) -> str:
    """``value`` clipped and in single quotes, for embedding in a reason or log line."""
    return "'" + clip(value, limit).replace("'", "\\'") + "'"
