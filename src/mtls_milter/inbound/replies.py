"""Answers to events: a final action, an optional SMTP reply text, end-of-message modifications.

Everything here is checked when built, so a bad answer is a ``ValueError`` in the code that
builds it, never a frame the MTA refuses. The encodings are libmilter's (``smfi_setreply``,
``smfi_setmlreply``, ``smfi_addheader``, ``smfi_insheader``, ``smfi_chgheader``,
``smfi_quarantine``) with one deliberate difference: ``%`` in a reply text is sent doubled,
because Sendmail uses the text as a format string and Postfix undoes the doubling.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import Enum

from .wire import (
    MAX_DATA_SIZE_64K,
    SMFIR_ACCEPT,
    SMFIR_ADDHEADER,
    SMFIR_CHGHEADER,
    SMFIR_CONTINUE,
    SMFIR_DISCARD,
    SMFIR_INSHEADER,
    SMFIR_QUARANTINE,
    SMFIR_REJECT,
    SMFIR_REPLYCODE,
    SMFIR_SKIP,
    SMFIR_TEMPFAIL,
    ActionFlag,
    frame,
    to_bytes,
)

MAX_REPLY_LINE = 980  # libmilter's MAXREPLYLEN
MAX_REPLY_LINES = 32  # libmilter's MAXREPLIES
MAX_INDEX = 2**31 - 1

_CODE = re.compile(r"[45][0-9][0-9]")
_XCODE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # printable ASCII except ':'
_U32 = struct.Struct(">I")


class Action(Enum):
    """The final answer to a command (its reply byte)."""

    CONTINUE = SMFIR_CONTINUE
    ACCEPT = SMFIR_ACCEPT
    REJECT = SMFIR_REJECT
    TEMPFAIL = SMFIR_TEMPFAIL
    DISCARD = SMFIR_DISCARD
    SKIP = SMFIR_SKIP  # body chunks only, when the MTA offered it


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """The SMTP reply the MTA gives for a reject or tempfail (``smfi_setreply``/``setmlreply``)."""

    code: str  # 4xx or 5xx
    xcode: str | None = None  # enhanced status code, same class as code
    lines: tuple[str, ...] = ()  # reply text, one entry per line (at most 32)

    def __post_init__(self) -> None:
        if not _CODE.fullmatch(self.code):
            raise ValueError(f"reply code must be 4xx or 5xx, not {self.code!r}")
        if self.xcode is not None and (
            not _XCODE.fullmatch(self.xcode) or self.xcode[0] != self.code[0]
        ):
            raise ValueError(f"bad enhanced status code {self.xcode!r} for {self.code}")
        if len(self.lines) > MAX_REPLY_LINES:
            raise ValueError(f"{len(self.lines)} reply lines (at most {MAX_REPLY_LINES})")
        for line in self.lines:
            if len(line) > MAX_REPLY_LINE or any(not " " <= c <= "~" for c in line):
                raise ValueError(f"reply text must be printable ASCII, ≤ 980: {line[:80]!r}")

    @classmethod
    def of(cls, code: str, xcode: str | None = None, text: str = "") -> SmtpReply:
        """A one-line reply (``text`` may be empty)."""
        return cls(code, xcode, (text,) if text else ())

    def encode(self) -> bytes:
        """The SMFIR_REPLYCODE payload (without its NUL)."""
        lines = [line.replace("%", "%%") for line in self.lines]
        if len(lines) <= 1:  # smfi_setreply: "code " then "xcode", " " and text as given
            rest = [*([self.xcode] if self.xcode else []), *lines]
            return f"{self.code} {' '.join(rest)}".encode("ascii")
        xcode = self.xcode or f"{self.code[0]}.0.0"  # smfi_setmlreply's default
        out = [
            f"{self.code}{'-' if i < len(lines) - 1 else ' '}{xcode} {line}"
            for i, line in enumerate(lines)
        ]
        return "\r\n".join(out).encode("ascii")


@dataclass(frozen=True, slots=True)
class AddHeader:
    """Append a header field (``smfi_addheader``)."""

    name: str | bytes
    value: str | bytes


@dataclass(frozen=True, slots=True)
class InsertHeader:
    """Insert a header field before the ``index``-th (0: at the top; ``smfi_insheader``)."""

    index: int
    name: str | bytes
    value: str | bytes


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Change the ``index``-th (from 1) field called ``name``; an empty value deletes it."""

    name: str | bytes
    index: int
    value: str | bytes = b""


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Put the message on hold with ``reason`` (``smfi_quarantine``)."""

    reason: str | bytes


Modification = AddHeader | InsertHeader | ChangeHeader | Quarantine


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to one event."""

    action: Action = Action.CONTINUE
    smtp: SmtpReply | None = None  # REJECT/TEMPFAIL only, class matching the action
    modifications: tuple[Modification, ...] = ()  # end of message only, sent before the action
    wire: bytes = field(init=False, repr=False, compare=False)  # every frame, in order
    needs: int = field(init=False, repr=False, compare=False)  # SMFIF_* the modifications need

    def __post_init__(self) -> None:
        if self.smtp is not None:
            wanted = {Action.REJECT: "5", Action.TEMPFAIL: "4"}.get(self.action)
            if wanted != self.smtp.code[0]:
                raise ValueError(f"an SMTP reply {self.smtp.code} cannot go with {self.action}")
        # Encoded once (raising ValueError when something cannot be sent): answers are usually
        # module constants, so sending one costs a lookup.
        frames = [encode_modification(m) for m in self.modifications]
        if self.smtp is not None:
            frames.append(frame(SMFIR_REPLYCODE, self.smtp.encode() + b"\0"))
        else:
            frames.append(frame(self.action.value))
        object.__setattr__(self, "wire", b"".join(frames))
        needs = 0
        for modification in self.modifications:
            needs |= _FLAG[type(modification)]
        object.__setattr__(self, "needs", needs)

    @classmethod
    def reject(cls, code: str = "550", xcode: str | None = None, text: str = "") -> Reply:
        """Reject, with an SMTP reply when ``xcode`` or ``text`` is given (or code ≠ 550)."""
        plain = code == "550" and xcode is None and not text
        return cls(Action.REJECT, None if plain else SmtpReply.of(code, xcode, text))

    @classmethod
    def tempfail(cls, code: str = "451", xcode: str | None = None, text: str = "") -> Reply:
        """Temporary failure, with an SMTP reply when ``xcode`` or ``text`` is given."""
        plain = code == "451" and xcode is None and not text
        return cls(Action.TEMPFAIL, None if plain else SmtpReply.of(code, xcode, text))

    def encode(self) -> bytes:
        """Every frame of this answer, in order."""
        return self.wire


