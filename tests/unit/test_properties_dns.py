"""Properties of the Client MX rdata decoding, end to end through a DNS server on loopback.

Client MX is a type dnspython does not know, so its rdata reaches the resolver as opaque bytes
that the domain's owner chose: any bytes must give ``ok`` with host names the rest of the
product can use, or ``permfail`` - never an exception, never a name with bytes no host name has.
Names in the rdata of such a type are never compressed (RFC 3597 §4), so a compression pointer
makes the record unusable however it resolves.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.dnsserver import TestDnsServer

from mtls_milter.core.lookups import HostLookup, LookupStatus, query_name
from mtls_milter.net.dns import MAX_HOSTS, DnsResolver

CLIENT_MX = 265
SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
HOST_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_names = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[TestDnsServer]:
    with TestDnsServer() as running:
        yield running


@pytest.fixture(scope="module")
def resolver(server: TestDnsServer) -> DnsResolver:
    return DnsResolver([server.nameserver], timeout=2.0, cache_size=0)


def lookup(server: TestDnsServer, resolver: DnsResolver, rdatas: list[bytes]) -> HostLookup:
    """Publish ``rdatas`` as the Client MX of a fresh name and look it up."""
    name = f"p{next(_names)}.sender.test"
    for wire in rdatas:
        server.add_raw(name, CLIENT_MX, wire)
    return resolver.client_mx(name, 5.0)


def wire_name(host: str) -> bytes:
    if host == ".":
        return b"\x00"
    return b"".join(bytes([len(p)]) + p.encode("ascii") for p in host.split(".")) + b"\x00"


def mx_rdata(preference: int, host: str) -> bytes:
    return preference.to_bytes(2, "big") + wire_name(host)


label_bytes = st.one_of(
    st.from_regex(rb"[a-zA-Z0-9-]{1,12}", fullmatch=True),
    st.binary(min_size=1, max_size=12),
    st.binary(min_size=60, max_size=64),
)
ending = st.one_of(
    st.just(b"\x00"),
    st.binary(min_size=2, max_size=2).map(lambda b: bytes([0xC0 | b[0] & 0x3F, b[1]])),
    st.just(b""),
    st.binary(min_size=1, max_size=4).map(lambda b: b"\x00" + b),
    st.sampled_from([b"\x40", b"\x80\x01"]),
)


@st.composite
def rdata_like(draw: st.DrawFn) -> bytes:
    """Mostly MX-shaped rdata: preference, length-prefixed labels, some ending; else any bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=40))
    labels = draw(st.lists(label_bytes, max_size=5))
    body = b"".join(
        bytes([min(len(lb) + draw(st.sampled_from([0, 0, 0, 1, -1])), 63)]) + lb for lb in labels
    )
    return draw(st.binary(min_size=2, max_size=2)) + body + draw(ending)


def assert_usable(result: HostLookup) -> None:
    assert result.status in (LookupStatus.OK, LookupStatus.PERMFAIL), result
    if result.status is LookupStatus.PERMFAIL:
        assert result.hosts == () and result.detail
        return
    if result.null:
        assert result.hosts == ()
        return
    assert 0 < len(result.hosts) <= MAX_HOSTS
    assert len(set(result.hosts)) == len(result.hosts)
    for host in result.hosts:
        assert query_name(host) == host  # a name DNS can carry without escapes, lower case
        assert all(HOST_LABEL.fullmatch(label) for label in host.split(".")), host


@SETTINGS
@given(st.lists(rdata_like(), min_size=1, max_size=4))
@example([b"\x00\x00\x03foo\xc0\x01"])
@example([b"\x00\x0a\x03a b\x00"])
@example([b"\x00\x0a\x03a.b\x00"])
def test_any_rdata_gives_usable_hosts_or_permfail(
    server: TestDnsServer, resolver: DnsResolver, rdatas: list[bytes]
) -> None:
    assert_usable(lookup(server, resolver, rdatas))


host_name = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?){0,3}", fullmatch=True
)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 65535), host_name), min_size=1, max_size=MAX_HOSTS))
def test_mx_wire_round_trips(
    server: TestDnsServer, resolver: DnsResolver, records: list[tuple[int, str]]
) -> None:
    spelled = [(pref, host.upper() if pref % 2 else host) for pref, host in records]
    result = lookup(server, resolver, [mx_rdata(pref, host) for pref, host in spelled])
    best: dict[str, int] = {}
    for pref, host in records:
        best[host] = min(pref, best.get(host, pref))
    assert result.status is LookupStatus.OK, result.detail
    assert result.hosts == tuple(sorted(best, key=lambda h: (best[h], h)))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(0, 65535),
    st.lists(host_name, min_size=MAX_HOSTS + 1, max_size=MAX_HOSTS + 5, unique=True),
)
def test_more_than_max_hosts_is_permfail(
    server: TestDnsServer, resolver: DnsResolver, preference: int, hosts: list[str]
) -> None:
    result = lookup(server, resolver, [mx_rdata(preference, host) for host in hosts])
    assert result.status is LookupStatus.PERMFAIL


@SETTINGS
@given(
    st.binary(min_size=2, max_size=2),
    st.lists(st.from_regex(rb"[a-z0-9]{1,10}", fullmatch=True), max_size=3),
    st.integers(0, 0x3FFF),
)
@example(b"\x00\x00", [b"foo"], 1)  # pointed at a zero byte of the preference: "foo."
@example(b"\x00\x00", [], 0)  # the whole name a pointer to a zero byte: null MX
def test_a_compression_pointer_never_yields_a_usable_host(
    server: TestDnsServer,
    resolver: DnsResolver,
    preference: bytes,
    labels: list[bytes],
    target: int,
) -> None:
    body = b"".join(bytes([len(label)]) + label for label in labels)
    pointer = bytes([0xC0 | target >> 8, target & 0xFF])
    result = lookup(server, resolver, [preference + body + pointer])
    assert result.status is LookupStatus.PERMFAIL, result


@SETTINGS
@given(st.integers(0, 65535), host_name, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_or_truncation_are_permfail(
    server: TestDnsServer, resolver: DnsResolver, preference: int, host: str, extra: bytes
) -> None:
    wire = mx_rdata(preference, host)
    assert lookup(server, resolver, [wire + extra]).status is LookupStatus.PERMFAIL
    assert lookup(server, resolver, [wire[:-1]]).status is LookupStatus.PERMFAIL


@SETTINGS
@given(st.integers(0, 65535), st.lists(st.tuples(st.integers(0, 65535), host_name), max_size=3))
def test_null_mx_alone_is_null_and_mixed_is_permfail(
    server: TestDnsServer, resolver: DnsResolver, preference: int, others: list[tuple[int, str]]
) -> None:
    rdatas = [mx_rdata(preference, "."), *(mx_rdata(p, h) for p, h in others)]
    result = lookup(server, resolver, rdatas)
    if others:
        assert result.status is LookupStatus.PERMFAIL
    else:
        assert result.status is LookupStatus.OK and result.null and result.hosts == ()
