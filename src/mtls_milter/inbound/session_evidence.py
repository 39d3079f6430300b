"""The end-of-message verdict of a :class:`~.session.Transaction`: the Client MX lookup started
at MAIL FROM, the session's TLS facts (macros, plus the fingerprint from Postfix's policy
request), the client's chain when one is fetched in time (docs/evidence.md), and the action.

The waits here block (futures with timeouts within the DNS and chain budgets); a transport that
must not block runs :meth:`~.session.MilterSession.eom` in a worker thread.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Any

from mtls_milter.core.decisions import chain_could_change
from mtls_milter.core.dmarc_message import MessageCollector
from mtls_milter.core.evaluate import Result, Verdict
from mtls_milter.core.evaluate import Transaction as CoreTransaction
from mtls_milter.core.evidence import (
    Evidence,
    EvidenceKind,
    TlsSession,
    session_from_macros,
    with_chain,
    with_fingerprint,
)
from mtls_milter.core.lookups import HostLookup
from mtls_milter.engine import Engine
from mtls_milter.inbound.chain_fetch import ChainFetcher, FetchOutcome
from mtls_milter.inbound.policy_service import PolicyTableUnavailable, SessionTable
from mtls_milter.net.lookup_pool import lookup_deadline

log = logging.getLogger("mtls_milter")

MAX_REPLY_TEXT = 200


@dataclass
class Transaction:
    """One message, MAIL FROM to end of message."""

    engine: Engine
    mail_from: str
    started: float
    macros: dict[str, str | None]
    client_addr: str = ""
    client_port: str = ""
    connected: float = 0.0
    helo: str = ""
    skip_reason: str = ""
    prefetch: Future[HostLookup] | None = None
    ar_values: list[str] = field(default_factory=list)
    chain_fetch: Future[FetchOutcome] | None = None  # started at MAIL FROM, DATA or end
    chain_deadline: float = 0.0
    chain_detail: str = ""  # for the verdict log line
    session: TlsSession | None = None  # decoded once the policy request can have arrived (DATA)
    domain: str = ""  # the MAIL FROM domain when usable, parsed once at MAIL FROM
    macro_session: TlsSession | None = None  # the macros' TLS facts, decoded once at MAIL FROM
    collector: MessageCollector | None = None  # what DMARC needs; None: [dmarc] is off
    policy_unavailable: bool = False  # the policy table could not be asked: no fingerprint known


def verdict_for(
    tx: Transaction, sessions: SessionTable | None, fetcher: ChainFetcher | None
) -> Verdict:
    """The core's verdict; temperror if anything inside goes wrong."""
    try:
        engine = tx.engine
        if tx.prefetch is not None:
            domain = tx.domain
            if not _prefetch_done(tx, tx.prefetch):
                budget = engine.config.dns.budget
                reason = f"Client MX lookup did not finish within the {budget:g} s DNS budget"
                return Verdict(Result.TEMPERROR, reason, domain=domain)
        transaction = CoreTransaction(mail_from=tx.mail_from, helo=tx.helo)
        # The answer itself, not a second lookup: a failure is not cached, and asking again
        # would spend the DNS budget twice.
        held = tx.prefetch.result() if tx.prefetch is not None else None
        verdict = engine.evaluate(transaction, _evidence(tx, sessions, fetcher), client_mx=held)
        return _without_policy_table(tx, verdict) if tx.policy_unavailable else verdict
    except Exception:
        log.exception("internal error during evaluation")
        return Verdict(Result.TEMPERROR, "internal error", evidence=EvidenceKind.NONE)


def tls_session(tx: Transaction, sessions: SessionTable | None) -> TlsSession:
    """The MTA's TLS facts, plus the fingerprint Postfix's policy request gave for them."""
    if tx.session is not None:
        return tx.session
    session = tx.macro_session or session_from_macros(tx.macros)
    if sessions is None or not session.tls or session.fingerprint:
        return session
    # Only this SMTP session's record: an older one from the same address and port (an
    # earlier connection, another client behind the same NAT) may name another certificate.
    try:
        facts = sessions.get(tx.client_addr, tx.client_port, since=tx.connected)
    except PolicyTableUnavailable:
        tx.policy_unavailable = True  # remembered for the verdict: not the same as no record
        return session
    if facts is not None and facts.fingerprint:
        session = with_fingerprint(session, facts.fingerprint)
    return session