CONTINUE = Reply()
ACCEPT = Reply(Action.ACCEPT)
DISCARD = Reply(Action.DISCARD)
SKIP = Reply(Action.SKIP)
REJECT = Reply(Action.REJECT)
TEMPFAIL = Reply(Action.TEMPFAIL)

_FLAG: dict[type, int] = {
    AddHeader: ActionFlag.ADDHDRS,
    InsertHeader: ActionFlag.ADDHDRS,
    ChangeHeader: ActionFlag.CHGHDRS,
    Quarantine: ActionFlag.QUARANTINE,
}


def encode_modification(modification: Modification) -> bytes:
    """One modification frame; ValueError when libmilter or the MTA would refuse it."""
    if isinstance(modification, Quarantine):
        reason = to_bytes(modification.reason)
        if not reason or b"\0" in reason:
            raise ValueError("a quarantine reason must be non-empty, without NUL")
        return _checked(frame(SMFIR_QUARANTINE, reason + b"\0"))
    name, value = to_bytes(modification.name), to_bytes(modification.value)
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"bad header name {name[:80]!r}")
    if b"\0" in value:
        raise ValueError("a header value cannot contain NUL")
    strings = name + b"\0" + value + b"\0"
    if isinstance(modification, AddHeader):
        return _checked(frame(SMFIR_ADDHEADER, strings))
    if not 0 <= modification.index <= MAX_INDEX:
        raise ValueError(f"header index {modification.index} out of range")
    command = SMFIR_INSHEADER if isinstance(modification, InsertHeader) else SMFIR_CHGHEADER
    return _checked(frame(command, _U32.pack(modification.index) + strings))


def _checked(data: bytes) -> bytes:
    if len(data) - 5 > MAX_DATA_SIZE_64K:  # libmilter's own limit on what it writes
        raise ValueError(f"modification of {len(data) - 5} bytes exceeds {MAX_DATA_SIZE_64K}")
    return data
