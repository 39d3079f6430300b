"""Re-running a logged verdict now: the Client MX lookup, the name comparison, the verdict.

The log line does not hold the certificate, only what the milter concluded from it: the evidence
kind, the certificate's host names and, for a chain that did not validate, the error. The re-run
replays exactly that through the real evaluation (:meth:`Engine.evaluate`), with a chain
validator that answers what the log recorded, so every other step (the Client MX lookup, the
MX fallback, the result table, the name matching) is the product's own code on today's DNS.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from cryptography import x509

from mtls_milter.cli.explain_line import LoggedVerdict
from mtls_milter.config import Config
from mtls_milter.core.certs import certificate_name, name_matches
from mtls_milter.core.chain import ChainValidator, ChainVerdict
from mtls_milter.core.clock import SystemClock
from mtls_milter.core.decisions import action_for
from mtls_milter.core.evaluate import Transaction, Verdict
from mtls_milter.core.evidence import (
    NO_TLS,
    CertPresence,
    Evidence,
    EvidenceKind,
    TlsSession,
    mta_evidence,
)
from mtls_milter.core.lookups import HostLookup, LookupStatus, MxResolver
from mtls_milter.core.names import normalize_domain
from mtls_milter.core.quote import quote
from mtls_milter.engine import Engine
from mtls_milter.errors import InputError

MAX_NAMES_COMPARED = 50  # certificate names from the log (outside data: any number)
MAX_HOSTS_COMPARED = 20  # published hosts (Client MX has at most 10; MX has no limit)
CHAIN_INVALID = "chain invalid: "
DRY_RUN = "accept (dry run; would "

# The reasons a verdict gives when the evidence itself is missing, and the TLS facts they imply.
_EVIDENCE_PROBLEMS = (
    ("no TLS", NO_TLS),
    ("no client certificate", TlsSession(tls=True, certificate=CertPresence.ABSENT)),
    (
        "certificate not trusted by the MTA and no chain available",
        TlsSession(tls=True, certificate=CertPresence.PRESENTED),
    ),
    ("no client certificate verified by the MTA", TlsSession(tls=True)),
)
# Stands for the chain the milter had: the recorded validator never looks at it.
_RECORDED_CHAIN = (cast(x509.Certificate, object()),)


class RecordedChain(ChainValidator):
    """A validator that answers what the log recorded: the certificate is not in the log."""

    def __init__(self, recorded: ChainVerdict) -> None:  # no trust store: nothing is validated
        self.recorded = recorded

    def validate_client(self, chain: object, at: datetime) -> ChainVerdict:
        return self.recorded


_NO_CHAIN = RecordedChain(ChainVerdict(False, "no chain in the log", (), ""))


@dataclass(frozen=True, slots=True)
class RecordedEvidence:
    """The logged evidence as the evaluation takes it."""

    evidence: Evidence
    validator: RecordedChain  # asked only for chain evidence
    known: bool  # False: the milter decided before it looked at the certificate


def recorded_evidence(logged: LoggedVerdict) -> RecordedEvidence:
    """What the log says about the client's TLS session and certificate."""
    names = logged.names
    if logged.evidence is EvidenceKind.CHAIN:
        at = logged.reason.find(CHAIN_INVALID)
        error = logged.reason[at + len(CHAIN_INVALID) :] if at >= 0 else ""
        recorded = ChainVerdict(at < 0, error, names, "")
        session = TlsSession(tls=True, certificate=CertPresence.PRESENTED)
        return RecordedEvidence(Evidence(session, _RECORDED_CHAIN), RecordedChain(recorded), True)
    if logged.evidence is EvidenceKind.MTA:
        return RecordedEvidence(mta_evidence(names[0] if names else ""), _NO_CHAIN, True)
    for problem, session in _EVIDENCE_PROBLEMS:
        if logged.reason == problem or logged.reason.endswith("; " + problem):
            return RecordedEvidence(Evidence(session), _NO_CHAIN, True)
    # Decided from DNS alone (no Client MX, a DNS failure, a null record...): the line says
    # nothing of the certificate. A "; no TLS" note would have been caught above.
    return RecordedEvidence(Evidence(TlsSession(tls=True)), _NO_CHAIN, False)


@dataclass(frozen=True, slots=True)
class NameCheck:
    """One certificate name compared with one published host."""

    name: str
    host: str
    matches: bool
    why: str


def compare_names(
    names: tuple[str, ...], hosts: tuple[str, ...], *, allow_wildcards: bool
) -> tuple[NameCheck, ...]:
    """Every certificate name against every host, with the core's matching and the reason."""
    return tuple(
        NameCheck(name, host, matches, _why(name, host, matches, allow_wildcards))
        for name in names[:MAX_NAMES_COMPARED]
        for host in hosts[:MAX_HOSTS_COMPARED]
        for matches in (name_matches(name, host, allow_wildcards=allow_wildcards),)
    )


def _why(name: str, host: str, matches: bool, allow_wildcards: bool) -> str:
    """Why ``name`` does or does not match ``host`` (names are normalized before comparing)."""
    normal = certificate_name(name)
    if normal is None:
        return "not a usable host name"
    read_as = "" if normal == name else f"read as {normal} (lower case, A-labels, no final dot); "
    if normal.startswith("*."):
        return read_as + _why_wildcard(normal[2:], host, matches, allow_wildcards)
    if matches:
        return read_as + "the same name"
    if host.endswith("." + normal) or normal.endswith("." + host):
        return read_as + "a different name: a parent or child domain does not count"
    return read_as + "a different name"