def _without_policy_table(tx: Transaction, verdict: Verdict) -> Verdict:
    """A verdict reached without the policy table: ``fail``, or ``none`` where the server-MX
    fallback compared names, might be the fingerprint's absence, so an internal failure would
    decide; it is ``temperror``. A pass, or a result no fingerprint changes, stands."""
    if verdict.result is Result.FAIL:
        affected = "publishes a null Client MX" not in verdict.reason
    else:
        fallback = tx.engine.config.policy.server_mx_fallback
        affected = verdict.result is Result.NONE and fallback and bool(verdict.domain)
    if not affected:
        return verdict
    reason = "policy table unavailable: the MTA's certificate fingerprint could not be looked up"
    return replace(verdict, result=Result.TEMPERROR, reason=reason)


def start_chain_fetch(
    tx: Transaction,
    sessions: SessionTable | None,
    fetcher: ChainFetcher | None,
    *,
    wait_for_dns: bool,
) -> None:
    """Start a chain fetch when it can help; a cached chain is taken at once."""
    if fetcher is None or tx.chain_fetch is not None or not tx.engine.config.chain_fetch.enabled:
        return
    session = tls_session(tx, sessions)
    if not session.fingerprint and not session.fingerprint_md5:
        return
    cached = fetcher.cached(session)
    config = tx.engine.config
    if cached is None:
        wanted = _chain_wanted(tx, session, wait_for_dns)
        if wanted is None:  # undecided until the Client MX lookup is done
            return
        if not wanted:
            tx.chain_detail = "not fetched: a chain cannot change this result"
            return
    server_name = session.mta_cn or tx.helo
    tx.chain_deadline = time.monotonic() + config.chain_fetch.timeout + 0.25
    tx.chain_fetch = fetcher.start(session, tx.client_addr, server_name, config.chain_fetch)


def _chain_wanted(tx: Transaction, session: TlsSession, wait: bool) -> bool | None:
    """Whether a chain could change the verdict (the core decides); None while the Client MX
    lookup is still running and ``wait`` is false."""
    client_mx = None
    if tx.prefetch is not None:
        if not tx.prefetch.done() and not wait:
            return None
        if not _prefetch_done(tx, tx.prefetch):
            return False
        client_mx = tx.prefetch.result()
    return chain_could_change(client_mx, session, tx.engine.config)


def _evidence(
    tx: Transaction, sessions: SessionTable | None, fetcher: ChainFetcher | None
) -> Evidence:
    """The session's evidence, with the client's chain when one is bound to it in time."""
    session = tls_session(tx, sessions)
    evidence = Evidence(session=session)
    if fetcher is None or (not session.fingerprint and not session.fingerprint_md5):
        return evidence
    start_chain_fetch(tx, sessions, fetcher, wait_for_dns=True)
    future = tx.chain_fetch
    if future is None:
        return evidence
    try:
        outcome = future.result(timeout=max(tx.chain_deadline - time.monotonic(), 0.0))
    except FutureTimeout:
        budget = tx.engine.config.chain_fetch.timeout
        tx.chain_detail = f"chain fetch did not finish within {budget:g} s"
        log.info("client=%s: %s; no chain evidence", tx.client_addr, tx.chain_detail)
        return evidence
    tx.chain_detail = outcome.detail
    if not outcome.chain:
        return evidence
    bound = with_chain(evidence, outcome.chain)
    if not bound.chain:
        tx.chain_detail = "chain refused: its leaf is not this session's certificate"
    return bound


def _prefetch_done(tx: Transaction, prefetch: Future[HostLookup]) -> bool:
    """Wait for the MAIL FROM lookup until its own budget ends.

    The budget counts from when the lookup started, not from MAIL FROM, and pauses while the
    lookup waits for a thread or a domain slot (net/lookup_pool.py): the deadline is read
    again whenever it passes, and the wait ends once it stops moving.
    """
    budget = tx.engine.config.dns.budget
    deadline = lookup_deadline(prefetch, budget, tx.started)
    while True:
        try:
            prefetch.result(timeout=max(deadline - time.monotonic(), 0.0))
        except FutureTimeout:
            later = lookup_deadline(prefetch, budget, tx.started)
            if later <= deadline:
                return False
            deadline = later
            continue
        return True


def reply_text(verdict: Verdict) -> str:
    """SMTP reply text: printable ASCII, no '%' (libmilter drops replies with odd '%')."""
    text = f"mtls={verdict.result.value}: {verdict.reason}"
    clean = "".join(c if " " <= c <= "~" and c != "%" else "?" for c in text)
    return clean[:MAX_REPLY_TEXT]


def in_networks(address: str, networks: tuple[Any, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in networks)
