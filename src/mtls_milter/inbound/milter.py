"""The milter adapter: translate libmilter callbacks into one core evaluation per message.

Connection state (client address, HELO, TLS macros) lives in :class:`_Connection`; transaction
state (MAIL FROM … end of message) in :class:`_Transaction`, reset at every MAIL FROM and on
abort. Every callback is guarded: an exception never reaches libmilter, mail is never lost.

At end of message the order is: decide (verdict and action), act (return code and SMTP reply),
then the side effects (header fields, the log line). A side effect that fails is logged and never
changes the decision. Macros are read once per stage into the transaction; pymilter decodes
them as strict UTF-8, so a value that is not UTF-8 is logged (quoted) and taken as not sent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from functools import wraps
from typing import Any, TypeVar

import Milter

from mtls_milter.config import FailAction, TemperrorAction
from mtls_milter.core.certs import name_matches
from mtls_milter.core.evaluate import Result, Transaction, Verdict
from mtls_milter.core.evidence import (
    Evidence,
    EvidenceKind,
    TlsSession,
    session_from_macros,
    with_chain,
    with_fingerprint,
)
from mtls_milter.core.header import HEADER_NAME, fields_to_delete, render_folded
from mtls_milter.core.lookups import AddressLookup, HostLookup, LookupStatus, MxResolver
from mtls_milter.core.names import SenderKind, parse_mail_from
from mtls_milter.core.quote import clip, quote
from mtls_milter.engine import Engine
from mtls_milter.inbound.chain_fetch import ChainFetcher, FetchOutcome
from mtls_milter.inbound.policy_service import SessionTable

log = logging.getLogger("mtls_milter")

# Macros the engine reads, requested per stage with setsymlist so neither MTA's default lists
# matter (docs/design.md lists what each MTA sends). The TLS macros are asked for at MAIL too:
# a client may skip the second EHLO after STARTTLS.
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

# libmilter's return codes, typed (pymilter is untyped).
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL
ALL_OPTS: int = Milter.ALL_OPTS
ADDHDRS: int = Milter.ADDHDRS
CHGHDRS: int = Milter.CHGHDRS
SETSYMLIST: int = Milter.SETSYMLIST

REPLY_REJECT = ("550", "5.7.1")
REPLY_TEMPFAIL = ("451", "4.7.0")
MAX_REPLY_TEXT = 200


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
    internal: bool = False
    helo: str = ""
    helo_macros: dict[str, str | None] = field(default_factory=dict)


@dataclass
class _Transaction:
    engine: Engine
    mail_from: str
    started: float
    macros: dict[str, str | None]
    skip_reason: str = ""
    prefetch: Future[HostLookup] | None = None
    ar_values: list[str] = field(default_factory=list)
    chain_fetch: Future[FetchOutcome] | None = None  # started at MAIL FROM, DATA or end
    chain_deadline: float = 0.0
    chain_detail: str = ""  # for the verdict log line
    session: TlsSession | None = None  # decoded once the policy request can have arrived (DATA)
    domain: str = ""  # the MAIL FROM domain when usable, parsed once at MAIL FROM
    macro_session: TlsSession | None = None  # the macros' TLS facts, decoded once at MAIL FROM


_F = TypeVar("_F", bound=Callable[..., Any])


def _guarded(fallback: int) -> Callable[[_F], _F]:
    """Log any exception from a callback and answer ``fallback`` instead of raising."""

    def decorate(method: _F) -> _F:
        @wraps(method)
        def wrapper(self: MtlsMilter, *args: Any) -> Any:
            try:
                return method(self, *args)
            except Exception:
                log.exception("internal error in %s; answering %s", method.__name__, fallback)
                return fallback

        return wrapper  # type: ignore[return-value]

    return decorate


class MtlsMilter(Milter.Base):  # type: ignore[misc]
    """One instance per SMTP connection (pymilter's factory creates it)."""

    def __init__(
        self,
        holder: EngineHolder,
        executor: Executor,
        *,
        sessions: SessionTable | None = None,
        fetcher: ChainFetcher | None = None,
    ) -> None:
        self._holder = holder
        self._executor = executor
        self._sessions = sessions  # the policy service's table (Postfix fingerprints)
        self._fetcher = fetcher  # chain evidence; None: off
        self._conn = _Connection()
        self._tx: _Transaction | None = None
        # False when the MTA withholds adding or changing header fields (negotiation): then the
        # results are logged only. An MTA without negotiation offers every action.
        self._header_actions = True

    # -- negotiation ----------------------------------------------------------------------------

    @_guarded(ALL_OPTS)
    def negotiate(self, opts: list[int]) -> int:
        status: int = super().negotiate(opts)
        if status != CONTINUE:
            return status
        offered = int(opts[0])  # the actions the MTA allows; we ask for all of them
        self._header_actions = offered & (ADDHDRS | CHGHDRS) == ADDHDRS | CHGHDRS
        if not self._header_actions:
            _warn_once(
                "header",
                "MTA withholds header actions (%s): results will be logged only, no "
                "Authentication-Results field is added or removed",
                " ".join(
                    n for f, n in ((ADDHDRS, "ADDHDRS"), (CHGHDRS, "CHGHDRS")) if not offered & f
                ),
            )
        if not offered & SETSYMLIST:
            _warn_once(
                "symlist",
                "MTA withholds SETSYMLIST: the milter sees only the macros the MTA's own "
                "configuration lists (%s)",
                " ".join(ENVFROM_MACROS),
            )
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

    # -- connection -----------------------------------------------------------------------------

    @_guarded(CONTINUE)
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self._conn = _Connection()
        if self._sessions is not None:
            self._conn.connected = self._sessions.now()
        if isinstance(hostaddr, tuple) and len(hostaddr) >= 2:
            self._conn.client_addr = str(hostaddr[0])
            self._conn.client_port = str(hostaddr[1])
        networks = self._holder.engine.config.policy.internal_networks
        if networks and _in_networks(self._conn.client_addr, networks):
            log.info("skip client=%s reason=internal network", self._conn.client_addr)
            return ACCEPT
        return CONTINUE

    @_guarded(CONTINUE)
    def hello(self, heloname: str) -> int:
        self._conn.helo = heloname or ""
        self._conn.helo_macros = self._read_macros(HELO_MACROS)
        return CONTINUE

    # -- transaction ----------------------------------------------------------------------------

    # libmilter hands MAIL FROM and header values over as bytes; any byte sequence is
    # decoded (surrogateescape), so a Latin-1 address or field value reaches the callbacks.

    @_guarded(CONTINUE)
    def envfrom_bytes(self, *args: bytes) -> int:
        mailfrom, *params = (_text(arg) for arg in args) if args else ("",)
        return self.envfrom(mailfrom, *params)

    @_guarded(CONTINUE)
    def header_bytes(self, name: str, value: bytes) -> int:
        return self.header(name, _text(value))

    @_guarded(CONTINUE)
    def envfrom(self, mailfrom: str, *params: str) -> int:
        self._tx = None
        engine = self._holder.engine
        macros = dict(self._conn.helo_macros)
        macros.update({k: v for k, v in self._read_macros(ENVFROM_MACROS).items() if v is not None})
        self._tx = _Transaction(engine, mailfrom or "", time.monotonic(), macros)
        sender = parse_mail_from(mailfrom or "")
        self._tx.domain = sender.domain if sender.kind is SenderKind.DOMAIN else ""
        self._tx.macro_session = session_from_macros(macros)
        if macros.get("{auth_type}"):
            self._tx.skip_reason = "SMTP AUTH session"
            log.info("skip client=%s reason=SMTP AUTH session", self._conn.client_addr)
            return ACCEPT
        self._tx.prefetch = self._start_prefetch(engine, self._tx)
        self._start_chain_fetch(self._tx, wait_for_dns=False)  # Sendmail: fingerprint known now
        return CONTINUE

    @_guarded(CONTINUE)
    def data(self) -> int:
        # Postfix's policy request (the fingerprint) arrives at RCPT: after MAIL FROM, before DATA.
        if self._tx is not None and not self._tx.skip_reason:
            self._tx.session = self._session(self._tx)  # every RCPT (policy request) is done
            self._start_chain_fetch(self._tx, wait_for_dns=False)
        # Not a no-op: without this callback pymilter negotiates SMFIP_NODATA, and Postfix then
        # sends the DATA macros with no command after them. The milter never answers that
        # packet, so the kernel delays its ACK (~40 ms) and Postfix's next small write (the
        # first header, from cleanup) waits for it under Nagle: a ~40 ms stall per message
        # over inet: that the milter's own TCP_NODELAY cannot remove. With the DATA command
        # negotiated, the milter's reply acknowledges it at once.
        return CONTINUE

    @_guarded(CONTINUE)
    def header(self, name: str, value: str) -> int:
        if self._tx is not None and name.lower() == HEADER_NAME.lower():
            self._tx.ar_values.append(value)
        return CONTINUE

    @_guarded(CONTINUE)
    def eoh(self) -> int:
        # Not a no-op either: without this callback pymilter negotiates SMFIP_NOEOH, and then
        # libmilter drops the end of a message that had no header field at all (DATA straight to
        # end of message, as Sendmail sends it): the MTA waits for its milter timeout and
        # delivers the message without our field. With end of headers negotiated it does not.
        return CONTINUE

    @_guarded(ACCEPT)
    def eom(self) -> int:
        tx = self._tx
        if tx is None:  # no MAIL FROM seen (broken MTA conversation): nothing to judge
            return ACCEPT
        self._tx = None
        if tx.skip_reason:  # skipped at MAIL FROM (an MTA should not even call us here)
            return ACCEPT
        tx.macros.update({k: v for k, v in self._read_macros(EOM_MACROS).items() if v})
        # Decide, then act, then the side effects: none of these can change the answer.
        verdict = self._verdict(tx)
        action = _action(tx.engine, verdict)
        dry_run = tx.engine.config.policy.dry_run
        answer = ACCEPT if dry_run or action == "accept" else self._refuse(action, verdict)
        if not dry_run and self._header_actions:
            _side_effect("rewriting the header fields", self._rewrite_headers, tx, verdict)
        _side_effect("logging the verdict", self._log, tx, verdict, action, dry_run)
        return answer

    @_guarded(CONTINUE)
    def abort(self) -> int:
        self._tx = None
        return CONTINUE

    @_guarded(CONTINUE)
    def close(self) -> int:
        self._tx = None
        return CONTINUE

    # -- helpers --------------------------------------------------------------------------------

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
                    self._conn.client_addr,
                    name,
                    quote(raw),
                )
                value = None
            except Exception as exc:
                log.warning("macro %s unreadable, taken as not sent: %s", name, quote(str(exc)))
                value = None
            macros[name] = value if isinstance(value, str) or value is None else str(value)
        return macros

    def _start_prefetch(self, engine: Engine, tx: _Transaction) -> Future[HostLookup] | None:
        """Look up Client MX at MAIL FROM so end of message rarely waits for DNS.

        A cached answer is taken at once; only a miss goes to the worker pool, so the
        common case costs no thread hand-off.
        """
        if not tx.domain:  # TLS or not: plain text from an opted-in domain fails
            return None
        cached = engine.resolver.cached_client_mx(tx.domain)
        if cached is not None:
            done: Future[HostLookup] = Future()
            done.set_result(cached)
            return done
        budget = engine.config.dns.budget
        return self._executor.submit(engine.resolver.client_mx, tx.domain, budget)

    def _verdict(self, tx: _Transaction) -> Verdict:
        """The core's verdict; temperror if anything inside goes wrong."""
        try:
            engine = tx.engine
            if tx.prefetch is not None:
                domain = tx.domain
                if not self._prefetch_done(tx, tx.prefetch):
                    budget = engine.config.dns.budget
                    reason = f"Client MX lookup did not finish within the {budget:g} s DNS budget"
                    return Verdict(Result.TEMPERROR, reason, domain=domain)
                # Use the answer itself: a failure is not cached, and asking again would spend
                # the DNS budget a second time.
                prefetched = _Prefetched(engine.resolver, domain, tx.prefetch.result())
                engine = replace(engine, resolver=prefetched)
            transaction = Transaction(mail_from=tx.mail_from, helo=self._conn.helo)
            return engine.evaluate(transaction, self._evidence(tx))
        except Exception:
            log.exception("internal error during evaluation")
            return Verdict(Result.TEMPERROR, "internal error", evidence=EvidenceKind.NONE)

    # -- chain evidence (docs/evidence.md) -------------------------------------------------------

    def _session(self, tx: _Transaction) -> TlsSession:
        """The MTA's TLS facts, plus the fingerprint Postfix's policy request gave for them."""
        if tx.session is not None:
            return tx.session
        session = tx.macro_session or session_from_macros(tx.macros)
        if self._sessions is None or not session.tls or session.fingerprint:
            return session
        # Only this SMTP session's record: an older one from the same address and port (an
        # earlier connection, another client behind the same NAT) may name another certificate.
        facts = self._sessions.get(
            self._conn.client_addr, self._conn.client_port, since=self._conn.connected
        )
        if facts is not None and facts.fingerprint:
            session = with_fingerprint(session, facts.fingerprint)
        return session

    def _start_chain_fetch(self, tx: _Transaction, *, wait_for_dns: bool) -> None:
        """Start a chain fetch when it can help; a cached chain is taken at once."""
        fetcher = self._fetcher
        if (
            fetcher is None
            or tx.chain_fetch is not None
            or not tx.engine.config.chain_fetch.enabled
        ):
            return
        session = self._session(tx)
        if not session.fingerprint and not session.fingerprint_md5:
            return
        cached = fetcher.cached(session)
        config = tx.engine.config
        if cached is None:
            wanted = self._chain_wanted(tx, session, wait_for_dns)
            if wanted is None:  # undecided until the Client MX lookup is done
                return
            if not wanted:
                tx.chain_detail = "not fetched: a chain cannot change this result"
                return
        server_name = session.mta_cn or self._conn.helo
        tx.chain_deadline = time.monotonic() + config.chain_fetch.timeout + 0.25
        tx.chain_fetch = fetcher.start(
            session, self._conn.client_addr, server_name, config.chain_fetch
        )

    def _chain_wanted(self, tx: _Transaction, session: TlsSession, wait: bool) -> bool | None:
        """Whether a chain could change the verdict: the MTA did not verify the certificate, or
        its CN matches no published host. None while the Client MX lookup is still running."""
        config = tx.engine.config
        if tx.prefetch is not None:
            if not tx.prefetch.done() and not wait:
                return None
            if not self._prefetch_done(tx, tx.prefetch):
                return False
            lookup = tx.prefetch.result()
            if lookup.status is LookupStatus.NOT_FOUND:
                if not config.policy.server_mx_fallback:
                    return False  # not opted in: no evidence changes "none"
            elif lookup.status is not LookupStatus.OK or lookup.null:
                return False
            elif session.mta_verified and session.mta_cn:
                wild = config.tls.allow_wildcards
                return not any(
                    name_matches(session.mta_cn, host, allow_wildcards=wild)
                    for host in lookup.hosts
                )
        return not (session.mta_verified and session.mta_cn)

    def _evidence(self, tx: _Transaction) -> Evidence:
        """The session's evidence, with the client's chain when one is bound to it in time."""
        session = self._session(tx)
        evidence = Evidence(session=session)
        if self._fetcher is None or (not session.fingerprint and not session.fingerprint_md5):
            return evidence
        self._start_chain_fetch(tx, wait_for_dns=True)
        future = tx.chain_fetch
        if future is None:
            return evidence
        try:
            outcome = future.result(timeout=max(tx.chain_deadline - time.monotonic(), 0.0))
        except FutureTimeout:
            budget = tx.engine.config.chain_fetch.timeout
            tx.chain_detail = f"chain fetch did not finish within {budget:g} s"
            log.info("client=%s: %s; no chain evidence", self._conn.client_addr, tx.chain_detail)
            return evidence
        tx.chain_detail = outcome.detail
        if not outcome.chain:
            return evidence
        bound = with_chain(evidence, outcome.chain)
        if not bound.chain:
            tx.chain_detail = "chain refused: its leaf is not this session's certificate"
        return bound

    @staticmethod
    def _prefetch_done(tx: _Transaction, prefetch: Future[HostLookup]) -> bool:
        """Wait for the MAIL FROM lookup within what is left of the DNS budget."""
        remaining = tx.engine.config.dns.budget - (time.monotonic() - tx.started)
        try:
            prefetch.result(timeout=max(remaining, 0.0))
        except FutureTimeout:
            return False
        return True

    def _rewrite_headers(self, tx: _Transaction, verdict: Verdict) -> None:
        config = tx.engine.config
        authserv_id = self._authserv_id(tx)
        forged = fields_to_delete(
            tx.ar_values, authserv_id, delete_all_ours=config.milter.delete_all_own_results
        )
        for index in forged:  # descending, so earlier indexes stay valid
            self.chgheader(HEADER_NAME, index, "")
        value = render_folded(verdict.header_field(authserv_id))
        self.addheader(HEADER_NAME, value, 0)

    def _authserv_id(self, tx: _Transaction) -> str:
        configured = tx.engine.config.milter.authserv_id
        return configured or tx.macros.get("j") or _hostname()

    def _refuse(self, action: str, verdict: Verdict) -> int:
        """The return code for ``action``; the SMTP reply text is best effort."""
        code, reply = (REJECT, REPLY_REJECT) if action == "reject" else (TEMPFAIL, REPLY_TEMPFAIL)
        # Without our text the MTA still refuses, with its own default reply.
        _side_effect("setting the SMTP reply", self.setreply, *reply, _reply_text(verdict))
        return code

    def _log(self, tx: _Transaction, verdict: Verdict, action: str, dry_run: bool) -> None:
        record = {
            "queue_id": clip(tx.macros.get("i") or ""),
            "client": self._conn.client_addr,
            "helo": self._conn.helo[:255],
            "domain": verdict.domain,
            "result": verdict.result.value,
            "reason": verdict.reason,
            "evidence": verdict.evidence.value,
            "names": list(verdict.names),
            "matched": verdict.matched,
            "chain": tx.chain_detail,
            "action": action,
            "dry_run": dry_run,
            "elapsed_ms": round((time.monotonic() - tx.started) * 1000, 2),
        }
        log.info("verdict %s", json.dumps(record, separators=(",", ":")))


