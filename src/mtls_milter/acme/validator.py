"""CA-side validation of ``client-mx-http-01`` and ``server-mx-http-01`` (docs/acme.md).

The CA resolves the domain's Client MX (type 265) or MX (RFC 5321 §5: implicit MX, null MX)
host names, resolves each host's A/AAAA records through the *same* resolver, and performs the
RFC 8555 §8.3 HTTP-01 check against ``http://<host>/.well-known/acme-challenge/<token>`` from
every resolved address, with the host name in ``Host:``. The challenge is valid only when every
host answers with the key authorization — by default from every one of its addresses.

Pure logic: DNS comes from an injected :class:`HostResolver`, HTTP from an
injected :class:`~mtls_milter.acme.fetch.Fetch`, time from an injected clock. Bad input (token,
thumbprint, domain) raises ValueError; everything the network does becomes a result.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

from mtls_milter.acme.fetch import (
    REDIRECT_STATUSES,
    Fetch,
    FetchError,
    FetchRequest,
    FetchResponse,
)
from mtls_milter.acme.keyauth import check_thumbprint, check_token, key_authorization
from mtls_milter.acme.results import (
    AddressResult,
    ChallengeType,
    HostResult,
    Problem,
    Status,
    ValidationResult,
    ValidatorPolicy,
)
from mtls_milter.core.lookups import AddressLookup, HostLookup, LookupStatus, query_name
from mtls_milter.core.quote import quote
from mtls_milter.runtime import metrics

__all__ = ["CHALLENGE_PATH", "HostResolver", "validate"]

CHALLENGE_PATH = "/.well-known/acme-challenge/"
_Failure = tuple[Status, str, Problem]  # a verdict on one address: status, reason, problem
WHITESPACE = " \t\r\n"  # trailing whitespace ignored in the body (RFC 8555 §8.3 step 4)


class HostResolver(Protocol):
    """The DNS the validator needs (a subset of :class:`~mtls_milter.net.dns.MxResolver`;
    :class:`~mtls_milter.net.dns.DnsResolver` is one). ``budget``: seconds left."""

    def client_mx(self, domain: str, budget: float) -> HostLookup: ...

    def server_mx(self, domain: str, budget: float) -> HostLookup: ...

    def addresses(self, host: str, budget: float) -> AddressLookup: ...


def validate(
    challenge_type: ChallengeType | str,
    domain: str,
    token: str,
    thumbprint: str,
    *,
    resolver: HostResolver,
    fetch: Fetch,
    policy: ValidatorPolicy | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ValidationResult:
    """Validate one challenge; ValueError for malformed input (type, domain, token, thumbprint)."""
    result = _Validation(
        ChallengeType(challenge_type),
        query_name(domain),
        check_token(token),
        check_thumbprint(thumbprint),
        resolver,
        fetch,
        policy or ValidatorPolicy(),
        clock,
    ).run()
    # Counted only where metrics are on: a long-running process that validates. The one-shot
    # `mtls-milter acme validate` command ends before any scrape; its output is its record.
    m = metrics.current()
    if m is not None:
        m.acme_validations.labels(result.status.value).inc()
    return result


@dataclass
class _Validation:
    challenge_type: ChallengeType
    domain: str
    token: str
    thumbprint: str
    resolver: HostResolver
    fetch: Fetch
    policy: ValidatorPolicy
    clock: Callable[[], float]
    start: float = field(init=False)
    expected: str = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()
        self.expected = key_authorization(self.token, self.thumbprint)

    def remaining(self) -> float:
        return self.start + self.policy.deadline - self.clock()

    def result(self, status: Status, reason: str, problem: Problem, **kw: Any) -> ValidationResult:
        return ValidationResult(
            self.challenge_type,
            self.domain,
            self.token,
            self.expected,
            status,
            reason,
            problem,
            all_addresses=self.policy.all_addresses,
            elapsed=self.clock() - self.start,
            **kw,
        )

    # -- the whole challenge --------------------------------------------------------------

    def run(self) -> ValidationResult:
        record = self.challenge_type.record
        if self.challenge_type is ChallengeType.CLIENT_MX:
            lookup = self.resolver.client_mx(self.domain, self.remaining())
        else:
            lookup = self.resolver.server_mx(self.domain, self.remaining())
        if lookup.status in (LookupStatus.TEMPFAIL, LookupStatus.PERMFAIL):
            return self.result(
                Status.ERROR,
                f"DNS: {record} lookup failed: {lookup.detail}",
                Problem.DNS,
            )
        if lookup.status is LookupStatus.NOT_FOUND:
            return self.result(Status.INVALID, f"no hosts: {lookup.detail}", Problem.DNS)
        if lookup.null or not lookup.hosts:
            return self.result(
                Status.INVALID,
                f"no hosts: {self.domain} publishes a null {record} (RFC 7505): no host may "
                "answer for it",
                Problem.UNAUTHORIZED,
                null_mx=True,
            )
        if len(lookup.hosts) > self.policy.max_hosts:
            return self.result(
                Status.INVALID,
                f"{self.domain} publishes {len(lookup.hosts)} {record} hosts; this validator "
                f"checks at most {self.policy.max_hosts}",
                Problem.UNAUTHORIZED,
            )
        hosts = self.check_hosts(lookup)
        return self.combine(lookup, hosts)

    def combine(self, lookup: HostLookup, hosts: Sequence[HostResult]) -> ValidationResult:
        record = self.challenge_type.record
        flags = {"hosts": tuple(hosts), "implicit_mx": lookup.implicit}
        bad = [h for h in hosts if h.status is Status.INVALID]
        if bad:
            more = f" (and {len(bad) - 1} more failing host(s))" if len(bad) > 1 else ""
            return self.result(
                Status.INVALID, f"{bad[0].host}: {bad[0].reason}{more}", bad[0].problem, **flags
            )
        errors = [h for h in hosts if h.status is Status.ERROR]
        if errors:
            return self.result(
                Status.ERROR, f"{errors[0].host}: {errors[0].reason}", Problem.DNS, **flags
            )
        which = "every address" if self.policy.all_addresses else "at least one address"
        implicit = " (implicit MX)" if lookup.implicit else ""
        return self.result(
            Status.VALID,
            f"all {len(hosts)} {record} host(s){implicit} served the key authorization "
            f"from {which}: {', '.join(h.host for h in hosts)}",
            Problem.NONE,
            **flags,
        )

    # -- hosts and addresses --------------------------------------------------------------

    def check_hosts(self, lookup: HostLookup) -> list[HostResult]:
        workers = max(1, min(self.policy.max_parallel, 4 * len(lookup.hosts)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="acme-validate") as pool:
            found = list(
                pool.map(lambda h: self.resolver.addresses(h, self.remaining()), lookup.hosts)
            )
            jobs = {
                host: [pool.submit(self.check_address, host, a) for a in addresses.addresses]
                for host, addresses in zip(lookup.hosts, found, strict=True)
                if addresses.status is LookupStatus.OK
            }
            return [
                self.host_result(host, addresses, [job.result() for job in jobs.get(host, [])])
                for host, addresses in zip(lookup.hosts, found, strict=True)
            ]

    def host_result(
        self, host: str, lookup: AddressLookup, results: list[AddressResult]
    ) -> HostResult:
        if lookup.status is LookupStatus.TEMPFAIL:
            return HostResult(
                host, Status.ERROR, f"DNS: A/AAAA lookup failed: {lookup.detail}", Problem.DNS
            )
        if lookup.status is not LookupStatus.OK or not results:
            detail = lookup.detail or "no A/AAAA record"
            return HostResult(host, Status.INVALID, f"no address: {detail}", Problem.DNS)
        checked = tuple(results)
        bad = [r for r in results if r.status is Status.INVALID]
        errors = [r for r in results if r.status is Status.ERROR]
        good = [r for r in results if r.status is Status.VALID]
        if self.policy.all_addresses or not good:
            if bad:
                first = bad[0]
                reason = f"{first.address}: {first.reason}"
                return HostResult(host, Status.INVALID, reason, first.problem, checked)
            if errors:
                reason = f"{errors[0].address}: {errors[0].reason}"
                return HostResult(host, Status.ERROR, reason, Problem.DNS, checked)
        where = ", ".join(r.address for r in good)
        reason = f"key authorization served from {where}"
        return HostResult(host, Status.VALID, reason, Problem.NONE, checked)

    def check_address(self, host: str, address: str) -> AddressResult:
        """The HTTP-01 exchange (with redirects) for one address of one MX host."""
        start = self.clock()
        redirects: list[str] = []
        scheme, target_host, port = "http", host, self.policy.port
        path = CHALLENGE_PATH + self.token
        connect_to = address
        url = _url(scheme, target_host, port, path)
        http_status: int | None = None

        def done(status: Status, reason: str, problem: Problem = Problem.NONE) -> AddressResult:
            elapsed = self.clock() - start
            redirected = tuple(redirects)
            return AddressResult(
                address, status, reason, problem, url, http_status, redirected, elapsed
            )

        while True:
            refused = self.refuse_address(connect_to)
            if refused:
                return done(Status.INVALID, refused, Problem.CONNECTION)
            remaining = self.remaining()
            if remaining <= 0:
                return done(
                    Status.INVALID,
                    f"timeout: the validation deadline of {self.policy.deadline:g} s passed "
                    f"before {url} was fetched",
                    Problem.CONNECTION,
                )
            limits = (min(self.policy.request_timeout, remaining), self.policy.max_body)
            request = FetchRequest(scheme, connect_to, port, target_host, path, *limits)
            response = self.fetch(request)
            http_status = response.status or None
            failure = _fetch_failure(response, url)
            if failure is not None:
                return done(*failure)
            if response.status in REDIRECT_STATUSES and response.location:
                if len(redirects) >= self.policy.max_redirects:
                    limit = self.policy.max_redirects
                    reason = f"too many redirects (more than {limit}), last to "
                    return done(
                        Status.INVALID, reason + quote(response.location), Problem.UNAUTHORIZED
                    )
                try:
                    scheme, new_host, port, path = self.redirect_target(url, response.location)
                except ValueError as exc:
                    return done(Status.INVALID, f"redirect refused: {exc}", Problem.UNAUTHORIZED)
                url = _url(scheme, new_host, port, path)
                redirects.append(url)
                if new_host == host:
                    connect_to = address  # back on the MX host: stay on the address under test
                elif new_host != target_host:
                    connect_to, failure = self.redirect_address(new_host)
                    if failure is not None:
                        return done(*failure)
                target_host = new_host
                continue
            return done(*self.final_verdict(response, url))

    def final_verdict(self, response: FetchResponse, url: str) -> _Failure:
        """The verdict on the response that ended the redirects."""
        if response.status != 200:
            return Status.INVALID, f"HTTP {response.status} from {url}", Problem.UNAUTHORIZED
        verdict = self.compare(response.body)
        if verdict:
            return Status.INVALID, f"{verdict} ({url})", Problem.UNAUTHORIZED
        return Status.VALID, f"key authorization matches ({url})", Problem.NONE

    def redirect_address(self, name: str) -> tuple[str, _Failure | None]:
        """The address to follow a redirect to another name: resolved through our resolver
        (never the system's); the first address, or why there is none."""
        lookup = self.resolver.addresses(name, self.remaining())
        if lookup.status is LookupStatus.TEMPFAIL:
            return "", (Status.ERROR, f"DNS: redirect target {name}: {lookup.detail}", Problem.DNS)
        if lookup.status is not LookupStatus.OK:
            reason = f"redirect target {name} has no address ({lookup.detail})"
            return "", (Status.INVALID, reason, Problem.DNS)
        return lookup.addresses[0], None

    def compare(self, body: bytes) -> str:
        """'' when ``body`` is the expected key authorization, else why not."""
        try:
            text = body.decode("ascii").rstrip(WHITESPACE)
        except UnicodeDecodeError:
            return f"wrong content: the body is not ASCII ({len(body)} bytes)"
        if text == self.expected:
            return ""
        token, dot, thumbprint = text.partition(".")
        if dot and token == self.token:
            return (
                "wrong key authorization: right token, but the thumbprint "
                f"{_excerpt(thumbprint)} is not the account key's"
            )
        if dot and thumbprint == self.thumbprint:
            return f"wrong key authorization: token {_excerpt(token)} is another challenge's"
        return (
            f"wrong content: the body is not the key authorization (got {len(body)} bytes: "
            f"{_excerpt(text)})"
        )

    def redirect_target(self, current: str, location: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, path) of a permitted redirect; ValueError says why not."""
        if any(ord(c) < 0x21 or ord(c) > 0x7E for c in location.strip()):
            raise ValueError(f"malformed Location {_excerpt(location)}")
        parts = urlsplit(urljoin(current, location.strip()))
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme {scheme!r} not allowed (only http and https)")
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials in the redirect URL")
        hostname = parts.hostname or ""
        try:
            ipaddress.ip_address(hostname)
        except ValueError:
            pass
        else:
            raise ValueError(f"redirect to an IP address ({hostname}) not allowed")
        try:
            host = query_name(hostname)
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise ValueError(f"bad redirect URL {_excerpt(location)}: {exc}") from None
        if port not in self.policy.redirect_ports:
            allowed = ", ".join(str(p) for p in sorted(self.policy.redirect_ports))
            raise ValueError(f"port {port} not allowed (only {allowed})")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return scheme, host, port, path

    def refuse_address(self, address: str) -> str:
        if not self.policy.public_only:
            return ""
        try:
            public = ipaddress.ip_address(address).is_global
        except ValueError:
            return f"{address!r} is not an IP address"
        return "" if public else f"address {address} is not public (public addresses only)"


def _fetch_failure(response: FetchResponse, url: str) -> _Failure | None:
    """The verdict on a fetch that failed (timeout, connection, TLS, protocol), else None."""
    if response.error is FetchError.TIMEOUT:
        reason = f"timeout fetching {url}: {response.detail}"
        return Status.INVALID, reason, Problem.CONNECTION
    if response.error in (FetchError.CONNECTION, FetchError.TLS):
        return Status.INVALID, f"{response.detail} ({url})", Problem.CONNECTION
    if response.error is not FetchError.NONE:
        return Status.INVALID, f"{response.detail} ({url})", Problem.UNAUTHORIZED
    return None


def _url(scheme: str, host: str, port: int, path: str) -> str:
    default = 443 if scheme == "https" else 80
    where = host if port == default else f"{host}:{port}"
    return f"{scheme}://{where}{path}"


def _excerpt(text: str, limit: int = 48) -> str:
    """A short, printable, quoted excerpt of untrusted text."""
    clean = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text[:limit])
    return repr(clean + ("..." if len(text) > limit else ""))
