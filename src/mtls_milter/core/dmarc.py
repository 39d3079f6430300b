"""DMARC evaluation (RFC 9989) with mtls as a third authentication method, and its action.

An identifier is *authenticated* when its method's result is ``pass``: SPF and mtls
authenticate the MAIL FROM domain (alignment by ``aspf``), DKIM a signature's ``d=`` domain
(alignment by ``adkim``). DMARC passes when at least one authenticated identifier is aligned
with the author domain: strictly (the same name) or relaxed (the same organizational domain, found
by the RFC 9989 tree walk). The result names every aligned method. Pure: DNS comes through the
injected resolver, time through the injected clock; never raises on outside input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from mtls_milter.core.author import AuthorStatus, author_domains
from mtls_milter.core.clock import Clock
from mtls_milter.core.dmarc_record import Policy
from mtls_milter.core.dmarc_walk import Budget, Found, Walk, organizational_domain, tree_walk
from mtls_milter.core.header import MethodResult
from mtls_milter.core.lookups import LookupStatus, TxtResolver

__all__ = [
    "DmarcAction",
    "DmarcDecision",
    "DmarcResult",
    "Identifier",
    "decide",
    "dmarc_method",
    "evaluate_dmarc",
    "identifier_method",
]

METHOD_ORDER = ("mtls", "spf", "dkim")


@dataclass(frozen=True, slots=True)
class Identifier:
    """One authentication result: ``method`` (mtls, spf, dkim), its ``result``, the domain it
    is about (MAIL FROM domain, or DKIM ``d=``), and a DKIM selector."""

    method: str
    result: str
    domain: str
    selector: str = ""


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """The DMARC outcome for one message."""

    result: str  # pass, fail, none, temperror, permerror
    reason: str = ""
    domain: str = ""  # the (first) author domain
    policy: str = ""  # the policy that applies to this author domain: none/quarantine/reject
    aligned: tuple[str, ...] = ()  # aligned authenticated methods, in METHOD_ORDER
    testing: bool = False  # t=y
    record_domain: str = ""  # where the policy record was found
    warnings: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """The ``check --json`` ``dmarc`` object (without spf/dkim details)."""
        return {
            "result": self.result,
            "policy": self.policy or None,
            "domain": self.domain or None,
            "aligned": list(self.aligned),
            "reason": self.reason,
            "testing": self.testing,
            "record_domain": self.record_domain or None,
            "warnings": list(self.warnings),
        }


def evaluate_dmarc(
    from_fields: list[str | bytes],
    identifiers: tuple[Identifier, ...],
    resolver: TxtResolver,
    clock: Clock,
    budget_seconds: float,
) -> DmarcResult:
    """DMARC for a message with From field values ``from_fields`` and ``identifiers``."""
    author = author_domains(from_fields)
    if author.status is AuthorStatus.NONE:
        return DmarcResult("none", reason=author.reason)
    if author.status is AuthorStatus.PERMERROR:
        return DmarcResult("permerror", reason=author.reason)
    budget = Budget(clock, budget_seconds)
    results = [_evaluate_domain(d, identifiers, resolver, budget) for d in author.domains]
    first = results[0]
    if len(results) == 1:
        return first
    if any(r.result == "temperror" for r in results):
        return next(r for r in results if r.result == "temperror")
    if len({(r.record_domain, r.policy) for r in results}) > 1:
        return DmarcResult(
            "permerror",
            reason="several author domains with different DMARC policies",
            domain=first.domain,
        )
    failing = [r for r in results if r.result != "pass"]
    return failing[0] if failing else first


def _evaluate_domain(
    domain: str, identifiers: tuple[Identifier, ...], resolver: TxtResolver, budget: Budget
) -> DmarcResult:
    walk = tree_walk(domain, resolver, budget)
    if walk.error:
        return DmarcResult("temperror", reason=f"DMARC policy lookup: {walk.error}", domain=domain)
    if not walk.found:
        return DmarcResult("none", reason="no DMARC policy record", domain=domain)
    found = walk.found[0]
    policy = _applicable_policy(domain, found, resolver, budget)
    if policy is None:
        return DmarcResult("temperror", reason="DNS failure checking the domain", domain=domain)
    base = DmarcResult(
        "fail",
        domain=domain,
        policy=policy.value,
        testing=found.record.testing,
        record_domain=found.domain,
        warnings=found.record.warnings,
    )
    org = organizational_domain(walk)
    aligned: list[str] = []
    errors: list[str] = []
    for ident in identifiers:
        if ident.result != "pass" or not ident.domain or ident.method in aligned:
            continue
        mode = found.record.adkim if ident.method == "dkim" else found.record.aspf
        verdict = _aligned(ident.domain.lower(), domain, org, mode, resolver, budget)
        if verdict is None:
            errors.append(ident.method)
        elif verdict:
            aligned.append(ident.method)
    aligned.sort(key=METHOD_ORDER.index)
    if aligned:
        return _with(base, "pass", "aligned " + ",".join(aligned), tuple(aligned))
    if errors:
        return _with(base, "temperror", "DNS failure aligning " + ",".join(errors), ())
    return _with(base, "fail", "no aligned authenticated identifier", ())


def _with(base: DmarcResult, result: str, reason: str, aligned: tuple[str, ...]) -> DmarcResult:
    return DmarcResult(
        result,
        reason,
        base.domain,
        base.policy,
        aligned,
        base.testing,
        base.record_domain,
        base.warnings,
    )


def _applicable_policy(
    domain: str, found: Found, resolver: TxtResolver, budget: Budget
) -> Policy | None:
    """p= for the author domain's own record; for a record found higher up, np= when the
    author domain does not exist, else sp=, else p=. None: a DNS failure decided nothing."""
    record = found.record
    if found.domain == domain:
        return record.p
    inherited = record.sp or record.p
    if record.np is None:
        return inherited
    # Non-existence by RFC 8020: NXDOMAIN means nothing exists at or below the name.
    lookup = resolver.txt(domain, budget.remaining())
    if lookup.status is LookupStatus.TEMPFAIL:
        return None
    if lookup.status is LookupStatus.NOT_FOUND and "NXDOMAIN" in lookup.detail:
        return record.np
    return inherited


def _aligned(
    ident: str, author: str, author_org: str, mode: str, resolver: TxtResolver, budget: Budget
) -> bool | None:
    """Whether ``ident`` aligns with ``author``; None on a DNS failure."""
    if ident == author:
        return True
    if mode == "s":
        return False
    if not (ident.endswith("." + author_org) or ident == author_org):
        return False  # a different organizational domain cannot share author_org
    walk: Walk = tree_walk(ident, resolver, budget)
    if walk.error:
        return None
    return organizational_domain(walk) == author_org


class DmarcAction(StrEnum):
    """What the milter does with the message for DMARC."""

    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class DmarcDecision:
    """An action, the SMTP reply for a reject, and why (for the log line)."""

    action: DmarcAction
    why: str
    reply: tuple[str, str, str] = ("", "", "")  # code, enhanced status, text


def decide(result: DmarcResult, *, enforce: bool, dry_run: bool) -> DmarcDecision:
    """The action for ``result``: only a ``fail`` under p=quarantine/reject with ``enforce``
    on, not ``t=y`` and not ``dry_run``, acts."""
    if result.result != "fail":
        return DmarcDecision(DmarcAction.NONE, f"dmarc={result.result}")
    wanted = {"reject": DmarcAction.REJECT, "quarantine": DmarcAction.QUARANTINE}.get(
        result.policy, DmarcAction.NONE
    )
    if wanted is DmarcAction.NONE:
        return DmarcDecision(DmarcAction.NONE, f"dmarc=fail, p={result.policy or 'none'}")
    if result.testing:
        return DmarcDecision(DmarcAction.NONE, f"dmarc=fail, p={result.policy} with t=y")
    if not enforce:
        return DmarcDecision(DmarcAction.NONE, f"dmarc=fail, p={result.policy}, enforce off")
    if dry_run:
        return DmarcDecision(DmarcAction.NONE, f"dmarc=fail, p={result.policy}, dry run")
    if wanted is DmarcAction.QUARANTINE:
        return DmarcDecision(DmarcAction.QUARANTINE, "dmarc=fail, p=quarantine")
    text = f"DMARC policy of {result.domain} rejects this message (no aligned authentication)"
    return DmarcDecision(DmarcAction.REJECT, "dmarc=fail, p=reject", ("550", "5.7.1", text))


def dmarc_method(result: DmarcResult) -> MethodResult:
    """Our field's ``dmarc=`` result: ``dmarc=pass (p=reject; aligned=mtls) header.from=d``."""
    parts = [f"p={result.policy}"] if result.policy else []
    if result.aligned:
        parts.append("aligned=" + ",".join(result.aligned))
    if result.result != "pass" and result.reason:
        parts.append(result.reason)
    return MethodResult("dmarc", result.result, "; ".join(parts), (("header.from", result.domain),))


def identifier_method(ident: Identifier) -> MethodResult:
    """Our field's ``spf=`` or ``dkim=`` result for an identifier verified here."""
    if ident.method == "spf":
        return MethodResult("spf", ident.result, "", (("smtp.mailfrom", ident.domain),))
    props = (("header.d", ident.domain), ("header.s", ident.selector))
    return MethodResult("dkim", ident.result, "", props)
