"""The DNS resolver: Client MX, Server MX (RFC 5321 §5.1) and address lookups, with a TTL/LRU cache.

Every lookup returns a result object and never raises: the milter must turn any DNS trouble into
``temperror``/``permerror``, not into a crash. :class:`DnsResolver` is the real implementation of
:class:`~mtls_milter.core.lookups.MxResolver` (the result types live in
:mod:`mtls_milter.core.lookups`); tests may substitute their own.

Client MX is a new RR type (number configurable, 265 by default) whose rdata is MX wire format.
It is queried by number and decoded by :mod:`mtls_milter.core.mxrdata`: registering the type with
dnspython would be process-global (a second registration raises), so we never do it. At most
:data:`MAX_HOSTS` Client MX host names are accepted; the ordinary MX set has no limit (RFC 5321
sets none). Queries go out over connected UDP sockets (:mod:`mtls_milter.net.dnstransport`), so
a closed DNS port is noticed at once instead of after the timeout.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset

from mtls_milter.config import (
    DEFAULT_CLIENT_MX_TYPE,
    DEFAULT_DNS_CACHE_SIZE,
    DEFAULT_DNS_TIMEOUT,
    DEFAULT_MAX_CACHE_TTL,
)
from mtls_milter.core.lookups import (
    AddressLookup,
    HostLookup,
    LookupStatus,
    TxtLookup,
    lookup_group,
    query_name,
)
from mtls_milter.core.lru import TimedLRU
from mtls_milter.core.quote import clip
from mtls_milter.net.dnstransport import (
    describe_errors,
    describe_timeout,
    make_resolver,
    negative_ttl,
)
from mtls_milter.net.inflight import PER_DOMAIN, InFlight
from mtls_milter.net.lookup_pool import paused_seconds
from mtls_milter.net.mxset import MAX_HOSTS, hosts_from_rdatas

if TYPE_CHECKING:
    from mtls_milter.config import DnsConfig

__all__ = ["MAX_HOSTS", "DnsResolver", "hosts_from_rdatas"]

_MX = int(dns.rdatatype.MX)
_A = int(dns.rdatatype.A)
_AAAA = int(dns.rdatatype.AAAA)
_TXT = int(dns.rdatatype.TXT)
# rrtype labels for the lookup observer (metrics); any other number is the Client MX type
_LABELS = {_MX: "mx", _A: "a", _AAAA: "aaaa", _TXT: "txt"}
BUDGET_EXHAUSTED = "DNS time budget exhausted"
TIMED_OUT = "no answer within "  # how describe_timeout's text for a query out of time begins

LookupObserver = Callable[[str, float, bool], None]


class _QueryOutcome:
    """One wire query, decoded: the value to cache (or not) and for how long."""

    __slots__ = ("detail", "rrset", "status", "ttl")

    def __init__(
        self,
        status: LookupStatus,
        rrset: dns.rrset.RRset | None = None,
        ttl: int = 0,
        detail: str = "",
    ) -> None:
        self.status = status
        self.rrset = rrset
        self.ttl = ttl
        self.detail = detail


class DnsResolver:
    """Stub resolver on dnspython with its own thread-safe TTL/LRU cache of decoded results.

    Caching rules: positive answers (and Client MX PERMFAIL for malformed rdata) live for the
    minimum TTL of the answer chain; NXDOMAIN/NODATA for min(SOA TTL, SOA MINIMUM) from the
    authority section (RFC 2308), 60 s without SOA; all capped at ``max_cache_ttl``. TEMPFAIL is
    never cached, so a recovering server is seen at once. A cached answer is served even when
    the budget is exhausted, since it costs no time. ``cache_size=0`` disables the cache.

    Concurrent identical lookups share one query, and at most ``per_domain`` queries per domain
    group are in flight (:mod:`mtls_milter.net.inflight`). ``on_lookup``, when set, is called
    as ``on_lookup(rrtype, seconds, cached)`` after every Client MX/MX/A/AAAA/TXT lookup, with
    rrtype one of ``client_mx``, ``mx``, ``a``, ``aaaa``, ``txt`` (metrics).
    """

    on_lookup: LookupObserver | None

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        timeout: float = DEFAULT_DNS_TIMEOUT,
        client_mx_type: int = DEFAULT_CLIENT_MX_TYPE,
        cache_size: int = DEFAULT_DNS_CACHE_SIZE,
        max_cache_ttl: int = DEFAULT_MAX_CACHE_TTL,
        clock: Callable[[], float] = time.monotonic,
        per_domain: int = PER_DOMAIN,
    ) -> None:
        """Resolve through ``nameservers`` (``IP``, ``IP:PORT``, ``[IPv6]:PORT``).

        An empty list means /etc/resolv.conf; if that is unusable, 127.0.0.1:53.
        Raises ValueError for a malformed name server string.
        """
        self._timeout = float(timeout)
        self._client_mx_type = int(client_mx_type)
        self._max_cache_ttl = max(0, int(max_cache_ttl))
        self._clock = clock
        # (name, rdtype) -> result, until its TTL runs out on the monotonic clock
        self._cache: TimedLRU[tuple[str, int], Any] = TimedLRU(int(cache_size))
        self._resolver = make_resolver(nameservers)
        self._flights: InFlight[Any] = InFlight(per_domain)
        self.on_lookup = None

    @classmethod
    def from_config(cls, dns: DnsConfig) -> DnsResolver:
        """Build a resolver from the ``[dns]`` configuration section."""
        return cls(
            dns.nameservers,
            timeout=dns.timeout,
            client_mx_type=dns.client_mx_type,
            cache_size=dns.cache_size,
            max_cache_ttl=dns.max_cache_ttl,
        )

    # -- public lookups ------------------------------------------------------------------

    def client_mx(self, domain: str, budget: float) -> HostLookup:
        """Look up the Client MX hosts of ``domain``."""
        try:
            name = query_name(domain)
        except ValueError as exc:
            return HostLookup(LookupStatus.PERMFAIL, detail=f"bad domain name: {exc}")
        result: HostLookup | None = self._lookup(name, self._client_mx_type, budget, _client_mx)
        return result or HostLookup(LookupStatus.TEMPFAIL, detail=BUDGET_EXHAUSTED)

    def cached_client_mx(self, domain: str) -> HostLookup | None:
        """The cached Client MX answer for ``domain``, or None; never queries."""
        try:
            name = query_name(domain)
        except ValueError:
            return None
        cached: HostLookup | None = self._cache_get(name, self._client_mx_type)
        if cached is not None and self.on_lookup is not None:
            self._observe("client_mx", 0.0, True)
        return cached

    def server_mx(self, domain: str, budget: float) -> HostLookup:
        """Look up the MX hosts of ``domain`` per RFC 5321 §5.1 (implicit MX, null MX)."""
        try:
            name = query_name(domain)
        except ValueError as exc:
            return HostLookup(LookupStatus.PERMFAIL, detail=f"bad domain name: {exc}")
        start, paused = self._clock(), paused_seconds()
        mx: HostLookup | None = self._lookup(name, _MX, budget, _server_mx)
        if mx is None:
            return HostLookup(LookupStatus.TEMPFAIL, detail=BUDGET_EXHAUSTED)
        if mx.status is not LookupStatus.NOT_FOUND or "NODATA" not in mx.detail:
            return mx
        # NODATA for MX: the domain itself is the implicit host if it has an address.
        remaining = budget - (self._clock() - start) + (paused_seconds() - paused)
        addresses = self._addresses(name, remaining, stop_on_first=True)
        if addresses.status is LookupStatus.OK:
            return HostLookup(
                LookupStatus.OK, (name,), implicit=True, detail="no MX record; implicit MX"
            )
        if addresses.status is LookupStatus.TEMPFAIL:
            return HostLookup(LookupStatus.TEMPFAIL, detail=f"{addresses.detail} (implicit MX)")
        return HostLookup(LookupStatus.NOT_FOUND, detail="no MX and no A/AAAA record (NODATA)")

    def addresses(self, host: str, budget: float) -> AddressLookup:
        """Look up the A, then AAAA, addresses of ``host``."""
        try:
            name = query_name(host)
        except ValueError as exc:
            return AddressLookup(LookupStatus.PERMFAIL, detail=f"bad host name: {exc}")
        return self._addresses(name, budget, stop_on_first=False)

    def txt(self, name: str, budget: float) -> TxtLookup:
        """Look up the TXT records at ``name`` (cached like every other answer)."""
        try:
            qname = query_name(name)
        except ValueError as exc:
            return TxtLookup(LookupStatus.PERMFAIL, detail=f"bad name: {exc}")
        result: TxtLookup | None = self._lookup(qname, _TXT, budget, _txt)
        return result or TxtLookup(LookupStatus.TEMPFAIL, detail=BUDGET_EXHAUSTED)

    def cache_stats(self) -> dict[str, int]:
        """Cache counters: hits, misses, size."""
        return self._cache.stats()

    def cache_entries(self) -> int:
        """Answers held in the cache now (some may have expired unseen)."""
        return len(self._cache)

    # -- internals -----------------------------------------------------------------------

    def _lookup(self, name: str, rdtype: int, budget: float, decode: _Decoder) -> Any:
        """The cached, shared or fresh decoded answer; None when the budget is gone first.

        A fresh answer is cached by the query's own caller before the shared query ends, so a
        caller that comes after finds it in the cache.
        """
        observe = self.on_lookup is not None
        cached = self._cache_get(name, rdtype)
        if cached is not None:
            if observe:
                self._observe(_LABELS.get(rdtype, "client_mx"), 0.0, True)
            return cached
        if budget <= 0:
            return None
        began = time.monotonic() if observe else 0.0

        def query(lifetime: float) -> Any:
            result, ttl = decode(self._query(name, rdtype, lifetime))
            if ttl is not None:
                self._cache_put(name, rdtype, result, ttl)
            return result

        def unavailable(text: str) -> Any:
            return decode(_QueryOutcome(LookupStatus.TEMPFAIL, detail=text))[0]

        answer = self._flights.run(
            (name, rdtype), lookup_group(name), budget, query, unavailable, _timed_out
        )
        if observe:
            self._observe(_LABELS.get(rdtype, "client_mx"), time.monotonic() - began, False)
        return answer

    def _observe(self, rrtype: str, seconds: float, cached: bool) -> None:
        """Tell the observer; its trouble never changes a lookup's result."""
        observer = self.on_lookup
        if observer is None:
            return
        try:
            observer(rrtype, seconds, cached)
        except Exception:  # a metrics hook must not turn an answer into an error
            return

    def _addresses(self, name: str, budget: float, *, stop_on_first: bool) -> AddressLookup:
        start, paused = self._clock(), paused_seconds()
        found: list[str] = []
        failures: list[str] = []
        for rdtype in (_A, _AAAA):
            remaining = budget - (self._clock() - start) + (paused_seconds() - paused)
            result: AddressLookup | None = self._lookup(name, rdtype, remaining, _addresses)
            if result is None:
                failures.append(BUDGET_EXHAUSTED)
                break
            if result.status is LookupStatus.OK:
                found.extend(result.addresses)
                if stop_on_first:
                    break
            elif result.status is LookupStatus.TEMPFAIL:
                failures.append(f"{'A' if rdtype == _A else 'AAAA'}: {result.detail}")
            elif "NXDOMAIN" in result.detail:
                break  # the name does not exist: AAAA cannot exist either
        if found:
            return AddressLookup(LookupStatus.OK, tuple(found), detail="; ".join(failures))
        if failures:
            return AddressLookup(LookupStatus.TEMPFAIL, detail="; ".join(failures))
        return AddressLookup(LookupStatus.NOT_FOUND, detail="no A/AAAA record")

    def _query(self, name: str, rdtype: int, budget: float) -> _QueryOutcome:
        """One resolution through dnspython; every failure becomes a TEMPFAIL outcome."""
        lifetime = min(self._timeout, budget)
        qname = dns.name.Name([label.encode("ascii") for label in name.split(".")] + [b""])
        try:
            answer = self._resolver.resolve(
                qname,
                dns.rdatatype.RdataType.make(rdtype),
                raise_on_no_answer=False,
                lifetime=lifetime,
                search=False,
            )
        except dns.resolver.NXDOMAIN as exc:
            ttl = min(negative_ttl(exc.kwargs.get("responses", {}).values()), self._max_cache_ttl)
            return _QueryOutcome(LookupStatus.NOT_FOUND, ttl=ttl, detail="NXDOMAIN")
        except dns.exception.Timeout as exc:
            errors = exc.kwargs.get("errors") or []
            return _QueryOutcome(LookupStatus.TEMPFAIL, detail=describe_timeout(lifetime, errors))
        except dns.resolver.NoNameservers as exc:
            errors = exc.kwargs.get("errors") or []
            return _QueryOutcome(LookupStatus.TEMPFAIL, detail=describe_errors(errors))
        except dns.resolver.YXDOMAIN:
            return _QueryOutcome(LookupStatus.TEMPFAIL, detail="YXDOMAIN (DNAME substitution)")
        except dns.exception.FormError:
            return _QueryOutcome(LookupStatus.TEMPFAIL, detail="malformed DNS answer")
        except dns.exception.DNSException as exc:
            return _QueryOutcome(LookupStatus.TEMPFAIL, detail=f"DNS error: {clip(str(exc))}")
        except OSError as exc:
            return _QueryOutcome(LookupStatus.TEMPFAIL, detail=f"network error: {clip(str(exc))}")
        except Exception as exc:  # never let DNS trouble escape into the milter
            return _QueryOutcome(
                LookupStatus.TEMPFAIL,
                detail=f"unexpected DNS error: {type(exc).__name__}: {clip(str(exc))}",
            )
        if answer.rrset is None:
            ttl = min(negative_ttl([answer.response]), self._max_cache_ttl)
            return _QueryOutcome(LookupStatus.NOT_FOUND, ttl=ttl, detail="NODATA")
        ttl = min(int(answer.chaining_result.minimum_ttl), self._max_cache_ttl)
        return _QueryOutcome(LookupStatus.OK, rrset=answer.rrset, ttl=ttl)

    def _cache_get(self, name: str, rdtype: int) -> Any:
        return self._cache.get_at((name, rdtype), self._clock())

    def _cache_put(self, name: str, rdtype: int, value: Any, ttl: int) -> None:
        if ttl > 0:
            self._cache.put_until((name, rdtype), value, self._clock() + ttl)


