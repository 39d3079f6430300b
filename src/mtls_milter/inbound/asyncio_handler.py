"""The asyncio adapter: the protocol core's events in, :class:`~.session.MilterSession` outcomes
out as :class:`~.replies.Reply` values.

Every step but end of message only looks at memory or starts work in the pool, so it runs on
the loop; end of message may wait for the Client MX lookup and a chain fetch, so when it may
(:meth:`~.session.MilterSession.eom_may_block`) it runs in a worker thread of its own pool
(``loop.run_in_executor``) and the loop keeps serving the other connections; with the answer at
hand (a warm DNS cache, no chain to fetch) it runs on the loop, which costs less than the hop.
Everything the loop can answer at once goes through ``on_event_now``, called by the stream in
its read callback (no task per event).
The options ask the MTA for what the decisions need: header actions, the macro
lists per stage, and the DATA and end-of-headers steps (docs/design.md "Milter transports");
RCPT and unknown commands are not sent at all, the body only for DKIM verified here
(DMARC).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace

from mtls_milter.config import Config
from mtls_milter.core.quote import quote

from . import events as ev
from .asyncio_stream import LATER, Later
from .degraded import note_mta_actions
from .events import Macros
from .negotiation import MilterOptions
from .replies import (
    ACCEPT,
    CONTINUE,
    Action,
    ChangeHeader,
    InsertHeader,
    Modification,
    Quarantine,
    Reply,
    SmtpReply,
)
from .session import ENVFROM_MACROS, EOM_MACROS, HELO_MACROS, MilterSession, Outcome
from .session_dmarc import wants_body
from .wire import ActionFlag, ProtocolFlag, Stage, macro_key, text

log = logging.getLogger("mtls_milter")

# Steps the decisions do not use are not sent; DATA and end of headers are kept (see the
# pymilter adapter's data() and eoh() for what goes wrong without them).
PROTOCOL = ProtocolFlag.NORCPT | ProtocolFlag.NOBODY | ProtocolFlag.NOUNKNOWN
# On a unix socket the steps before end of message are not answered at all ("no reply"): the
# MTA writes the next command at once and the conversation costs two round trips instead of
# ten. Only the answer at end of message changes anything (see MilterSession: what connect and
# MAIL FROM decide is answered there). Over TCP they are not asked for: the MTA's next small
# write would wait under Nagle for our delayed ACK (~40 ms per message, docs/performance.md).
NO_REPLY = (
    ProtocolFlag.NR_CONN
    | ProtocolFlag.NR_HELO
    | ProtocolFlag.NR_MAIL
    | ProtocolFlag.NR_RCPT
    | ProtocolFlag.NR_DATA
    | ProtocolFlag.NR_HDR
    | ProtocolFlag.NR_EOH
    | ProtocolFlag.NR_BODY
    | ProtocolFlag.NR_UNKN
)
OPTIONS = MilterOptions(
    actions=int(ActionFlag.ADDHDRS | ActionFlag.CHGHDRS),
    protocol=int(PROTOCOL),
    macros={Stage.HELO: HELO_MACROS, Stage.ENVFROM: ENVFROM_MACROS, Stage.EOM: EOM_MACROS},
)
_UNIX_OPTIONS = replace(OPTIONS, protocol=int(PROTOCOL | NO_REPLY))


def options_for(config: Config) -> MilterOptions:
    """The options for a new MTA connection: "no reply" steps on a unix socket; with DMARC on,
    the quarantine action too, and the body when DKIM is verified here (docs/dmarc.md)."""
    unix = config.milter.socket.startswith(("unix:", "local:"))
    base = _UNIX_OPTIONS if unix else OPTIONS
    if not config.dmarc.enabled:
        return base
    protocol = base.protocol & ~ProtocolFlag.NOBODY if wants_body(config) else base.protocol
    return replace(base, actions=base.actions | int(ActionFlag.QUARANTINE), protocol=int(protocol))


_ACTIONS = {"continue": Action.CONTINUE, "accept": Action.ACCEPT}


class SessionHandler:
    """A :class:`~.asyncio_stream.MilterHandler` for one MTA connection."""

    def __init__(self, session: MilterSession, eom_executor: Executor) -> None:
        self.session = session
        session.log_after_answer = True  # answered() logs once the answer is on its way
        self._eom_executor = eom_executor
        self._actions = ~0  # what the MTA agreed to (Negotiate); modifications beyond are dropped

    async def on_event(self, event: ev.Event) -> Reply | None:
        if isinstance(event, ev.EndOfMessage):
            self._end_chunk(event)
            macros = _values(event.macros, EOM_MACROS)
            loop = asyncio.get_running_loop()
            outcome = await loop.run_in_executor(self._eom_executor, self.session.eom, macros)
            return self._agreed(_reply(outcome))
        answer = self.on_event_now(event)
        return None if answer is LATER else answer  # type: ignore[return-value]

    def on_event_now(self, event: ev.Event) -> Reply | Later | None:
        """The answer without awaiting; :data:`LATER` for an end of message that may wait (a
        thread hop costs more than computing an answer at hand, so only then)."""
        session = self.session
        kind = type(event)
        if kind is ev.Header:
            assert isinstance(event, ev.Header)
            return _reply(session.header(text(event.name), text(event.value)))
        if kind is ev.EndOfMessage:
            if session.eom_may_block():
                return LATER
            assert isinstance(event, ev.EndOfMessage)
            self._end_chunk(event)
            return self._agreed(_reply(session.eom(_values(event.macros, EOM_MACROS))))
        if kind is ev.MailFrom:
            assert isinstance(event, ev.MailFrom)
            macros = _values(event.macros, ENVFROM_MACROS)
            return _reply(session.mail(text(event.address), macros))
        if kind is ev.Body:
            assert isinstance(event, ev.Body)
            return _reply(session.body(event.chunk))
        if kind is ev.Data:
            return _reply(session.data())
        if kind is ev.Helo:
            assert isinstance(event, ev.Helo)
            return _reply(session.helo(text(event.name), _values(event.macros, HELO_MACROS)))
        if kind is ev.Connect:
            assert isinstance(event, ev.Connect)
            internet = event.family in ("4", "6")
            address = text(event.address) if internet else ""
            return _reply(session.connect(address, str(event.port) if internet else ""))
        if kind is ev.Negotiate:
            assert isinstance(event, ev.Negotiate)
            self._negotiated(event)
        elif kind is ev.Abort:
            session.abort()
        elif kind is ev.ConnectionClosed or kind is ev.QuitNewConnection:
            session.close()
        return None

    def answered(self) -> None:
        """The stream wrote our answers: the verdict line of an end of message now."""
        self.session.answered()

    def _end_chunk(self, event: ev.EndOfMessage) -> None:
        if event.chunk:
            self.session.body(event.chunk)

    def _negotiated(self, event: ev.Negotiate) -> None:
        self._actions = event.actions
        note_mta_actions(
            self.session,
            add_headers=bool(event.actions & ActionFlag.ADDHDRS),
            change_headers=bool(event.actions & ActionFlag.CHGHDRS),
            symlist=bool(event.actions & ActionFlag.SETSYMLIST),
        )

    def _agreed(self, reply: Reply) -> Reply:
        """``reply`` without the modifications the MTA did not agree to (a quarantine without
        QUARANTINE...), logged; the decision itself stands."""
        if not reply.needs & ~self._actions:
            return reply
        kept = tuple(
            m for m in reply.modifications if not Reply(modifications=(m,)).needs & ~self._actions
        )
        log.warning("the MTA did not agree to %s; the decision stands", quote(repr(reply)))
        return Reply(reply.action, reply.smtp, kept)


def handler_factory(
    make_session: Callable[[], MilterSession], eom_executor: Executor
) -> Callable[[str], SessionHandler]:
    """A factory for :class:`~.asyncio_driver.MilterServer`: one session per MTA connection."""
    return lambda peer: SessionHandler(make_session(), eom_executor)


def _keyed(names: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    return tuple((name, macro_key(name.encode())) for name in names)


_KEYS: dict[tuple[str, ...], tuple[tuple[str, bytes], ...]] = {
    names: _keyed(names) for names in (HELO_MACROS, ENVFROM_MACROS, EOM_MACROS)
}


def _values(macros: Macros, names: tuple[str, ...]) -> dict[str, str | None]:
    return macros.texts(_KEYS.get(names) or _keyed(names))


def _reply(outcome: Outcome) -> Reply:
    """The protocol answer for an outcome; header changes that cannot be sent are logged and
    left out, never changing the answer."""
    if not outcome.headers and outcome.reply is None and not outcome.quarantine:
        return ACCEPT if outcome.action == "accept" else CONTINUE
    changes: tuple[Modification, ...] = tuple(
        ChangeHeader(c.name, c.index, "") if c.delete else InsertHeader(c.index, c.name, c.value)
        for c in outcome.headers
    )
    if outcome.quarantine:
        changes += (Quarantine(outcome.quarantine),)
    action = _ACTIONS.get(outcome.action) or (
        Action.REJECT if outcome.action == "reject" else Action.TEMPFAIL
    )
    smtp = SmtpReply.of(*outcome.reply) if outcome.reply is not None else None
    try:
        return Reply(action, smtp, changes)
    except ValueError as exc:
        log.error("rewriting the header fields failed; the decision stands: %s", quote(str(exc)))
        return Reply(action, smtp)
