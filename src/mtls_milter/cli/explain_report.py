"""What ``mtls-milter explain`` prints: the logged verdict, today's DNS, the names, the verdict now.

Every value that came from the log or from DNS is outside data and goes through
:func:`~mtls_milter.core.quote.clip` before it is printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtls_milter.cli.explain_line import LoggedVerdict
from mtls_milter.cli.explain_rerun import (
    HINTS,
    MAX_HOSTS_COMPARED,
    MAX_NAMES_COMPARED,
    NameCheck,
    Rerun,
    rerun,
)
from mtls_milter.config import Config
from mtls_milter.core.evidence import EvidenceKind
from mtls_milter.core.lookups import LookupStatus, MxResolver
from mtls_milter.core.quote import clip
from mtls_milter.core.reason_class import reason_class


@dataclass(frozen=True, slots=True)
class Explanation:
    """A logged verdict, its re-run now, and how they differ."""

    logged: LoggedVerdict
    now: Rerun
    allow_wildcards: bool
    changes: tuple[str, ...]  # empty: the re-run agrees with the log

    @property
    def agrees(self) -> bool:
        return not self.changes

    @property
    def logged_class(self) -> str:
        return reason_class(self.logged.result, self.logged.reason)

    @property
    def now_class(self) -> str | None:
        verdict = self.now.verdict
        return None if verdict is None else reason_class(verdict.result, verdict.reason)

    @property
    def now_hosts(self) -> tuple[str, ...]:
        """The published hosts the re-run compared the names with."""
        if self.now.verdict is not None and self.now.verdict.hosts:
            return self.now.verdict.hosts
        return self.now.lookup.hosts if self.now.lookup is not None else ()


def report(logged: LoggedVerdict, config: Config, resolver: MxResolver) -> Explanation:
    """Re-run ``logged`` now and say what changed."""
    now = rerun(logged, config, resolver)
    draft = Explanation(logged, now, config.tls.allow_wildcards, ())
    return Explanation(logged, now, config.tls.allow_wildcards, _changes(draft))


def _changes(ex: Explanation) -> tuple[str, ...]:
    logged, verdict = ex.logged, ex.now.verdict
    changes: list[str] = []
    if logged.hosts is not None and ex.now.lookup is not None:
        added = sorted(set(ex.now_hosts) - set(logged.hosts))
        removed = sorted(set(logged.hosts) - set(ex.now_hosts))
        if _hosts_cut(logged):
            added = []  # the hosts the line left out may be these
        if added or removed:
            changes.append(
                f"published hosts changed: added {_list(added)}; removed {_list(removed)}"
            )
    if verdict is None:
        changes.append(
            "the evaluation now needs the certificate, but the milter decided on DNS alone "
            "then, so the log holds no certificate names"
        )
    elif verdict.result is not logged.result or ex.now_class != ex.logged_class:
        changes.append(
            f"result {logged.result.value} ({ex.logged_class}) then, "
            f"{verdict.result.value} ({ex.now_class}) now: {clip(verdict.reason)}"
        )
    return tuple(changes)


def _hosts_cut(logged: LoggedVerdict) -> bool:
    """Whether the line lists only some of the hosts (the milter logs ten at most)."""
    count = logged.hosts_count
    return logged.hosts is not None and count is not None and count > len(logged.hosts)


def _list(items: list[str] | tuple[str, ...]) -> str:
    return ", ".join(clip(i) for i in items) if items else "(none)"


def render_json(ex: Explanation) -> dict[str, Any]:
    """The ``--json`` object."""
    verdict, lookup = ex.now.verdict, ex.now.lookup
    now: dict[str, Any] | None = None
    if verdict is not None:
        now = {**verdict.as_dict(), "reason": clip(verdict.reason, 400)}
        now["reason_class"] = ex.now_class
    client_mx = None
    if lookup is not None:
        client_mx = {
            "domain": clip(verdict.domain if verdict else ex.logged.domain),
            "status": lookup.status.value,
            "hosts": [clip(h) for h in lookup.hosts],
            "null": lookup.null,
            "ttl": _ttl(lookup),
            "detail": clip(lookup.detail) or None,
            "logged_hosts": ex.logged.as_dict()["hosts"],
        }
    return {
        "logged": {**ex.logged.as_dict(), "reason_class": ex.logged_class},
        "client_mx": client_mx,
        "comparison": {
            "with": ex.now.compared_with,
            "hosts": [clip(h) for h in ex.now_hosts],
            "allow_wildcards": ex.allow_wildcards,
            "checks": [_check_dict(c) for c in ex.now.checks],
        },
        "certificate": {"rechecked": False, "how_to_check": _how_to_check(ex)},
        "now": now,
        "action_now": ex.now.action,
        "agrees": ex.agrees,
        "changes": list(ex.changes),
        "hint": _hint(ex.logged_class),
        "hint_now": _hint(ex.now_class) if ex.now_class else None,
    }


def _check_dict(check: NameCheck) -> dict[str, Any]:
    return {
        "name": clip(check.name),
        "host": clip(check.host),
        "matches": check.matches,
        "why": clip(check.why, 400),
    }


def _ttl(lookup: object) -> int | None:
    ttl = getattr(lookup, "ttl", None)  # the resolver reports it when it knows it
    return ttl if isinstance(ttl, int) and not isinstance(ttl, bool) else None


def _how_to_check(ex: Explanation) -> list[str]:
    """Commands that check what the log cannot hold: the certificate and its chain."""
    domain = clip(ex.logged.domain) or "DOMAIN"
    return [
        f"mtls-milter check --mail-from postmaster@{domain} --chain PARTNER-CHAIN.pem",
        f"mtls-milter probe --sender {domain}",
    ]


def render_text(ex: Explanation) -> str:
    """The step-by-step account for a terminal."""
    lines = [*_logged_lines(ex), *_dns_lines(ex), *_name_lines(ex), *_chain_lines(ex)]
    return "\n".join([*lines, *_verdict_lines(ex)]) + "\n"


def _logged_lines(ex: Explanation) -> list[str]:
    log = ex.logged
    when = f" at {clip(log.time)}" if log.time else ""
    lines = [
        f"1. Logged{when}, queue id {clip(log.queue_id) or '(none)'}:",
        f"   client {clip(log.client) or '(unknown)'}, HELO {clip(log.helo) or '(none)'}, "
        f"domain {clip(log.domain) or '(none)'}",
        f"   mtls={log.result.value}: {clip(log.reason, 400)} [{ex.logged_class}]",
        f"   action {clip(log.action) or '(not logged)'}" + (" (dry run)" if log.dry_run else ""),
    ]
    if log.timings_ms:
        shown = ", ".join(f"{k} {v:g} ms" for k, v in log.timings_ms.items())
        lines.append(f"   timings: {clip(shown, 400)}")
    if log.dmarc:
        lines.append("   (the line also holds a DMARC result: explain re-runs mtls only)")
    return lines


def _dns_lines(ex: Explanation) -> list[str]:
    lookup, log = ex.now.lookup, ex.logged
    if lookup is None:
        return ["2. Client MX now: not looked up, the message had no usable sender domain"]
    status = lookup.status.value
    if lookup.status is LookupStatus.OK:
        status = "null Client MX ('0 .')" if lookup.null else "ok"
    ttl = _ttl(lookup)
    lines = [
        f"2. Client MX of {clip(log.domain)} now: {status}"
        + (f" ({clip(lookup.detail)})" if lookup.detail else "")
        + (f", TTL {ttl} s" if ttl is not None else ""),
        f"   hosts now:    {_list(lookup.hosts)}",
    ]
    if ex.now.compared_with == "MX":
        lines.append(f"   MX hosts now: {_list(ex.now_hosts)} ([policy] server_mx_fallback)")
    if log.hosts is None:
        lines.append("   hosts then:   not recorded in this log line")
    else:
        ttl_then = f", TTL {log.ttl} s" if log.ttl is not None else ""
        same = "same" if set(log.hosts) == set(ex.now_hosts) else "DIFFERENT"
        if _hosts_cut(log):
            ttl_then = f" (the first {len(log.hosts)} of {log.hosts_count}){ttl_then}"
            same = "DIFFERENT" if set(log.hosts) - set(ex.now_hosts) else "the listed ones remain"
        lines.append(f"   hosts then:   {_list(log.hosts)}{ttl_then} ({same})")
    return lines


def _name_lines(ex: Explanation) -> list[str]:
    wildcards = "on" if ex.allow_wildcards else "off"
    lines = [
        f"3. Certificate names from the log vs the {ex.now.compared_with} hosts now "
        f"(exact match, lower case, no final dot; wildcards {wildcards}):"
    ]
    if not ex.logged.names:
        lines.append("   the log records no certificate names")
    elif not ex.now.checks:
        lines.append(f"   names {_list(ex.logged.names)}: no published hosts to compare with")
    for check in ex.now.checks:
        verdict = "MATCH" if check.matches else "no"
        lines.append(f"   {clip(check.name)} vs {clip(check.host)}: {verdict}, {clip(check.why)}")
    names, hosts = len(ex.logged.names), len(ex.now_hosts)
    if names > MAX_NAMES_COMPARED or hosts > MAX_HOSTS_COMPARED:
        lines.append(
            f"   (compared: the first {min(names, MAX_NAMES_COMPARED)} of {names} names and "
            f"{min(hosts, MAX_HOSTS_COMPARED)} of {hosts} hosts)"
        )
    return lines


_FINGERPRINT_SOURCES = {
    "none": "none known (no chain could be fetched)",
    "macro": "from the MTA's macros (Sendmail)",
    "policy_service": "from the Postfix policy service",
}


def _chain_lines(ex: Explanation) -> list[str]:
    log = ex.logged
    source = ""
    if log.fingerprint_source:
        shown = _FINGERPRINT_SOURCES.get(log.fingerprint_source, clip(log.fingerprint_source))
        source = f"; certificate fingerprint: {shown}"
    lines = [f"4. Certificate and chain, as logged: evidence {log.evidence.value}{source}"]
    if log.chain:
        lines.append(f"   chain fetch: {clip(log.chain)}")
    if log.evidence is EvidenceKind.MTA:
        lines.append("   the MTA verified the certificate; its CN is the name above")
    if log.evidence is EvidenceKind.CHAIN:
        recorded = ex.now.evidence.validator.recorded
        outcome = "valid" if recorded.valid else f"invalid: {clip(recorded.error)}"
        lines.append(f"   the milter validated the chain itself: {outcome}")
        if not recorded.valid and any(check.matches for check in ex.now.checks):
            lines.append("   (so a name that matches above does not make it pass)")
    lines.append(
        "   The certificate is not in the log: its chain, validity and key are not re-checked;"
    )
    lines.append("   the re-run takes the logged outcome as it stands.")
    lines.append("   To check them: ask the partner for the chain, or see what its hosts serve:")
    lines += [f"     {command}" for command in _how_to_check(ex)]
    return lines


_MTLS_ACTIONS = ("accept", "reject", "tempfail")


def _verdict_lines(ex: Explanation) -> list[str]:
    verdict = ex.now.verdict
    if verdict is None:
        now = "cannot tell: the log holds no certificate facts for it"
    else:
        now = f"mtls={verdict.result.value}: {clip(verdict.reason, 400)} [{ex.now_class}]"
    lines = [f"5. Verdict now: {now}", f"   action under the current policy: {ex.now.action}"]
    then, log = ex.logged.action, ex.logged
    same_result = verdict is not None and verdict.result is log.result
    # DMARC may have set the logged action: then it cannot be compared with mtls's alone.
    if same_result and not log.dmarc and then in _MTLS_ACTIONS and then != ex.now.policy_action:
        lines.append(f"   (logged action {then}: the daemon's [policy] differs; --config?)")
    if ex.agrees:
        lines.append("   agrees with the log")
    lines += [f"   CHANGED: {change}" for change in ex.changes]
    lines.append(f"   what to do: {_hint(ex.logged_class)}")
    if ex.now_class is not None and ex.now_class != ex.logged_class:
        lines.append(f"   what to do now: {_hint(ex.now_class)}")
    return lines


def _hint(cls: str) -> str:
    return HINTS.get(cls, HINTS["none_other"])