_Decoder = Callable[[_QueryOutcome], tuple[Any, int | None]]


def _timed_out(result: Any) -> bool:
    """Whether a decoded result is a TEMPFAIL because its query's time ran out (a caller that
    shared the query, with time left, then asks again itself)."""
    detail: str = result.detail
    return result.status is LookupStatus.TEMPFAIL and detail.startswith(TIMED_OUT)


def _client_mx(outcome: _QueryOutcome) -> tuple[HostLookup, int | None]:
    return _hosts_from_outcome(outcome, "Client MX", MAX_HOSTS)


def _server_mx(outcome: _QueryOutcome) -> tuple[HostLookup, int | None]:
    return _hosts_from_outcome(outcome, "MX", None)


def _txt(outcome: _QueryOutcome) -> tuple[TxtLookup, int | None]:
    """TXT records: each record's character-strings joined; TEMPFAIL is not cached."""
    if outcome.status is LookupStatus.OK and outcome.rrset is not None:
        records = tuple(b"".join(getattr(rd, "strings", ())) for rd in outcome.rrset)
        return TxtLookup(LookupStatus.OK, records), outcome.ttl
    ttl = None if outcome.status is LookupStatus.TEMPFAIL else outcome.ttl
    return TxtLookup(outcome.status, detail=outcome.detail), ttl


