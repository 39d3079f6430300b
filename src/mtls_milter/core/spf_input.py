"""SPF (RFC 7208) with pyspf, every DNS query through the injected resolver and budget.

pyspf's ``query.dns`` is replaced by one that asks our resolver (so answers share the TTL cache
and the per-message budget, and pyspf never opens a socket): TXT from ``txt``, A/AAAA from
``addresses``, MX from ``server_mx`` without the implicit MX (RFC 7208 §5.4 uses MX records only);
PTR is answered empty (the ``ptr`` mechanism is deprecated, RFC 7208 §5.5). A DNS failure is
``temperror``. Only the MAIL FROM identity is checked: RFC 9989 aligns SPF on it alone.
"""

from __future__ import annotations

from typing import Any, Protocol

import spf

from mtls_milter.core.dmarc import Identifier
from mtls_milter.core.dmarc_walk import Budget
from mtls_milter.core.lookups import LookupStatus, MxResolver, TxtResolver
from mtls_milter.core.names import SenderKind, parse_mail_from
from mtls_milter.errors import InputError

__all__ = ["SpfResolver", "verify_spf"]

SPF_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})


class SpfResolver(MxResolver, TxtResolver, Protocol):
    """The lookups SPF needs."""


def verify_spf(
    client_ip: str, mail_from: str, helo: str, resolver: SpfResolver, budget: Budget
) -> Identifier:
    """The SPF result for MAIL FROM ``mail_from`` from ``client_ip``. Never raises."""
    try:
        sender = parse_mail_from(mail_from)
    except InputError:
        return Identifier("spf", "none", "")
    if sender.kind is not SenderKind.DOMAIN or not sender.domain:
        return Identifier("spf", "none", "")
    try:
        query = _Query(resolver, budget, i=client_ip, s=mail_from.strip("<>"), h=helo or "unknown")
        result = str(query.check()[0]).lower()
    except Exception:  # pyspf raises on junk addresses and on its internal errors
        result = "permerror"
    return Identifier("spf", result if result in SPF_RESULTS else "permerror", sender.domain)


class _Query(spf.query):  # type: ignore[misc]
    """A pyspf query whose DNS is our resolver."""

    def __init__(self, resolver: SpfResolver, budget: Budget, **kwargs: Any) -> None:
        super().__init__(**kwargs, timeout=20, querytime=0)
        self._resolver = resolver
        self._budget = budget

    def dns(
        self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:
        name = str(name).rstrip(".").lower()
        if qtype in ("TXT", "SPF"):
            result = self._txt(name) if qtype == "TXT" else []
        elif qtype in ("A", "AAAA"):
            result = self._addresses(name, qtype)
        elif qtype == "MX":
            lookup = self._resolver.server_mx(name, self._budget.remaining())
            self._raise_on_tempfail(lookup.status, lookup.detail)
            result = [] if lookup.implicit else [(0, host) for host in lookup.hosts]
        else:
            result = []  # PTR
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result

    def _txt(self, name: str) -> list[Any]:
        lookup = self._resolver.txt(name, self._budget.remaining())
        self._raise_on_tempfail(lookup.status, lookup.detail)
        return [(record,) for record in lookup.records]

    def _addresses(self, name: str, qtype: str) -> list[Any]:
        lookup = self._resolver.addresses(name, self._budget.remaining())
        self._raise_on_tempfail(lookup.status, lookup.detail)
        v6 = qtype == "AAAA"
        return [a for a in lookup.addresses if (":" in a) == v6]

    @staticmethod
    def _raise_on_tempfail(status: LookupStatus, detail: str) -> None:
        if status is LookupStatus.TEMPFAIL:
            raise spf.TempError(f"DNS {detail}")
