"""The pymilter adapter: libmilter callbacks in, :class:`~.session.MilterSession` outcomes out.

The product's decisions live in :mod:`.session`; this class only translates. libmilter hands
MAIL FROM and header values over as bytes, decoded here with ``surrogateescape``; pymilter
decodes macro values as strict UTF-8 itself, so a value that is not UTF-8 is logged (quoted) and
taken as not sent. Every callback is guarded: an exception never reaches libmilter.
"""

from __future__ import annotations

import logging
from typing import Any

import Milter

from mtls_milter.core.quote import quote
from mtls_milter.inbound.degraded import note_mta_actions
from mtls_milter.inbound.guard import guarded
from mtls_milter.inbound.session import (
    ENVFROM_MACROS,
    EOM_MACROS,
    HELO_MACROS,
    EngineHolder,
    MilterSession,
    Outcome,
    side_effect,
)
from mtls_milter.inbound.session_dmarc import wants_body

__all__ = ["ENVFROM_MACROS", "EOM_MACROS", "HELO_MACROS", "EngineHolder", "MtlsMilter"]

log = logging.getLogger("mtls_milter")

# libmilter's return codes, typed (pymilter is untyped).
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL
ALL_OPTS: int = Milter.ALL_OPTS
ADDHDRS: int = Milter.ADDHDRS
CHGHDRS: int = Milter.CHGHDRS
SETSYMLIST: int = Milter.SETSYMLIST
QUARANTINE: int = Milter.QUARANTINE
P_NOBODY: int = Milter.P_NOBODY
_CODES = {"continue": CONTINUE, "accept": ACCEPT, "reject": REJECT, "tempfail": TEMPFAIL}


class MtlsMilter(Milter.Base):  # type: ignore[misc]
    """One instance per SMTP connection (pymilter's factory creates it)."""

    def __init__(self, session: MilterSession) -> None:
        self.session = session

    @guarded(ALL_OPTS)
    def negotiate(self, opts: list[int]) -> int:
        mta_protocol = int(opts[1])
        status: int = super().negotiate(opts)
        if status != CONTINUE:
            return status
        if not wants_body(self.session.config):  # the body only for DKIM verified here
            opts[1] = self._protocol = int(opts[1]) | (mta_protocol & P_NOBODY)
        offered = int(opts[0])  # the actions the MTA allows; we ask for all of them
        note_mta_actions(
            self.session,
            add_headers=bool(offered & ADDHDRS),
            change_headers=bool(offered & CHGHDRS),
            symlist=bool(offered & SETSYMLIST),
        )
        if not offered & SETSYMLIST:
            return status
        # pymilter 1.0.5's own setsymlist fails on Python 3 (bytes vs str); calling the context
        # directly with one space-separated string works.
        for stage, names in (
            (Milter.M_HELO, HELO_MACROS),
            (Milter.M_ENVFROM, ENVFROM_MACROS),
            (Milter.M_EOM, EOM_MACROS),
        ):
            self._ctx.setsymlist(stage, " ".join(names))
        return status

    @guarded(CONTINUE)
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        address = port = ""
        if isinstance(hostaddr, tuple) and len(hostaddr) >= 2:
            address, port = str(hostaddr[0]), str(hostaddr[1])
        return self._answer(self.session.connect(address, port))

    @guarded(CONTINUE)
    def hello(self, heloname: str) -> int:
        return self._answer(self.session.helo(heloname or "", self._read_macros(HELO_MACROS)))

    @guarded(CONTINUE)
    def envfrom_bytes(self, *args: bytes) -> int:
        mailfrom, *params = (_text(arg) for arg in args) if args else ("",)
        return self.envfrom(mailfrom, *params)

    @guarded(CONTINUE)
    def header_bytes(self, name: str, value: bytes) -> int:
        return self.header(name, _text(value))

    @guarded(CONTINUE)
    def envfrom(self, mailfrom: str, *params: str) -> int:
        macros = self._read_macros(ENVFROM_MACROS)
        return self._answer(self.session.mail(mailfrom or "", macros))

    @guarded(CONTINUE)
    def data(self) -> int:
        # Not a no-op: without this callback pymilter negotiates SMFIP_NODATA, and Postfix then
        # sends the DATA macros with no command after them. The milter never answers that
        # packet, so the kernel delays its ACK (~40 ms) and Postfix's next small write (the
        # first header, from cleanup) waits for it under Nagle: a ~40 ms stall per message
        # over inet: that the milter's own TCP_NODELAY cannot remove. With the DATA command
        # negotiated, the milter's reply acknowledges it at once.
        return self._answer(self.session.data())

    @guarded(CONTINUE)
    def header(self, name: str, value: str) -> int:
        return self._answer(self.session.header(name, value))

    @guarded(CONTINUE)
    def body(self, chunk: bytes) -> int:
        return self._answer(self.session.body(bytes(chunk)))

    @guarded(CONTINUE)
    def eoh(self) -> int:
        # Not a no-op either: without this callback pymilter negotiates SMFIP_NOEOH, and then
        # libmilter drops the end of a message that had no header field at all (DATA straight to
        # end of message, as Sendmail sends it): the MTA waits for its milter timeout and
        # delivers the message without our field. With end of headers negotiated it does not.
        return CONTINUE

    @guarded(ACCEPT)
    def eom(self) -> int:
        outcome = self.session.eom(self._read_macros(EOM_MACROS))
        if outcome.reply is not None:
            # Without our text the MTA still refuses, with its own default reply.
            side_effect("setting the SMTP reply", self.setreply, *outcome.reply)
        if outcome.headers:
            side_effect("rewriting the header fields", self._apply_headers, outcome)
        if outcome.quarantine:  # needs QUARANTINE at registration (DMARC on at start)
            side_effect("quarantining the message", self.quarantine, outcome.quarantine)
        return self._answer(outcome)

    @guarded(CONTINUE)
    def abort(self) -> int:
        return self._answer(self.session.abort())

    @guarded(CONTINUE)
    def close(self) -> int:
        return self._answer(self.session.close())

    def _apply_headers(self, outcome: Outcome) -> None:
        for change in outcome.headers:
            if change.delete:
                self.chgheader(change.name, change.index, "")
            else:
                self.addheader(change.name, change.value, change.index)

    @staticmethod
    def _answer(outcome: Outcome) -> int:
        return _CODES[outcome.action]

    def _read_macros(self, names: tuple[str, ...]) -> dict[str, str | None]:
        """Each macro's value; None when not sent or unreadable (one log line each)."""
        macros: dict[str, str | None] = {}
        for name in names:
            try:
                value = self.getsymval(name)
            except UnicodeDecodeError as exc:  # pymilter decodes macro values as strict UTF-8
                raw = exc.object if isinstance(exc.object, bytes) else b""
                log.warning(
                    "client=%s: macro %s is not UTF-8, taken as not sent: %s",
                    self.session.client_addr,
                    name,
                    quote(raw),
                )
                value = None
            except Exception as exc:
                log.warning("macro %s unreadable, taken as not sent: %s", name, quote(str(exc)))
                value = None
            macros[name] = value if isinstance(value, str) or value is None else str(value)
        return macros


def _text(raw: bytes | str) -> str:
    """An envelope or header value as text: UTF-8, other bytes kept as surrogate escapes."""
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "surrogateescape")
    return raw
