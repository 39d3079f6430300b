"""Evaluate one transaction: evidence + MAIL FROM + DNS answers + clock → a verdict.

This is the pure heart of the product. It performs no I/O of its own: DNS goes through the
injected resolver, chain validation through the injected validator, time through the clock.
docs/design.md ("Result table", "Evidence model") states the rules this module implements.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from mtls_milter.config import Config
from mtls_milter.core.certs import name_matches
from mtls_milter.core.chain import ChainValidator
from mtls_milter.core.clock import Clock
from mtls_milter.core.evidence import CertPresence, Evidence, EvidenceKind
from mtls_milter.core.header import MtlsField
from mtls_milter.core.lookups import HostLookup, LookupStatus, MxResolver
from mtls_milter.core.names import SenderKind, normalize_domain, parse_mail_from
from mtls_milter.core.quote import clip, quote
from mtls_milter.errors import InputError

MAX_COMMENT_NAMES = 5


class Result(StrEnum):
    """The mtls method results (RFC 8601 result names)."""

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
    """The host names of the evidence a verdict rests on."""

    kind: EvidenceKind
    names: tuple[str, ...]


def evaluate(
    transaction: Transaction,
    evidence: Evidence,
    config: Config,
    resolver: MxResolver,
    validator: ChainValidator,
    clock: Clock,
    *,
    client_mx: HostLookup | None = None,
) -> Verdict:
    """Compute the mtls result of one transaction (the table in docs/design.md).

    Client MX is looked up whatever the TLS facts: whether a session without TLS is ``none``
    or ``fail`` depends on whether the domain opted in. ``client_mx`` is an answer the caller
    already holds for the domain (a milter looks it up at MAIL FROM): it is used instead of
    asking again, which matters for failures (they are not cached, and asking again would
    spend the DNS budget twice). Raises only on internal errors (a bug, or a collaborator that
    failed); :meth:`mtls_milter.engine.Engine.evaluate` maps those.
    """
    domain, identity, early = _identity(transaction, config)
    if early is not None:
        return early
    started = clock.monotonic()
    lookup = client_mx or resolver.client_mx(domain, config.dns.budget)
    base = Verdict(Result.NONE, "", domain, identity, hosts=lookup.hosts)
    if lookup.status is LookupStatus.TEMPFAIL:
        reason = f"Client MX lookup failed: {clip(lookup.detail)}"
        return replace(base, result=Result.TEMPERROR, reason=reason)
    if lookup.status is LookupStatus.PERMFAIL:
        reason = f"Client MX unusable: {clip(lookup.detail.removeprefix('Client MX '))}"
        return replace(base, result=Result.PERMERROR, reason=reason)
    if lookup.status is LookupStatus.NOT_FOUND:
        remaining = config.dns.budget - (clock.monotonic() - started)
        return _not_opted_in(base, evidence, config, resolver, validator, clock, remaining)
    if lookup.null:
        reason = f"{domain} publishes a null Client MX: no host may send"
        return replace(base, result=Result.FAIL, reason=reason)
    candidate = _candidate_names(evidence, validator, clock)
    if isinstance(candidate, _Problem):
        return replace(
            base,
            result=Result.FAIL,
            reason=candidate.reason,
            evidence=candidate.evidence,
            names=candidate.names,
        )
    return _match(base, candidate, lookup, Source.CLIENT_MX, config, on_mismatch=Result.FAIL)


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
    except InputError as exc:
        reason = f"null sender and HELO name {quote(transaction.helo)} unusable: {exc}"
        return "", "helo", Verdict(Result.NONE, reason, identity="helo")


@dataclass(frozen=True, slots=True)
class _Problem:
    """Why there are no host names to compare."""

    reason: str
    evidence: EvidenceKind = EvidenceKind.NONE
    names: tuple[str, ...] = ()


def _candidate_names(
    evidence: Evidence, validator: ChainValidator, clock: Clock
) -> _Names | _Problem:
    """The host names of the strongest evidence, or why there are none.

    A chain bound to the session is authoritative: when it validates, its names are the only
    names (the MTA's CN is not tried on its own); when it does not, that is the answer, whatever
    the MTA concluded.
    """
    session = evidence.session
    if not session.tls:
        return _Problem("no TLS")
    if evidence.chain:
        verdict = validator.validate_client(evidence.chain, clock.now())
        if verdict.valid:
            return _Names(EvidenceKind.CHAIN, verdict.names)
        return _Problem(f"chain invalid: {clip(verdict.error)}", EvidenceKind.CHAIN, verdict.names)
    if session.mta_verified:
        return _Names(EvidenceKind.MTA, (session.mta_cn,) if session.mta_cn else ())
    if session.certificate is CertPresence.ABSENT:
        return _Problem("no client certificate")
    if session.certificate is CertPresence.PRESENTED:
        return _Problem("certificate not trusted by the MTA and no chain available")
    return _Problem("no client certificate verified by the MTA")


def _match(
    base: Verdict,
    candidate: _Names,
    lookup: HostLookup,
    source: Source,
    config: Config,
    *,
    on_mismatch: Result,
) -> Verdict:
    """``pass`` when one of the candidate names matches a published host, else ``on_mismatch``."""
    wildcards = config.tls.allow_wildcards
    for host in lookup.hosts:
        for name in candidate.names:
            if name_matches(name, host, allow_wildcards=wildcards):
                return replace(
                    base,
                    result=Result.PASS,
                    reason=f"certificate name {name} matches {source} host {host}",
                    evidence=candidate.kind,
                    names=candidate.names,
                    matched=host,
                    source=source.value,
                )
    if candidate.names:
        what = "Client MX" if source is Source.CLIENT_MX else "MX"
        reason = f"no certificate name matches {what}"
    elif candidate.kind is EvidenceKind.CHAIN:
        reason = "the certificate has no usable host name"
    else:
        reason = "the MTA-verified certificate has no usable CN and no chain is available"
    return replace(
        base, result=on_mismatch, reason=reason, evidence=candidate.kind, names=candidate.names
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
    """``none``, unless the server-MX fallback finds a match; never ``fail``."""
    not_published = f"{base.domain} does not publish Client MX"
    if not config.policy.server_mx_fallback:
        tls_note = "" if evidence.session.tls else "; no TLS"
        return replace(base, reason=not_published + tls_note)
    candidate = _candidate_names(evidence, validator, clock)
    if isinstance(candidate, _Problem):
        reason = f"{not_published}; {candidate.reason}"
        return replace(base, reason=reason, evidence=candidate.evidence)
    lookup = resolver.server_mx(base.domain, budget)
    base = replace(base, hosts=lookup.hosts)
    if lookup.status is LookupStatus.TEMPFAIL:
        reason = f"MX lookup failed: {clip(lookup.detail)}"
        return replace(base, result=Result.TEMPERROR, reason=reason)
    if lookup.status is not LookupStatus.OK or lookup.null:
        detail = clip(lookup.detail) if lookup.detail else "null MX"
        return replace(base, reason=f"{not_published}; no usable MX ({detail})")
    verdict = _match(base, candidate, lookup, Source.SERVER_MX, config, on_mismatch=Result.NONE)
    if verdict.result is Result.NONE:
        return replace(verdict, reason=f"{not_published}; {verdict.reason}")
    return verdict
