"""Evaluate one transaction: evidence + MAIL FROM + DNS answers + clock → a verdict (SPEC §4).

This is the pure heart of the product. It performs no I/O of its own: DNS goes through the
injected resolver, chain validation through the injected validator, time through the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from mtls_milter.config import Config
from mtls_milter.core.certs import ChainValidator, name_matches
from mtls_milter.core.clock import Clock
from mtls_milter.core.dns import HostLookup, LookupStatus, MxResolver
from mtls_milter.core.evidence import CertPresence, Evidence, EvidenceKind
from mtls_milter.core.header import MtlsField
from mtls_milter.core.names import SenderKind, normalize_domain, parse_mail_from

MAX_COMMENT_NAMES = 5


class Result(StrEnum):
    """The mtls method results (SPEC §4)."""

    PASS = "pass"
    FAIL = "fail"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class Source(StrEnum):
    """Which published host list a match was made against."""

    CLIENT_MX = "client-mx"
    SERVER_MX = "server-mx"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one evaluation, with everything a log line or header needs."""

    result: Result
    reason: str
    domain: str = ""
    identity: str = "mailfrom"  # the smtp ptype property: "mailfrom" or "helo"
    evidence: EvidenceKind = EvidenceKind.NONE
    names: tuple[str, ...] = ()
    matched: str = ""
    source: str = ""  # Source value, or "" when nothing matched
    hosts: tuple[str, ...] = ()  # the published hosts the names were compared with

    def header_field(self, authserv_id: str) -> MtlsField:
        """The Authentication-Results field for this verdict."""
        comment = [f"evidence={self.evidence}"]
        if self.result is Result.PASS:
            comment.append(f"matched {self.matched} in {self.source}")
        elif self.names:
            shown = ",".join(self.names[:MAX_COMMENT_NAMES])
            more = ",..." if len(self.names) > MAX_COMMENT_NAMES else ""
            comment.append(f"names={shown}{more}")
        return MtlsField(
            authserv_id=authserv_id,
            result=self.result.value,
            reason="" if self.result is Result.PASS else self.reason,
            comment=tuple(comment),
            ptype_property=self.identity,
            value=self.domain,
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (the ``check --json`` fields, minus the header)."""
        return {
            "result": self.result.value,
            "reason": self.reason,
            "domain": self.domain,
            "identity": f"smtp.{self.identity}",
            "evidence": self.evidence.value,
            "names": list(self.names),
            "matched": self.matched or None,
            "source": self.source or None,
            "hosts": list(self.hosts),
        }


@dataclass(frozen=True, slots=True)
class Transaction:
    """The envelope facts of one transaction."""

    mail_from: str
    helo: str = ""


@dataclass(frozen=True, slots=True)
class _Names:
    """Host names from one kind of evidence."""

    kind: EvidenceKind
    names: tuple[str, ...]


def evaluate(
    transaction: Transaction,
    evidence: Evidence,
    config: Config,
    resolver: MxResolver,
    validator: ChainValidator,
    clock: Clock,
) -> Verdict:
    """Compute the mtls result of one transaction (SPEC §4)."""
    domain, identity, early = _identity(transaction, config)
    if early is not None:
        return early
    if not evidence.session.tls:
        return Verdict(Result.NONE, "no TLS", domain, identity)
    started = clock.monotonic()
    lookup = resolver.client_mx(domain, config.dns.budget)
    base = Verdict(Result.NONE, "", domain, identity, hosts=lookup.hosts)
    if lookup.status is LookupStatus.TEMPFAIL:
        return replace(
            base, result=Result.TEMPERROR, reason=f"Client MX lookup failed: {lookup.detail}"
        )
    if lookup.status is LookupStatus.PERMFAIL:
        return replace(
            base,
            result=Result.PERMERROR,
            reason=f"Client MX unusable: {lookup.detail.removeprefix('Client MX ')}",
        )
    if lookup.status is LookupStatus.NOT_FOUND:
        remaining = config.dns.budget - (clock.monotonic() - started)
        return _not_opted_in(base, evidence, config, resolver, validator, clock, remaining)
    if lookup.null:
        return replace(
            base,
            result=Result.FAIL,
            reason=f"{domain} publishes a null Client MX: no host may send",
        )
    candidates, problem = _candidate_names(evidence, validator, clock)
    if problem is not None:
        return replace(
            base,
            result=Result.FAIL,
            reason=problem.reason,
            evidence=problem.evidence,
            names=problem.names,
        )
    return _match(base, candidates, lookup, Source.CLIENT_MX, config, on_mismatch=Result.FAIL)


def _identity(transaction: Transaction, config: Config) -> tuple[str, str, Verdict | None]:
    """The domain to evaluate and its ptype property, or an early verdict."""
    sender = parse_mail_from(transaction.mail_from)
    if sender.kind is SenderKind.DOMAIN:
        return sender.domain, "mailfrom", None
    if sender.kind is SenderKind.UNUSABLE:
        return "", "mailfrom", Verdict(Result.NONE, sender.problem)
    if not config.policy.helo_fallback:
        return "", "mailfrom", Verdict(Result.NONE, "null sender (MAIL FROM:<>)")
    try:
        return normalize_domain(transaction.helo), "helo", None
    except ValueError as exc:
        reason = f"null sender and HELO name {transaction.helo[:80]!r} unusable: {exc}"
        return "", "helo", Verdict(Result.NONE, reason, identity="helo")


@dataclass(frozen=True, slots=True)
class _Problem:
    reason: str
    evidence: EvidenceKind = EvidenceKind.NONE
    names: tuple[str, ...] = ()


def _candidate_names(
    evidence: Evidence, validator: ChainValidator, clock: Clock
) -> tuple[list[_Names], _Problem | None]:
    """Host names from each usable kind of evidence, strongest first, or why there are none."""
    candidates: list[_Names] = []
    chain_problem: _Problem | None = None
    if evidence.chain:
        verdict = validator.validate_client(evidence.chain, clock.now())
        if verdict.valid:
            candidates.append(_Names(EvidenceKind.CHAIN, verdict.names))
        else:
            reason = f"chain invalid: {verdict.error}"
            chain_problem = _Problem(reason, EvidenceKind.CHAIN, verdict.names)
    session = evidence.session
    if session.mta_verified:
        candidates.append(_Names(EvidenceKind.MTA, (session.mta_cn,) if session.mta_cn else ()))
    if candidates:
        return candidates, None
    if chain_problem is not None:
        return [], chain_problem
    if session.certificate is CertPresence.ABSENT:
        return [], _Problem("no client certificate")
    if session.certificate is CertPresence.PRESENTED:
        return [], _Problem("certificate not trusted by the MTA and no chain available")
    return [], _Problem("no client certificate verified by the MTA")


def _match(
    base: Verdict,
    candidates: Sequence[_Names],
    lookup: HostLookup,
    source: Source,
    config: Config,
    *,
    on_mismatch: Result,
) -> Verdict:
    wildcards = config.tls.allow_wildcards
    for candidate in candidates:
        for host in lookup.hosts:
            for name in candidate.names:
                if name_matches(name, host, allow_wildcards=wildcards):
                    reason = f"certificate name {name} matches {source} host {host}"
                    return replace(
                        base,
                        result=Result.PASS,
                        reason=reason,
                        evidence=candidate.kind,
                        names=candidate.names,
                        matched=host,
                        source=source.value,
                    )
    strongest = candidates[0]
    if not strongest.names:
        reason = "the MTA-verified certificate has no usable CN and no chain is available"
    else:
        what = "Client MX" if source is Source.CLIENT_MX else "MX"
        reason = f"no certificate name matches {what}"
    return replace(
        base, result=on_mismatch, reason=reason, evidence=strongest.kind, names=strongest.names
    )


def _not_opted_in(
    base: Verdict,
    evidence: Evidence,
    config: Config,
    resolver: MxResolver,
    validator: ChainValidator,
    clock: Clock,
    budget: float,
) -> Verdict:
    """``none``, unless the server-MX fallback finds a match (SPEC §4)."""
    not_published = f"{base.domain} does not publish Client MX"
    if not config.policy.server_mx_fallback:
        return replace(base, reason=not_published)
    candidates, problem = _candidate_names(evidence, validator, clock)
    if problem is not None:
        return replace(base, reason=f"{not_published}; {problem.reason}", evidence=problem.evidence)
    lookup = resolver.server_mx(base.domain, budget)
    base = replace(base, hosts=lookup.hosts)
    if lookup.status is LookupStatus.TEMPFAIL:
        return replace(base, result=Result.TEMPERROR, reason=f"MX lookup failed: {lookup.detail}")
    if lookup.status is not LookupStatus.OK or lookup.null:
        detail = lookup.detail or "null MX"
        return replace(base, reason=f"{not_published}; no usable MX ({detail})")
    verdict = _match(base, candidates, lookup, Source.SERVER_MX, config, on_mismatch=Result.NONE)
    if verdict.result is Result.NONE:
        return replace(verdict, reason=f"{not_published}; {verdict.reason}")
    return verdict