def _why_wildcard(base: str, host: str, matches: bool, allow_wildcards: bool) -> str:
    if not allow_wildcards:
        return "a wildcard name, and [tls] allow_wildcards is off: it matches nothing"
    if matches:
        return f"the wildcard stands for the one label before {base}"
    if "." not in base:
        return "a wildcard directly under a one-label name never matches"
    if host == base:
        return f"a wildcard does not cover {base} itself"
    if host.endswith("." + base):
        return f"a wildcard stands for exactly one label; {host} has more before {base}"
    return f"a wildcard for names under {base}, and {host} is not one"


@dataclass(frozen=True, slots=True)
class Rerun:
    """The verdict the current configuration and DNS give for what the log recorded."""

    lookup: HostLookup | None  # None: no domain to look up
    verdict: Verdict | None  # None: cannot tell, the log holds no certificate facts
    evidence: RecordedEvidence
    compared_with: str  # "Client MX" or "MX": which host list the names are compared with
    checks: tuple[NameCheck, ...]
    action: str  # what the current [policy] does with the verdict, dry run included

    @property
    def policy_action(self) -> str:
        """The action the policy decides, as the log line records it (also in a dry run)."""
        return self.action.removeprefix(DRY_RUN).removesuffix(")")


def rerun(logged: LoggedVerdict, config: Config, resolver: MxResolver) -> Rerun:
    """Look up Client MX now and evaluate what the log recorded.

    The engine gets no trust store: the certificate is not in the log, so nothing is validated;
    its validator answers what the log recorded.
    """
    recorded = recorded_evidence(logged)
    if not logged.domain:  # MAIL FROM:<> or unusable: decided before any lookup
        same = Verdict(logged.result, logged.reason, evidence=logged.evidence, names=logged.names)
        return Rerun(None, same, recorded, "Client MX", (), _action(same, config))
    try:
        domain = normalize_domain(logged.domain)
    except InputError as exc:
        shown = quote(logged.domain)
        raise InputError(f"the verdict's domain {shown} is unusable: {exc}") from None
    engine = Engine(config, resolver, recorded.validator, SystemClock())
    lookup = resolver.client_mx(domain, config.dns.budget)
    fallback = lookup.status is LookupStatus.NOT_FOUND and config.policy.server_mx_fallback
    needs_certificate = (lookup.status is LookupStatus.OK and not lookup.null) or fallback
    verdict: Verdict | None = None
    if recorded.known or not needs_certificate:
        # The domain is all the evaluation needs of the envelope: the HELO fallback evaluated
        # the HELO name as this same domain.
        transaction = Transaction(mail_from=f"<postmaster@{domain}>", helo=logged.helo)
        verdict = engine.evaluate(transaction, recorded.evidence, client_mx=lookup)
    hosts = verdict.hosts if verdict is not None and fallback else lookup.hosts
    checks = compare_names(logged.names, hosts, allow_wildcards=config.tls.allow_wildcards)
    action = _action(verdict, config) if verdict is not None else "unknown"
    return Rerun(lookup, verdict, recorded, "MX" if fallback else "Client MX", checks, action)


def _action(verdict: Verdict, config: Config) -> str:
    action = action_for(verdict, config.policy).value
    if config.policy.dry_run and action != "accept":
        return f"{DRY_RUN}{action})"
    return action


# What to do, per reason class (core/reason_class.py, the metrics label values).
HINTS = {
    "ok": "nothing to do: a certificate name is a published host",
    "no_tls": "the client did not use STARTTLS: a domain that publishes Client MX must send "
    "over TLS with a client certificate",
    "no_cert": "no certificate the MTA verified: the MTA must ask for one (Postfix "
    "smtpd_tls_ask_ccert = yes) and trust its CA (smtpd_tls_CAfile), or the partner sent none",
    "untrusted": "the MTA did not trust the certificate and no chain was fetched: add the "
    "partner's CA to the MTA's CA file, or let the milter fetch the chain (docs/evidence.md)",
    "chain_invalid": "the chain does not validate: the partner must send a complete, unexpired "
    "chain from a CA in [tls] trust with an allowed key; re-check it with mtls-milter check",
    "name_mismatch": "the partner must publish the certificate's name in Client MX or use a "
    "certificate naming a published host",
    "null_cmx": "the domain says no host sends its mail (Client MX '0 .'); if the mail is "
    "genuine, the partner must publish its sending hosts instead",
    "not_opted_in": "nothing to fix here: the domain publishes no Client MX; the partner can "
    "opt in with the records mtls-milter record prints",
    "no_domain": "no sender domain to check (MAIL FROM:<> or unusable); [policy] helo_fallback "
    "checks the HELO name of bounces",
    "dns": "a DNS problem: ask the domain's name servers with dig and check [dns] nameservers, "
    "timeout and budget; a tempfail is retried by the sending MTA",
    "internal": "a defect in mtls-milter: the daemon logged a traceback beside the verdict "
    "(logger mtls_milter.engine); report it",
    "none_other": "see docs/troubleshooting.md",
}