@dataclass(frozen=True)
class _Prefetched:
    """A resolver answering the Client MX lookup made at MAIL FROM, delegating the rest."""

    resolver: MxResolver
    domain: str
    lookup: HostLookup

    def client_mx(self, domain: str, budget: float) -> HostLookup:
        if domain == self.domain:
            return self.lookup
        return self.resolver.client_mx(domain, budget)

    def server_mx(self, domain: str, budget: float) -> HostLookup:
        return self.resolver.server_mx(domain, budget)

    def addresses(self, host: str, budget: float) -> AddressLookup:
        return self.resolver.addresses(host, budget)

    def cached_client_mx(self, domain: str) -> HostLookup | None:
        return self.lookup if domain == self.domain else self.resolver.cached_client_mx(domain)


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(key: str, message: str, *args: object) -> None:
    """Log ``message`` as a warning the first time ``key`` comes up in this process."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message, *args)


def _side_effect(what: str, action: Callable[..., object], *args: object) -> None:
    """Run a step whose failure must not change the decision: log it and go on."""
    try:
        action(*args)
    except Exception:
        with contextlib.suppress(Exception):  # even a broken log handler must not escape
            log.exception("%s failed; the decision stands", what)


def _text(raw: bytes | str) -> str:
    """An envelope or header value as text: UTF-8, other bytes kept as surrogate escapes."""
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "surrogateescape")
    return raw


def _action(engine: Engine, verdict: Verdict) -> str:
    """``accept``, ``reject`` or ``tempfail`` for this verdict under the policy."""
    policy = engine.config.policy
    if verdict.result is Result.FAIL and policy.on_fail is not FailAction.ANNOTATE:
        return policy.on_fail.value
    if verdict.result is Result.TEMPERROR and policy.on_temperror is TemperrorAction.TEMPFAIL:
        return "tempfail"
    return "accept"


def _reply_text(verdict: Verdict) -> str:
    """SMTP reply text: printable ASCII, no '%' (libmilter drops replies with odd '%')."""
    text = f"mtls={verdict.result.value}: {verdict.reason}"
    clean = "".join(c if " " <= c <= "~" and c != "%" else "?" for c in text)
    return clean[:MAX_REPLY_TEXT]


def _in_networks(address: str, networks: tuple[Any, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


def _hostname() -> str:
    import socket

    return socket.gethostname()
