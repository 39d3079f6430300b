"""Outbound (Server MX) policy: what Postfix must require delivering to a domain (docs/outbound.md).

:func:`tls_policy` maps one ``smtp_tls_policy_maps`` lookup key (a next-hop destination) to a
:class:`PolicyAnswer`. It is pure apart from the resolver it is given, and never raises.

* A recipient domain that publishes Client MX has opted in: Postfix must deliver only over TLS
  with a certificate that is valid (``smtp_tls_CAfile``) and names one of the domain's MX hosts:
  ``OK secure match=mx1:mx2 servername=hostname``.
* No Client MX: ``NOTFOUND`` (Postfix falls back to its default level, e.g. ``may`` or ``dane``).
* A DNS failure for the Client MX or the MX lookup: ``TEMP`` so that Postfix defers the mail
  instead of delivering it in the clear.
* Opted in but no MX host (null MX, RFC 7505, or no MX and no address): ``OK secure
  match=<domain>``. The answer stays strict, and Postfix's own MX resolution then finds no host
  and bounces at once as RFC 7505 asks, where ``TEMP`` would keep the mail queued for days.
* The pinned MX set is every MX host, however many (RFC 5321 sets no limit; only Client MX is
  limited to 10 names). Reasons quote at most 200 characters of host lists and keys.
* Keys that are not a plain domain - Postfix's parent-domain probes (``.example.com``), IP
  literals, ``[host]`` and ``[host]:port`` or ``host:port`` next hops an operator routed
  explicitly - are ``NOTFOUND``: the policy is about MX delivery of a recipient domain.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from mtls_milter.config import DEFAULT_DNS_BUDGET
from mtls_milter.core.lookups import HostLookup, LookupStatus, MxResolver
from mtls_milter.core.names import normalize_domain
from mtls_milter.core.quote import clip, quote

__all__ = ["PolicyAnswer", "PolicyKind", "tls_policy"]


class PolicyKind(StrEnum):
    """The socketmap reply status."""

    OK = "OK"
    NOTFOUND = "NOTFOUND"
    TEMP = "TEMP"
    PERM = "PERM"


@dataclass(frozen=True, slots=True)
class PolicyAnswer:
    """One policy decision: ``reply()`` is the socketmap reply, ``reason`` is for the log."""

    kind: PolicyKind
    domain: str = ""  # the normalized domain, empty when the key is not a domain
    policy: str = ""  # for OK: e.g. "secure match=mx1.example:mx2.example servername=hostname"
    reason: str = ""  # why (for TEMP/PERM also the reply text)
    mx_hosts: tuple[str, ...] = ()
    client_mx_hosts: tuple[str, ...] = ()

    @property
    def enforces(self) -> bool:
        """True when this answer makes Postfix require verified TLS."""
        return self.kind is PolicyKind.OK

    def reply(self) -> str:
        """The socketmap reply payload: ``OK <policy>``, ``NOTFOUND ``, ``TEMP <reason>``…"""
        if self.kind is PolicyKind.OK:
            return f"OK {self.policy}"
        if self.kind is PolicyKind.NOTFOUND:
            return "NOTFOUND "
        return f"{self.kind.value} {_reply_text(self.reason)}"


def _reply_text(reason: str) -> str:
    """Reason text safe inside a reply: printable ASCII, one line, bounded."""
    text = "".join(c if " " <= c <= "~" else "?" for c in reason)
    return text[:400] or "unspecified"


def _not_a_domain_key(key: str) -> str:
    """Why ``key`` is not a plain recipient domain, or '' when it is one."""
    if key.startswith("."):
        return "parent-domain probe"
    if key.startswith("["):
        return "explicit [host] or [host]:port next hop"
    try:
        ipaddress.ip_address(key)
    except ValueError:
        pass
    else:
        return "IP address next hop"
    if ":" in key:
        return "explicit host:port next hop"
    return ""


def tls_policy(
    key: str,
    resolver: MxResolver,
    budget: float = DEFAULT_DNS_BUDGET,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> PolicyAnswer:
    """Decide the TLS policy for the next-hop ``key`` of an ``smtp_tls_policy_maps`` lookup.

    ``budget`` bounds the DNS time of the Client MX and MX lookups together. Never raises.
    """
    monotonic = clock
    key = key.strip()
    why_not = _not_a_domain_key(key)
    if why_not:
        return PolicyAnswer(PolicyKind.NOTFOUND, reason=f"{why_not}: {quote(key)}")
    try:
        domain = normalize_domain(key)
    except ValueError as exc:
        return PolicyAnswer(PolicyKind.NOTFOUND, reason=f"not a domain name: {clip(str(exc))}")

    start = monotonic()
    client = resolver.client_mx(domain, budget)
    if client.status is LookupStatus.TEMPFAIL:
        return PolicyAnswer(
            PolicyKind.TEMP, domain, reason=f"Client MX lookup for {domain} failed: {client.detail}"
        )
    if client.status is LookupStatus.NOT_FOUND:
        return PolicyAnswer(PolicyKind.NOTFOUND, domain, reason=f"{domain} publishes no Client MX")
    # OK (hosts or null) or PERMFAIL (published but unusable): either way the domain published
    # Client MX, so it has opted in; its MX names, not its Client MX names, are what we pin.
    opted = (
        "Client MX " + (_host_list(client.hosts) or "null")
        if client.status is LookupStatus.OK
        else f"Client MX unusable ({client.detail}), treated as opted in"
    )
    mx = resolver.server_mx(domain, budget - (monotonic() - start))
    return _answer_for_mx(domain, client, mx, opted)


def _answer_for_mx(domain: str, client: HostLookup, mx: HostLookup, opted: str) -> PolicyAnswer:
    if mx.status is LookupStatus.TEMPFAIL:
        return PolicyAnswer(
            PolicyKind.TEMP,
            domain,
            reason=f"MX lookup for {domain} failed: {mx.detail}",
            client_mx_hosts=client.hosts,
        )
    if mx.status is LookupStatus.PERMFAIL:
        # Opted in but the MX set cannot be pinned (malformed rdata, null mixed with hosts):
        # do not guess; keep the mail queued until the domain fixes its DNS.
        return PolicyAnswer(
            PolicyKind.TEMP,
            domain,
            reason=f"{domain} opted in ({opted}) but its MX is unusable: {mx.detail}",
            client_mx_hosts=client.hosts,
        )
    if mx.status is LookupStatus.OK and mx.hosts:
        return PolicyAnswer(
            PolicyKind.OK,
            domain,
            policy=f"secure match={':'.join(mx.hosts)} servername=hostname",
            reason=f"{domain} opted in ({opted}); MX {_host_list(mx.hosts)}"
            + (" (implicit)" if mx.implicit else ""),
            mx_hosts=mx.hosts,
            client_mx_hosts=client.hosts,
        )
    # Null MX or no host at all: nothing can receive the mail. Stay strict; Postfix bounces.
    what = "null MX" if mx.null else f"no MX host ({mx.detail})"
    return PolicyAnswer(
        PolicyKind.OK,
        domain,
        policy=f"secure match={domain} servername=hostname",
        reason=f"{domain} opted in ({opted}) but has {what}; Postfix will not find a host",
        client_mx_hosts=client.hosts,
    )


def _host_list(hosts: tuple[str, ...]) -> str:
    """Host names for a reason: all of them in the policy, at most 200 characters here."""
    return clip(", ".join(hosts))
