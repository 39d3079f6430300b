"""DNS layer against the in-process DNS server: what a mail operator would see per DNS state."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.rdata
import pytest
from support.dnsserver import TestDnsServer

from mtls_milter.cli.main import main
from mtls_milter.config import DnsConfig
from mtls_milter.core.lookups import AddressLookup, HostLookup, LookupStatus, MxResolver, query_name
from mtls_milter.net.dns import MAX_HOSTS, DnsResolver

CMX = 265
TIMEOUT = 0.5  # resolver timeout used by the fixtures
# dnspython sleeps a 0.1 s back-off before noticing that the lifetime is over.
SLACK = 0.25

ResolverFactory = Callable[..., DnsResolver]


def mx_wire(text: str) -> bytes:
    wire = dns.rdata.from_text("IN", "MX", text).to_wire()
    assert wire is not None
    return wire


class FakeClock:
    """Injected clock for TTL tests."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- Client MX: table of zone states --------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    records: list[tuple[str, int | str, tuple[str, ...]]] = field(default_factory=list)
    raw: list[tuple[str, int, bytes]] = field(default_factory=list)
    status: LookupStatus = LookupStatus.OK
    hosts: tuple[str, ...] = ()
    null: bool = False
    detail: str = ""  # substring of the detail


CLIENT_MX_CASES = [
    Case(
        "sorted-lowercased-dedup",
        records=[
            (
                "sender.test",
                CMX,
                ("20 OUT2.Sender.Test.", "10 out1.sender.test.", "30 out1.sender.test."),
            ),
        ],
        hosts=("out1.sender.test", "out2.sender.test"),
    ),
    Case(
        "same-preference-sorted-by-name",
        records=[("sender.test", CMX, ("10 b.sender.test.", "10 a.sender.test."))],
        hosts=("a.sender.test", "b.sender.test"),
    ),
    Case("nxdomain", status=LookupStatus.NOT_FOUND, detail="NXDOMAIN"),
    Case(
        "nodata",
        records=[("sender.test", "MX", ("10 mx.sender.test.",))],
        status=LookupStatus.NOT_FOUND,
        detail="no Client MX record (NODATA)",
    ),
    Case(
        "null-client-mx",
        records=[("sender.test", CMX, ("0 .",))],
        null=True,
    ),
    Case(
        "null-mixed-with-others",
        records=[("sender.test", CMX, ("0 .", "10 out.sender.test."))],
        status=LookupStatus.PERMFAIL,
        detail="mixed",
    ),
    Case(
        "ten-hosts-ok",
        records=[("sender.test", CMX, tuple(f"{i} h{i:02}.sender.test." for i in range(10)))],
        hosts=tuple(f"h{i:02}.sender.test" for i in range(10)),
    ),
    Case(
        "eleven-hosts",
        records=[("sender.test", CMX, tuple(f"{i} h{i}.sender.test." for i in range(11)))],
        status=LookupStatus.PERMFAIL,
        detail=f"more than the limit of {MAX_HOSTS}",
    ),
    Case(
        "rdata-3-bytes",
        raw=[("sender.test", CMX, b"\x00\x0a\x03")],
        status=LookupStatus.PERMFAIL,
        detail="Client MX rdata malformed",
    ),
    Case(
        "rdata-2-bytes",
        raw=[("sender.test", CMX, b"\x00\x0a")],
        status=LookupStatus.PERMFAIL,
        detail="too short",
    ),
    Case(
        "rdata-bad-label-type",
        raw=[("sender.test", CMX, b"\x00\x0a\x40abc\x00")],
        status=LookupStatus.PERMFAIL,
        detail="Client MX rdata malformed: unknown label type 0x40 at byte 2",
    ),
    Case(
        "rdata-compression-pointer-forward",
        raw=[("sender.test", CMX, b"\x00\x0a\xc0\x0c")],
        status=LookupStatus.PERMFAIL,
        detail="Client MX rdata malformed: compression pointer at byte 2",
    ),
    # A backward pointer inside the rdata decodes as a name with a general DNS name decoder:
    # to the root (a null Client MX) or to a host. RFC 3597 says the name is never compressed.
    Case(
        "rdata-compression-pointer-to-root-is-not-null",
        raw=[("sender.test", CMX, b"\x00\x0a\xc0\x00")],
        status=LookupStatus.PERMFAIL,
        detail="compression pointer at byte 2: names in this record are never compressed",
    ),
    Case(
        "rdata-compression-pointer-after-label-is-not-a-host",
        raw=[("sender.test", CMX, b"\x00\x0a\x03out\xc0\x00")],
        status=LookupStatus.PERMFAIL,
        detail="compression pointer at byte 6",
    ),
    Case(
        "rdata-name-without-root-label",
        raw=[("sender.test", CMX, b"\x00\x0a\x03out")],
        status=LookupStatus.PERMFAIL,
        detail="exchange name truncated",
    ),
    Case(
        "rdata-label-past-the-end",
        raw=[("sender.test", CMX, mx_wire("10 out.sender.test.")[:-3])],
        status=LookupStatus.PERMFAIL,
        detail="exchange name truncated: a label runs past the end",
    ),
    Case(
        "rdata-name-longer-than-255-bytes",
        raw=[("sender.test", CMX, b"\x00\x0a" + (b"\x3f" + b"a" * 63) * 4 + b"\x00")],
        status=LookupStatus.PERMFAIL,
        detail="exchange name longer than 255 bytes",
    ),
    Case(
        "rdata-name-of-255-bytes",
        raw=[
            (
                "sender.test",
                CMX,
                b"\x00\x0a" + (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"b" * 61 + b"\x00",
            )
        ],
        hosts=(".".join(["a" * 63] * 3 + ["b" * 61]),),
    ),
    Case(
        "rdata-binary-label",
        raw=[("sender.test", CMX, b"\x00\x0a\x03a\xffb\x04test\x00")],
        status=LookupStatus.PERMFAIL,
        detail="exchange 'a\\xffb.test' is not a host name",
    ),
    Case(
        "rdata-trailing-garbage",
        raw=[("sender.test", CMX, mx_wire("10 out.sender.test.") + b"xx")],
        status=LookupStatus.PERMFAIL,
        detail="2 trailing bytes",
    ),
    Case(
        "exchange-with-dot-inside-label",
        raw=[("sender.test", CMX, b"\x00\x0a\x03a.b\x04test\x00")],
        status=LookupStatus.PERMFAIL,
        detail="not a host name",
    ),
    # An exchange is a host name: bytes no host name has make the record unusable, not a host
    # that no certificate can ever match.
    Case(
        "exchange-with-punctuation",
        raw=[("sender.test", CMX, b"\x00\x0a\x04a!b*\x04test\x00")],
        status=LookupStatus.PERMFAIL,
        detail="exchange 'a!b*.test' is not a host name",
    ),
    Case(
        "exchange-with-underscore-is-tolerated",
        records=[("sender.test", CMX, ("10 Out_1.sender.test.",))],
        hosts=("out_1.sender.test",),
    ),
    Case(
        "one-good-one-malformed",
        records=[("sender.test", CMX, ("10 out.sender.test.",))],
        raw=[("sender.test", CMX, b"\x00")],
        status=LookupStatus.PERMFAIL,
        detail="malformed",
    ),
    Case(
        "cname-at-queried-name-followed",
        records=[
            ("sender.test", "CNAME", ("alias.other.test.",)),
            ("alias.other.test", CMX, ("10 out.other.test.",)),
        ],
        hosts=("out.other.test",),
    ),
]


@pytest.mark.parametrize("case", CLIENT_MX_CASES, ids=lambda c: c.id)
def test_client_mx(case: Case, dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    for name, rdtype, texts in case.records:
        dns_server.add(name, rdtype, *texts)
    for name, number, wire in case.raw:
        dns_server.add_raw(name, number, wire)
    result = dns_resolver.client_mx("sender.test", 5.0)
    assert result.status is case.status, result
    assert result.hosts == case.hosts
    assert result.null is case.null
    assert not result.implicit
    assert case.detail in result.detail


JUNK_RDATA = {
    # 60 kB of SPF-like text where a name should be: arrives over TCP, must not come back whole.
    "txt-junk": b"\x00\x0a" + b"v=spf1 include:_spf.example.net ~all " * 1600,
    # A name of 250 bytes whose labels hold bytes no host name has.
    "binary-name": b"\x00\x0a" + (b"\x3e" + b"\xff\x01" * 31) * 4 + b"\x00",
    # Well-formed name, then 60 kB of trailing bytes.
    "trailing-junk": mx_wire("10 out.sender.test.") + b"\xee" * 60_000,
}


@pytest.mark.parametrize("rdata", JUNK_RDATA.values(), ids=JUNK_RDATA.keys())
def test_junk_rdata_detail_is_bounded(
    rdata: bytes, dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add_raw("sender.test", CMX, rdata)
    result = dns_resolver.client_mx("sender.test", 5.0)
    assert result.status is LookupStatus.PERMFAIL
    assert result.detail.startswith("Client MX rdata malformed: ")
    assert len(result.detail) <= 300, result.detail
    assert result.detail.isprintable()


# --- Client MX: failures and time limits ----------------------------------------------------


@pytest.mark.parametrize(
    ("misbehave", "detail"),
    [
        (TestDnsServer.servfail, "SERVFAIL from 127.0.0.1:"),
        (TestDnsServer.refuse, "REFUSED from 127.0.0.1:"),
    ],
    ids=["servfail", "refused"],
)
def test_error_rcodes_are_tempfail_and_fast(
    misbehave: Callable[[TestDnsServer, str], None],
    detail: str,
    dns_server: TestDnsServer,
    dns_resolver: DnsResolver,
) -> None:
    misbehave(dns_server, "sender.test")
    start = time.monotonic()
    result = dns_resolver.client_mx("sender.test", 5.0)
    elapsed = time.monotonic() - start
    assert result.status is LookupStatus.TEMPFAIL
    assert detail in result.detail
    assert result.detail.endswith(str(dns_server.address[1]))
    assert elapsed < TIMEOUT / 2, "an error rcode must not be retried until the timeout"
    assert dns_server.queries.count(("sender.test", CMX)) == 1


def test_timeout_is_tempfail_within_timeout(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.drop("sender.test")
    start = time.monotonic()
    result = dns_resolver.client_mx("sender.test", 5.0)
    elapsed = time.monotonic() - start
    assert result.status is LookupStatus.TEMPFAIL
    assert result.detail == f"no answer within 0.5 s from {dns_server.nameserver}"
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + SLACK


def test_budget_smaller_than_timeout_bounds_the_wait(
    dns_server: TestDnsServer, resolver_for: ResolverFactory
) -> None:
    dns_server.drop("sender.test")
    resolver = resolver_for(timeout=5.0)
    start = time.monotonic()
    result = resolver.client_mx("sender.test", 0.2)
    elapsed = time.monotonic() - start
    assert result.status is LookupStatus.TEMPFAIL
    assert result.detail == f"no answer within 0.2 s from {dns_server.nameserver}"
    assert elapsed < 0.2 + SLACK


@pytest.mark.parametrize("budget", [0.0, -1.0])
def test_exhausted_budget_does_not_query(
    budget: float, dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    for lookup in (dns_resolver.client_mx, dns_resolver.server_mx):
        result = lookup("sender.test", budget)
        assert result == HostLookup(LookupStatus.TEMPFAIL, detail="DNS time budget exhausted")
    assert dns_resolver.addresses("sender.test", budget).status is LookupStatus.TEMPFAIL
    assert dns_server.queries == []


def test_garbage_response_is_tempfail_at_once(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    # The UDP socket is connected, so only the server can have sent the bytes: a datagram that
    # is not DNS ends the query instead of being waited out until the timeout.
    dns_server.garbage("sender.test")
    start = time.monotonic()
    result = dns_resolver.client_mx("sender.test", 5.0)
    assert result.status is LookupStatus.TEMPFAIL
    assert result.detail == f"malformed answer from {dns_server.nameserver}"
    assert time.monotonic() - start < TIMEOUT / 2


@pytest.mark.parametrize(
    ("tcp", "tcp_answers", "why"),
    [(False, True, "connection refused"), (True, False, "connection closed without an answer")],
    ids=["no-tcp-listener", "tcp-hangup"],
)
def test_truncated_then_tcp_failure_says_both(tcp: bool, tcp_answers: bool, why: str) -> None:
    with TestDnsServer(tcp=tcp) as server:
        server.add("sender.test", CMX, "10 out.sender.test.")
        server.truncate("sender.test", tcp_answers=tcp_answers)
        start = time.monotonic()
        result = DnsResolver([server.nameserver], timeout=2.0).client_mx("sender.test", 5.0)
        assert result.status is LookupStatus.TEMPFAIL
        assert result.detail == (
            f"answer from {server.nameserver} truncated over UDP and TCP failed: {why}"
        )
        assert time.monotonic() - start < 1.0
        assert server.queries.count(("sender.test", CMX)) == (1 if not tcp else 2)


def test_truncated_then_tcp_answer_is_used(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    dns_server.truncate("sender.test")
    assert dns_resolver.client_mx("sender.test", 5.0).hosts == ("out.sender.test",)


def test_cname_loop_is_named(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    dns_server.add("sender.test", "CNAME", "loop1.sender.test.")
    dns_server.add("loop1.sender.test", "CNAME", "loop2.sender.test.")
    dns_server.add("loop2.sender.test", "CNAME", "loop1.sender.test.")
    result = dns_resolver.client_mx("sender.test", 5.0)
    assert result.status is LookupStatus.TEMPFAIL
    assert result.detail == (
        f"CNAME loop at loop1.sender.test in the answer from {dns_server.nameserver}"
    )


def test_delayed_answer_within_timeout_arrives(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    dns_server.delay("sender.test", 0.2)
    result = dns_resolver.client_mx("sender.test", 5.0)
    assert result.hosts == ("out.sender.test",)


def closed_port() -> str:
    """``127.0.0.1:PORT`` where nothing listens (a server that was just stopped)."""
    with TestDnsServer() as server:
        return server.nameserver


def test_refused_port_is_noticed_at_once() -> None:
    # An unconnected UDP socket never sees the ICMP port-unreachable and waits the full
    # timeout; a connected one fails with ECONNREFUSED as soon as the ICMP error arrives.
    nameserver = closed_port()
    start = time.monotonic()
    result = DnsResolver([nameserver], timeout=3.0).client_mx("sender.test", 5.0)
    elapsed = time.monotonic() - start
    assert result.status is LookupStatus.TEMPFAIL
    assert result.detail == f"DNS server {nameserver} refused the connection (port unreachable)"
    assert elapsed < 1.0, "a refused port must not be waited out until the timeout"


def test_refused_port_falls_through_to_the_next_server(dns_server: TestDnsServer) -> None:
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    resolver = DnsResolver([closed_port(), dns_server.nameserver], timeout=3.0)
    start = time.monotonic()
    assert resolver.client_mx("sender.test", 5.0).hosts == ("out.sender.test",)
    assert time.monotonic() - start < 1.0
    # Both refused: both are named.
    first, second = closed_port(), closed_port()
    result = DnsResolver([first, second], timeout=3.0).client_mx("sender.test", 5.0)
    assert result.detail == (
        f"DNS server {first} refused the connection (port unreachable); "
        f"DNS server {second} refused the connection (port unreachable)"
    )


def test_timeout_names_only_the_silent_server(dns_server: TestDnsServer) -> None:
    # One server refuses, the other never answers: the text says both things.
    dns_server.drop("sender.test")
    refused = closed_port()
    resolver = DnsResolver([refused, dns_server.nameserver], timeout=0.3)
    result = resolver.client_mx("sender.test", 5.0)
    assert result.detail == (
        f"no answer within 0.3 s from {dns_server.nameserver}; "
        f"DNS server {refused} refused the connection (port unreachable)"
    )


def test_sixty_records_arrive_over_tcp_and_are_permfail(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add("big.test", CMX, *(f"{i} host-number-{i}.big.test." for i in range(60)))
    start = time.monotonic()
    result = dns_resolver.client_mx("big.test", 5.0)
    assert time.monotonic() - start < 0.2
    assert result.status is LookupStatus.PERMFAIL
    assert "60 Client MX host names" in result.detail
    # UDP answer truncated, then the same query again over TCP.
    assert dns_server.queries.count(("big.test", CMX)) == 2


def test_five_hundred_records_fast(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    dns_server.add("big.test", CMX, *(f"{i} h{i}.big.test." for i in range(500)))
    start = time.monotonic()
    result = dns_resolver.client_mx("big.test", 5.0)
    assert time.monotonic() - start < 0.5
    assert result.status is LookupStatus.PERMFAIL


def test_client_mx_type_is_configurable(
    dns_server: TestDnsServer, resolver_for: ResolverFactory
) -> None:
    dns_server.add("sender.test", 65280, "10 private.sender.test.")
    dns_server.add("sender.test", CMX, "10 draft.sender.test.")
    assert resolver_for(client_mx_type=65280).client_mx("sender.test", 5).hosts == (
        "private.sender.test",
    )
    assert resolver_for().client_mx("sender.test", 5).hosts == ("draft.sender.test",)


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "queried"),
    [
        ("sender.test", "sender.test"),
        ("Sender.TEST", "sender.test"),
        ("sender.test.", "sender.test"),
        ("bücher.test", "xn--bcher-kva.test"),
    ],
)
def test_input_names_are_normalized(
    given: str, queried: str, dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add(queried, CMX, "10 out.sender.test.")
    assert dns_resolver.client_mx(given, 5).hosts == ("out.sender.test",)
    assert dns_server.queries == [(queried, CMX)]


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("", "empty"),
        (".", "empty"),
        ("a..test", "empty label"),
        (".test", "empty label"),
        ("a" * 64 + ".test", "longer than 63"),
        (".".join(["a" * 60] * 5), "longer than 253"),
        ("sp ace.test", "not allowed"),
        ("back\\slash.test", "not allowed"),
        ("ctrl\x00.test", "not allowed"),
    ],
    ids=["empty", "root", "empty-label", "leading-dot", "long-label", "long-name", "space",
         "backslash", "nul"],
)  # fmt: skip
def test_invalid_names_are_permfail_without_query(
    name: str, detail: str, dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    for lookup in (dns_resolver.client_mx, dns_resolver.server_mx, dns_resolver.addresses):
        result: HostLookup | AddressLookup = lookup(name, 5.0)
        assert result.status is LookupStatus.PERMFAIL
        assert detail in result.detail
    assert dns_server.queries == []


# --- Server MX ------------------------------------------------------------------------------


SERVER_MX_CASES = [
    Case(
        "mx-present",
        records=[
            ("r.test", "MX", ("20 MX2.r.test.", "10 mx1.r.test.")),
            ("r.test", "A", ("192.0.2.9",)),
        ],
        hosts=("mx1.r.test", "mx2.r.test"),
    ),
    Case("implicit-via-a", records=[("r.test", "A", ("192.0.2.1",))], hosts=("r.test",)),
    Case(
        "implicit-via-aaaa-only",
        records=[("r.test", "AAAA", ("2001:db8::1",))],
        hosts=("r.test",),
    ),
    Case("nxdomain", status=LookupStatus.NOT_FOUND, detail="NXDOMAIN"),
    Case(
        "no-mx-no-address",
        records=[("r.test", "TXT", ('"v=spf1 -all"',))],
        status=LookupStatus.NOT_FOUND,
        detail="no MX and no A/AAAA",
    ),
    Case("null-mx", records=[("r.test", "MX", ("0 .",))], null=True),
    Case(
        "null-mx-mixed",
        records=[("r.test", "MX", ("0 .", "10 mx.r.test."))],
        status=LookupStatus.PERMFAIL,
    ),
    # Only Client MX is limited to 10 names: RFC 5321 sets no limit on MX.
    Case(
        "fifteen-mx",
        records=[("r.test", "MX", tuple(f"{i} mx{i}.r.test." for i in range(15)))],
        hosts=tuple(f"mx{i}.r.test" for i in range(15)),
    ),
]


@pytest.mark.parametrize("case", SERVER_MX_CASES, ids=lambda c: c.id)
def test_server_mx(case: Case, dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    for name, rdtype, texts in case.records:
        dns_server.add(name, rdtype, *texts)
    result = dns_resolver.server_mx("r.test", 5.0)
    assert result.status is case.status, result
    assert result.hosts == case.hosts
    assert result.null is case.null
    assert result.implicit is (case.id.startswith("implicit"))
    assert case.detail in result.detail


def test_server_mx_implicit_with_address_servfail_is_tempfail(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add("r.test", "TXT", '"x"')
    dns_server.add("other.test", "A", "192.0.2.1")
    assert dns_resolver.server_mx("r.test", 5).status is LookupStatus.NOT_FOUND
    dns_server.servfail("r2.test")
    result = dns_resolver.server_mx("r2.test", 5)
    assert result.status is LookupStatus.TEMPFAIL
    assert "SERVFAIL" in result.detail


def test_addresses(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    dns_server.add("h.test", "AAAA", "2001:db8::1")
    dns_server.add("h.test", "A", "192.0.2.2", "192.0.2.1")
    result = dns_resolver.addresses("h.test", 5)
    assert result.status is LookupStatus.OK
    assert sorted(result.addresses[:2]) == ["192.0.2.1", "192.0.2.2"]
    assert result.addresses[2:] == ("2001:db8::1",)
    missing = dns_resolver.addresses("missing.test", 5)
    assert missing.status is LookupStatus.NOT_FOUND
    # NXDOMAIN for A: AAAA is not asked.
    assert ("missing.test", 28) not in dns_server.queries
    dns_server.servfail("sf.test")
    assert dns_resolver.addresses("sf.test", 5).status is LookupStatus.TEMPFAIL


# --- cache ----------------------------------------------------------------------------------


def test_warm_lookup_served_from_cache(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    first = dns_resolver.client_mx("sender.test", 5)
    queries = list(dns_server.queries)
    second = dns_resolver.client_mx("Sender.Test.", 5)
    assert second == first
    assert dns_server.queries == queries
    assert dns_resolver.cache_stats() == {"hits": 1, "misses": 1, "size": 1}
    # A cached answer needs no time: served even with an exhausted budget.
    assert dns_resolver.client_mx("sender.test", 0).hosts == ("out.sender.test",)


def test_warm_lookup_is_cheap(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    dns_resolver.client_mx("sender.test", 5)
    rounds = 20_000
    start = time.perf_counter()
    for _ in range(rounds):
        dns_resolver.client_mx("sender.test", 5)
    per_lookup = (time.perf_counter() - start) / rounds
    assert per_lookup < 20e-6  # measured ~2.5 µs; generous for slow CI machines


def test_ttl_expiry_requeries(dns_server: TestDnsServer, resolver_for: ResolverFactory) -> None:
    clock = FakeClock()
    resolver = resolver_for(clock=clock)
    dns_server.add("sender.test", CMX, "10 out.sender.test.", ttl=30)
    resolver.client_mx("sender.test", 5)
    clock.now += 29
    dns_server.clear()
    dns_server.add("sender.test", CMX, "10 new.sender.test.", ttl=30)
    assert resolver.client_mx("sender.test", 5).hosts == ("out.sender.test",)
    assert dns_server.queries == []
    clock.now += 2
    assert resolver.client_mx("sender.test", 5).hosts == ("new.sender.test",)
    assert dns_server.queries == [("sender.test", CMX)]


def test_ttl_capped_by_max_cache_ttl(
    dns_server: TestDnsServer, resolver_for: ResolverFactory
) -> None:
    clock = FakeClock()
    resolver = resolver_for(clock=clock, max_cache_ttl=10)
    dns_server.add("sender.test", CMX, "10 out.sender.test.", ttl=86400)
    resolver.client_mx("sender.test", 5)
    clock.now += 11
    resolver.client_mx("sender.test", 5)
    assert dns_server.queries.count(("sender.test", CMX)) == 2


def test_the_answer_carries_its_ttl_capped_by_max_cache_ttl(
    dns_server: TestDnsServer, resolver_for: ResolverFactory
) -> None:
    """The verdict log line and ``explain`` show the Client MX TTL from here."""
    dns_server.add("sender.test", CMX, "10 out.sender.test.", ttl=300)
    dns_server.add("capped.test", CMX, "10 out.capped.test.", ttl=86400)
    resolver = resolver_for(max_cache_ttl=3600)
    assert resolver.client_mx("sender.test", 5).ttl == 300
    assert resolver.client_mx("capped.test", 5).ttl == 3600
    assert resolver.client_mx("sender.test", 5).ttl == 300  # the cached answer too


@pytest.mark.parametrize("kind", ["nxdomain", "nodata"])
def test_negative_answers_cached_for_soa_minimum(
    kind: str, dns_server: TestDnsServer, resolver_for: ResolverFactory
) -> None:
    clock = FakeClock()
    resolver = resolver_for(clock=clock)
    dns_server.negative_ttl = 40
    if kind == "nodata":
        dns_server.add("sender.test", "A", "192.0.2.1")
    assert resolver.client_mx("sender.test", 5).status is LookupStatus.NOT_FOUND
    dns_server.add("sender.test", CMX, "10 out.sender.test.")  # published meanwhile
    clock.now += 39
    assert resolver.client_mx("sender.test", 5).status is LookupStatus.NOT_FOUND
    clock.now += 2
    assert resolver.client_mx("sender.test", 5).hosts == ("out.sender.test",)
    assert dns_server.queries.count(("sender.test", CMX)) == 2


def test_malformed_rdata_permfail_is_cached(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add_raw("sender.test", CMX, b"\x00")
    assert dns_resolver.client_mx("sender.test", 5).status is LookupStatus.PERMFAIL
    assert dns_resolver.client_mx("sender.test", 5).status is LookupStatus.PERMFAIL
    assert dns_server.queries == [("sender.test", CMX)]


def test_tempfail_not_cached(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    dns_server.servfail("sender.test")
    assert dns_resolver.client_mx("sender.test", 5).status is LookupStatus.TEMPFAIL
    dns_server.clear()
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    assert dns_resolver.client_mx("sender.test", 5).hosts == ("out.sender.test",)


def test_lru_bound(dns_server: TestDnsServer, resolver_for: ResolverFactory) -> None:
    resolver = resolver_for(cache_size=3)
    for i in range(5):
        dns_server.add(f"d{i}.test", CMX, f"10 out.d{i}.test.")
    for i in range(3):
        resolver.client_mx(f"d{i}.test", 5)
    resolver.client_mx("d0.test", 5)  # d0 becomes the most recent; d1 is now the oldest
    resolver.client_mx("d3.test", 5)
    assert resolver.cache_stats()["size"] == 3
    dns_server.queries.clear()
    resolver.client_mx("d0.test", 5)
    resolver.client_mx("d2.test", 5)
    resolver.client_mx("d3.test", 5)
    assert dns_server.queries == []
    resolver.client_mx("d1.test", 5)
    assert dns_server.queries == [("d1.test", CMX)]


def test_cache_disabled(dns_server: TestDnsServer, resolver_for: ResolverFactory) -> None:
    resolver = resolver_for(cache_size=0)
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    resolver.client_mx("sender.test", 5)
    resolver.client_mx("sender.test", 5)
    assert len(dns_server.queries) == 2
    assert resolver.cache_stats()["size"] == 0


def test_concurrent_lookups_consistent(
    dns_server: TestDnsServer, resolver_for: ResolverFactory
) -> None:
    resolver = resolver_for(cache_size=24)
    for i in range(32):
        dns_server.add(f"d{i}.test", CMX, f"10 out.d{i}.test.", f"20 b.d{i}.test.")
    errors: list[str] = []

    def worker(seed: int) -> None:
        for n in range(100):
            i = (seed * 7 + n) % 32
            result = resolver.client_mx(f"d{i}.test", 5)
            if result.hosts != (f"out.d{i}.test", f"b.d{i}.test"):
                errors.append(f"d{i}: {result}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = resolver.cache_stats()
    assert stats["hits"] + stats["misses"] == 8 * 100
    assert stats["size"] <= 24


# --- construction ---------------------------------------------------------------------------


def test_from_config(dns_server: TestDnsServer) -> None:
    dns_server.add("sender.test", 65000, "10 out.sender.test.")
    config = DnsConfig(nameservers=(dns_server.nameserver,), timeout=0.5, client_mx_type=65000)
    resolver = DnsResolver.from_config(config)
    assert resolver.client_mx("sender.test", 5).hosts == ("out.sender.test",)


def test_is_an_mx_resolver(dns_resolver: DnsResolver) -> None:
    resolver: MxResolver = dns_resolver
    assert resolver is dns_resolver


def test_system_resolver_without_resolv_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    import dns.resolver

    real_init = dns.resolver.Resolver.__init__

    def init(self: Any, filename: str = "/etc/resolv.conf", configure: bool = True) -> None:
        real_init(self, str(Path("/nonexistent/resolv.conf")), configure)

    monkeypatch.setattr(dns.resolver.Resolver, "__init__", init)
    resolver = DnsResolver()  # must not raise
    assert resolver.client_mx("a..b", 5).status is LookupStatus.PERMFAIL


def test_bad_nameserver_string_raises() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        DnsResolver(["dns.example"])


def test_server_stops_cleanly() -> None:
    before = threading.active_count()
    start = time.monotonic()
    server = TestDnsServer({"sender.test": {CMX: ["10 out.sender.test."]}}).start()
    started = time.monotonic() - start
    resolver = DnsResolver([server.nameserver], timeout=0.5)
    assert resolver.client_mx("sender.test", 5).hosts == ("out.sender.test",)
    server.delay("slow.test", 10)
    resolver.client_mx("slow.test", 0.1)
    server.stop()
    assert started < 0.1
    assert threading.active_count() == before


# --- what an operator sees: `mtls-milter check` over the in-process server -----------------


def check_json(capsys: pytest.CaptureFixture[str], nameserver: str, domain: str) -> Any:
    argv = ["check", "--mail-from", f"a@{domain}", "--mta-cn", f"out.{domain}", "--dns",
            nameserver, "--authserv-id", "mx.receiver.test", "--json"]  # fmt: skip
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("rdata", "reason"),
    [
        (b"\x00\x0a\x03out\x03ptr\x04test\xc0\x00",
         "Client MX unusable: rdata malformed: compression pointer at byte 15: names in this "
         "record are never compressed (RFC 3597)"),
        (b"\x00\x0a\xc0\x00",  # a pointer to a zero byte is not a null Client MX
         "Client MX unusable: rdata malformed: compression pointer at byte 2"),
        (mx_wire("10 out.ptr.test.") + b"\x00",
         "Client MX unusable: rdata malformed: 1 trailing bytes after the exchange name"),
        (mx_wire("10 out.ptr.test.")[:-1],
         "Client MX unusable: rdata malformed: exchange name truncated"),
    ],
    ids=["pointer-after-labels", "pointer-to-zero", "trailing-byte", "truncated"],
)  # fmt: skip
def test_check_reports_unusable_rdata_as_permerror(
    rdata: bytes,
    reason: str,
    dns_server: TestDnsServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dns_server.add_raw("ptr.test", CMX, rdata)
    report = check_json(capsys, dns_server.nameserver, "ptr.test")
    assert report["result"] == "permerror"
    assert report["reason"].startswith(reason)


def test_check_reason_for_junk_rdata_is_short(
    dns_server: TestDnsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    dns_server.add_raw("junk.test", CMX, JUNK_RDATA["binary-name"])
    report = check_json(capsys, dns_server.nameserver, "junk.test")
    assert report["result"] == "permerror"
    assert len(report["reason"]) <= 300, report["reason"]
    assert len(report["header"]) <= 600, report["header"]


@pytest.mark.parametrize(
    ("spelling", "queried"),
    [("faß.example", "xn--fa-hia.example"), ("Bücher.Example.", "xn--bcher-kva.example")],
)
def test_query_name_uses_the_one_idna_2008_rule(spelling: str, queried: str) -> None:
    """IDNA 2003 would query "fass.example": not the name a certificate carries for faß."""
    assert query_name(spelling) == queried
