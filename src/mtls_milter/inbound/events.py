"""What the protocol core reports: one typed event per MTA command, with the macros visible then.

Values stay bytes, exactly as the MTA sent them; :func:`~mtls_milter.inbound.wire.text` decodes
them with ``surrogateescape`` when text is wanted (and round-trips). Every event carries a
:class:`Macros` snapshot and ``needs_reply``: whether the core waits for an answer to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .wire import Stage, macro_key, text

_Slots = tuple[dict[bytes, bytes] | None, ...]
_NO_SLOTS: _Slots = (None,) * len(Stage)


class Macros:
    """The macros visible at one point of a conversation, looked up as libmilter does.

    There is one set per stage (connect, HELO, MAIL, RCPT, DATA, end of message, end of
    headers); a macro packet replaces its stage's set, and a new connect, HELO, MAIL or RCPT
    clears the later stages' sets. A lookup searches the sets from the last stage (end of
    headers) back to connect, so earlier stages' values stay visible later and a later stage's
    value of the same name wins. ``{x}`` and ``x`` are the same one-character macro.
    """

    __slots__ = ("_slots",)

    def __init__(self, slots: _Slots = _NO_SLOTS) -> None:
        self._slots = slots  # the sets are never changed after creation: snapshots are cheap

    def get(self, name: str | bytes) -> bytes | None:
        """The value (``b""`` when sent empty), or None when not sent."""
        raw = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
        if not raw:
            return None
        key = macro_key(raw)
        for stage in reversed(self._slots):
            if stage is not None:
                value = stage.get(key)
                if value is not None:
                    return value
        return None

    def text(self, name: str | bytes) -> str | None:
        """:meth:`get` decoded with ``surrogateescape``."""
        value = self.get(name)
        return None if value is None else text(value)

    def texts(self, wanted: tuple[tuple[str, bytes], ...]) -> dict[str, str | None]:
        """``{name: text or None}`` for (name, :func:`~.wire.macro_key` of it) pairs: one pass
        over the sets for several names (the same values as :meth:`text` for each)."""
        found: dict[str, str | None] = dict.fromkeys(name for name, _ in wanted)
        missing = list(wanted)
        for stage in reversed(self._slots):
            if stage is None or not missing:
                continue
            left = []
            for name, key in missing:
                value = stage.get(key)
                if value is None:
                    left.append((name, key))
                else:
                    found[name] = text(value)
            missing = left
        return found

    def stage(self, stage: Stage) -> dict[bytes, bytes]:
        """A copy of one stage's set (names as keyed: ``{x}`` shown as ``x``)."""
        current = self._slots[stage]
        return dict(current) if current is not None else {}

    def names(self) -> Iterator[bytes]:
        """Every visible name, once."""
        seen: set[bytes] = set()
        for stage in reversed(self._slots):
            for key in stage or ():
                if key not in seen:
                    seen.add(key)
                    yield key

    def __repr__(self) -> str:
        return f"Macros({ {k: self.get(k) for k in self.names()}!r})"


NO_MACROS = Macros()


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every event."""

    macros: Macros = field(default=NO_MACROS, kw_only=True, repr=False, compare=False)
    needs_reply: bool = field(default=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class Negotiate(Event):
    """Options were negotiated (the core answered the MTA itself, from its options)."""

    mta_version: int
    mta_actions: int
    mta_protocol: int
    version: int  # agreed
    actions: int  # what we may do
    protocol: int  # what we told the MTA (steps not sent, replies not expected)
    max_data_size: int  # payload limit each way


@dataclass(frozen=True, slots=True)
class Connect(Event):
    hostname: bytes
    family: str  # "4", "6", "L" (local socket) or "U" (unknown)
    port: int
    address: bytes  # as sent (b"" for family "U")


@dataclass(frozen=True, slots=True)
class Helo(Event):
    name: bytes


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    address: bytes  # as sent, e.g. b"<a@example.com>"
    args: tuple[bytes, ...] = ()  # ESMTP parameters


@dataclass(frozen=True, slots=True)
class Rcpt(Event):
    address: bytes
    args: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Data(Event):
    pass


@dataclass(frozen=True, slots=True)
class Header(Event):
    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class EndOfHeaders(Event):
    pass


@dataclass(frozen=True, slots=True)
class Body(Event):
    chunk: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage(Event):
    """End of message; header actions and quarantine may be sent with the answer."""

    chunk: bytes = b""  # a last body chunk, when the MTA sends one with the end


@dataclass(frozen=True, slots=True)
class Abort(Event):
    """The transaction ends without end of message (also sent when the conversation breaks)."""


@dataclass(frozen=True, slots=True)
class Unknown(Event):
    command: bytes  # the SMTP command line the MTA did not know


@dataclass(frozen=True, slots=True)
class Quit(Event):
    pass


@dataclass(frozen=True, slots=True)
class QuitNewConnection(Event):
    """Quit, but the MTA reuses the milter connection: a new Connect follows."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The conversation is over (always the last event, once, whatever the reason)."""

    reason: str  # "quit", "eof" or what was wrong, already quoted
    error: bool = False  # True when a protocol violation or a limit ended it