def _addresses(outcome: _QueryOutcome) -> tuple[AddressLookup, int | None]:
    """A or AAAA addresses; TEMPFAIL is not cached."""
    if outcome.status is LookupStatus.OK and outcome.rrset is not None:
        addresses = tuple(str(getattr(rd, "address", rd.to_text())) for rd in outcome.rrset)
        return AddressLookup(LookupStatus.OK, addresses), outcome.ttl
    ttl = None if outcome.status is LookupStatus.TEMPFAIL else outcome.ttl
    return AddressLookup(outcome.status, detail=outcome.detail), ttl


def _hosts_from_outcome(
    outcome: _QueryOutcome, what: str, limit: int | None
) -> tuple[HostLookup, int | None]:
    """Decode an MX-format answer; also return the cache TTL (None: do not cache)."""
    if outcome.status is LookupStatus.TEMPFAIL:
        return HostLookup(LookupStatus.TEMPFAIL, detail=outcome.detail), None
    if outcome.status is not LookupStatus.OK or outcome.rrset is None:
        return (
            HostLookup(outcome.status, detail=f"no {what} record ({outcome.detail})"),
            outcome.ttl,
        )
    hosts = hosts_from_rdatas(outcome.rrset, what, limit)
    return dataclasses.replace(hosts, ttl=outcome.ttl), outcome.ttl
