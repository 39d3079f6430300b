"""The product's milter decisions, once, for both transports (docs/design.md "Milter transports").

:class:`MilterSession` is one MTA connection: connect, HELO, MAIL FROM, DATA, header fields, end
of message, abort and close, each taking already-decoded values (bytes decoded with
``surrogateescape`` by the transport) and macros as a mapping, and answering an :class:`Outcome`:
continue, accept, reject or tempfail with reply text, plus the header changes to apply. The
pymilter adapter (:mod:`.milter`) and the asyncio adapter (:mod:`.asyncio_handler`) only
translate. Every method is guarded: an exception is logged and answered with a fixed outcome,
mail is never lost.

Connection state (client address, HELO, TLS macros) lives in :class:`_Connection`; transaction
state (MAIL FROM … end of message) in :class:`Transaction`, reset at every MAIL FROM and on abort.
At end of message the order is: decide (verdict and action), then the outcome (answer, reply
text, header changes), then the log line. Only :meth:`MilterSession.eom` may block (it waits for
the Client MX lookup started at MAIL FROM and for a chain fetch); the asyncio adapter runs it in
a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

from mtls_milter.config import Config
from mtls_milter.core.decisions import action_for
from mtls_milter.core.dmarc_message import DmarcOutcome
from mtls_milter.core.evaluate import Result, Verdict
from mtls_milter.core.evidence import session_from_macros
from mtls_milter.core.header import HEADER_NAME
from mtls_milter.core.lookups import HostLookup
from mtls_milter.core.names import SenderKind, parse_mail_from
from mtls_milter.engine import Engine
from mtls_milter.inbound.chain_fetch import ChainFetcher
from mtls_milter.inbound.guard import guarded
from mtls_milter.inbound.observer import NULL_OBSERVER, SessionObserver
from mtls_milter.inbound.outcome import (
    ACCEPT,
    CONTINUE,
    action_outcome,
    guarded_headers,
    with_headers,
)
from mtls_milter.inbound.outcome import HeaderChange as HeaderChange
from mtls_milter.inbound.outcome import Outcome as Outcome
from mtls_milter.inbound.policy_service import SessionTable
from mtls_milter.inbound.session_dmarc import (
    collector_for,
    combined_action,
    dmarc_outcome,
    log_object,
)
from mtls_milter.inbound.session_evidence import (
    Transaction,
    in_networks,
    start_chain_fetch,
    tls_session,
    verdict_for,
)
from mtls_milter.inbound.verdict_log import JsonText, MessageClock, log_fields
from mtls_milter.inbound.verdict_memo import VERDICTS, reusable_answer, settled_future

log = logging.getLogger("mtls_milter")

# Macros the engine reads, requested per stage so neither MTA's default lists matter
# (docs/design.md lists what each MTA sends). The TLS macros are asked for at MAIL too: a
# client may skip the second EHLO after STARTTLS.
TLS_MACROS = (
    "{tls_version}",
    "{cert_subject}",
    "{cert_issuer}",
    "{verify}",
    "{cn_subject}",
    "{cert_fp}",
    "{cert_md5}",
)
HELO_MACROS = (*TLS_MACROS, "j")
ENVFROM_MACROS = (*TLS_MACROS, "j", "i", "{auth_type}")
EOM_MACROS = ("i",)

MacroValues = Mapping[str, str | None]
Dmarc = DmarcOutcome | None
# What eom logs and reports: transaction, verdict, action, dry run, DMARC, started, decided.
_Report = tuple[Transaction, Verdict, str, bool, Dmarc, float, float]


@dataclass
class EngineHolder:
    """The current engine; a reload swaps it while sessions in flight keep theirs."""

    engine: Engine


@dataclass
class _Connection:
    client_addr: str = ""
    client_port: str = ""
    # When the connect callback ran, on the session table's clock: a policy record older than
    # this belongs to an earlier SMTP session from the same address and port.
    connected: float = 0.0
    helo: str = ""
    helo_macros: dict[str, str | None] = field(default_factory=dict)
    # Why the whole connection is skipped (an internal network), once connect decided so: with
    # "no reply" at connect the MTA keeps talking, and every MAIL FROM is then skipped too.
    skip: str = ""


class MilterSession:
    """One MTA connection's decisions, whatever the transport."""

    def __init__(
        self,
        holder: EngineHolder,
        executor: Executor,
        *,
        sessions: SessionTable | None = None,
        fetcher: ChainFetcher | None = None,
        observer: SessionObserver = NULL_OBSERVER,
    ) -> None:
        self._holder = holder
        self._observer = observer  # told each verdict after the log line (metrics)
        self._executor = executor
        self._sessions = sessions  # the policy service's table (Postfix fingerprints)
        self._fetcher = fetcher  # chain evidence; None: off
        self._conn = _Connection()
        self._tx: Transaction | None = None
        self._clock = MessageClock()
        # False when the MTA withholds adding or changing header fields (negotiation): then the
        # results are logged only.
        self.header_actions = True
        # True: eom keeps its log line until the transport calls answered() once the answer is
        # written (decide, act, then log: the MTA does not wait for our log write).
        self.log_after_answer = False
        self._unlogged: _Report | None = None

    @property
    def client_addr(self) -> str:
        return self._conn.client_addr

    @property
    def config(self) -> Config:
        return self._holder.engine.config

    @guarded(CONTINUE)
    def connect(self, address: str, port: str) -> Outcome:
        """A new SMTP client (address and port empty when the MTA did not say)."""
        self._conn = _Connection(client_addr=address or "", client_port=port or "")
        if self._sessions is not None:
            self._conn.connected = self._sessions.now()
        networks = self._holder.engine.config.policy.internal_networks
        if networks and in_networks(self._conn.client_addr, networks):
            log.info("skip client=%s reason=internal network", self._conn.client_addr)
            self._conn.skip = "internal network"
            return ACCEPT
        return CONTINUE

    @guarded(CONTINUE)
    def helo(self, name: str, macros: MacroValues) -> Outcome:
        self._conn.helo = name or ""
        self._conn.helo_macros = dict(macros)
        return CONTINUE

    @guarded(CONTINUE)
    def mail(self, sender: str, macros: MacroValues) -> Outcome:
        """MAIL FROM: a new transaction; the Client MX lookup starts here."""
        self._tx = None
        if self._conn.skip:  # end of message without a transaction: accept, no header
            return ACCEPT
        engine = self._holder.engine
        merged = dict(self._conn.helo_macros)
        merged.update({k: v for k, v in macros.items() if v is not None})
        conn = self._conn
        tx = Transaction(
            engine, sender or "", time.monotonic(), merged, conn.client_addr, conn.client_port
        )
        tx.connected, tx.helo = conn.connected, conn.helo
        self._tx = tx
        parsed = parse_mail_from(sender or "")
        tx.domain = parsed.domain if parsed.kind is SenderKind.DOMAIN else ""
        tx.macro_session = session_from_macros(merged)
        tx.collector = collector_for(engine.config)
        if merged.get("{auth_type}"):
            tx.skip_reason = "SMTP AUTH session"
            log.info("skip client=%s reason=SMTP AUTH session", conn.client_addr)
            return ACCEPT
        self._clock = MessageClock()
        tx.prefetch = self._start_prefetch(engine, tx)
        start_chain_fetch(tx, self._sessions, self._fetcher, wait_for_dns=False)  # Sendmail
        self._note_chain(tx)
        return CONTINUE

    @guarded(CONTINUE)
    def data(self) -> Outcome:
        # Postfix's policy request (the fingerprint) arrives at RCPT: after MAIL FROM, before DATA.
        if self._tx is not None and not self._tx.skip_reason:
            self._tx.session = tls_session(self._tx, self._sessions)  # every RCPT is done
            start_chain_fetch(self._tx, self._sessions, self._fetcher, wait_for_dns=False)
            self._note_chain(self._tx)
        return CONTINUE

    @guarded(CONTINUE)
    def header(self, name: str, value: str) -> Outcome:
        tx = self._tx
        if tx is not None and name.lower() == HEADER_NAME.lower():
            tx.ar_values.append(value)
        if tx is not None and tx.collector is not None:
            tx.collector.header(name, value)
        return CONTINUE

    @guarded(CONTINUE)
    def body(self, chunk: bytes) -> Outcome:
        """A body chunk: kept only for DKIM verified here (DMARC)."""
        if self._tx is not None and self._tx.collector is not None:
            self._tx.collector.body(chunk)
        return CONTINUE

    @guarded(ACCEPT)
    def eom(self, macros: MacroValues) -> Outcome:
        """Decide, then the outcome, then log. May block (DNS, chain fetch)."""
        tx = self._tx
        if tx is None:  # no MAIL FROM seen (broken MTA conversation): nothing to judge
            return ACCEPT
        self._tx = None
        if tx.skip_reason:  # skipped at MAIL FROM (an MTA should not even call us here)
            return ACCEPT
        started = time.monotonic()
        tx.macros.update({k: v for k, v in macros.items() if v})
        verdict = self._verdict(tx)
        self._note_chain(tx, started)
        mtls_action = action_for(verdict, tx.engine.config.policy)
        dry_run = tx.engine.config.policy.dry_run
        dmarc = None
        if tx.collector is not None:  # never raises: an internal error is dmarc=temperror
            dmarc = dmarc_outcome(tx, tx.collector, verdict, started)
        outcome = ACCEPT
        if not dry_run:
            outcome = action_outcome(mtls_action, verdict, dmarc)
        if not dry_run and self.header_actions:
            outcome = with_headers(outcome, guarded_headers(tx, verdict, dmarc))
        action = combined_action(mtls_action, dmarc) if not dry_run else mtls_action
        finished = time.monotonic()
        report = (tx, verdict, action, dry_run, dmarc, started, finished)
        if self.log_after_answer:
            self._unlogged = report
        else:
            self._report(*report)
        return outcome

    def answered(self) -> None:
        """The transport has written the answer: now log the verdict (``log_after_answer``)."""
        report, self._unlogged = self._unlogged, None
        if report is not None:
            self._report(*report)

    def _report(
        self,
        tx: Transaction,
        verdict: Verdict,
        action: str,
        dry_run: bool,
        dmarc: Dmarc,
        started: float,
        finished: float,
    ) -> None:
        side_effect("logging the verdict", self._log, tx, verdict, action, dry_run, dmarc, finished)
        side_effect(
            "reporting the verdict",
            self._observer.verdict,
            verdict,
            action,
            dmarc.result.result if dmarc is not None else None,
            finished - started,
            finished - tx.started,
        )

    def _verdict(self, tx: Transaction) -> Verdict:
        """The verdict, reused when the same inputs were judged before (inbound/verdict_memo.py)."""
        config = tx.engine.config
        if config.policy.server_mx_fallback or tx.chain_fetch is not None:
            return verdict_for(tx, self._sessions, self._fetcher)
        prefetch = tx.prefetch
        settled = prefetch is not None and prefetch.done() and not prefetch.cancelled()
        if prefetch is None or not settled or prefetch.exception() is not None:
            return verdict_for(tx, self._sessions, self._fetcher)  # it reports a failed lookup
        held = prefetch.result()
        if not reusable_answer(held):
            return verdict_for(tx, self._sessions, self._fetcher)
        # Kept, so the evaluation judges the very TLS facts the key names (a fingerprint could
        # otherwise arrive from Postfix between the two look-ups).
        session = tx.session = tls_session(tx, self._sessions)
        chain_possible = self._fetcher is not None and config.chain_fetch.enabled
        if tx.policy_unavailable:  # the key lacks what the policy table would have said
            return verdict_for(tx, self._sessions, self._fetcher)
        if chain_possible and (session.fingerprint or session.fingerprint_md5):
            return verdict_for(tx, self._sessions, self._fetcher)
        key = (tx.mail_from, tx.helo, session, held)
        verdict = VERDICTS.get(tx.engine, key)
        if verdict is None:
            verdict = verdict_for(tx, self._sessions, self._fetcher)
            if verdict.result is not Result.TEMPERROR:  # an internal error is not kept
                VERDICTS.put(tx.engine, key, verdict)
        return verdict

    def eom_may_block(self) -> bool:
        """Whether :meth:`eom` may wait: for the Client MX lookup still running, for a chain
        fetch (started, or possible since a fingerprint is known), for the MX fallback's
        lookup, or for DMARC's lookups. Otherwise it only computes (a warm cache)."""
        tx = self._tx
        if tx is None or tx.skip_reason:
            return False
        if tx.collector is not None:  # DMARC, SPF and DKIM lookups
            return True
        if tx.prefetch is not None and not tx.prefetch.done():
            return True
        if tx.chain_fetch is not None or tx.engine.config.policy.server_mx_fallback:
            return True
        if self._fetcher is None or not tx.engine.config.chain_fetch.enabled:
            return False
        session = tls_session(tx, self._sessions)
        return bool(session.fingerprint or session.fingerprint_md5)

    @guarded(CONTINUE)
    def abort(self) -> Outcome:
        self._tx = None
        return CONTINUE

    @guarded(CONTINUE)
    def close(self) -> Outcome:
        self._tx = None
        self.answered()  # a conversation that ended before the answer went out: log it now
        return CONTINUE

    def _start_prefetch(self, engine: Engine, tx: Transaction) -> Future[HostLookup] | None:
        """Look up Client MX at MAIL FROM so end of message rarely waits for DNS.

        A cached answer is taken at once; only a miss goes to the worker pool, so the
        common case costs no thread hand-off.
        """
        if not tx.domain:  # TLS or not: plain text from an opted-in domain fails
            return None
        cached = engine.resolver.cached_client_mx(tx.domain)
        if cached is not None:
            return settled_future(cached)
        budget = engine.config.dns.budget
        future = self._executor.submit(engine.resolver.client_mx, tx.domain, budget)
        future.add_done_callback(self._clock.dns_finished)
        return future

    def _note_chain(self, tx: Transaction, started: float = 0.0) -> None:
        """Start the chain fetch's clock once it is seen started (``started``: at the end of
        message, where it may have started and finished inside the evaluation)."""
        clock = self._clock
        if tx.chain_fetch is not None and not clock.chain_started:
            clock.chain_started = started or time.monotonic()
            tx.chain_fetch.add_done_callback(clock.chain_finished)

    def _log(
        self,
        tx: Transaction,
        verdict: Verdict,
        action: str,
        dry_run: bool,
        dmarc: Dmarc,
        decided: float,
    ) -> None:
        fields = log_fields(tx, verdict, action, dry_run, self._clock, decided)
        if dmarc is not None:
            fields["dmarc"] = log_object(dmarc)
        # One JSON text in the text format; the fields themselves in --log-format json.
        log.info("verdict %s", JsonText(fields), extra={"fields": fields, "event": "verdict"})


_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(key: str, message: str, *args: object) -> None:
    """Log ``message`` as a warning the first time ``key`` comes up in this process."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message, *args)


def side_effect(what: str, action: Callable[..., object], *args: object) -> None:
    """Run a step whose failure must not change the decision: log it and go on."""
    try:
        action(*args)
    except Exception:
        with contextlib.suppress(Exception):  # even a broken log handler must not escape
            log.exception("%s failed; the decision stands", what)
