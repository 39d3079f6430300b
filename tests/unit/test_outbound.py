"""The outbound decision function, against the in-process DNS server."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from support.dnsserver import TestDnsServer

from mtls_milter.core.outbound import PolicyKind, tls_policy
from mtls_milter.net.dns import DnsResolver

ResolverFactory = Callable[..., DnsResolver]


def opted_in(dns: TestDnsServer, domain: str = "receiver.test", *mx: str) -> None:
    dns.add(domain, 265, "10 out.receiver.test.")
    if mx:
        dns.add(domain, "MX", *mx)


def test_opted_in_pins_mx_hosts(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    opted_in(dns_server, "receiver.test", "20 mx2.receiver.test.", "10 mx1.receiver.test.")
    answer = tls_policy("receiver.test", dns_resolver)
    assert answer.kind is PolicyKind.OK
    assert answer.reply() == (
        "OK secure match=mx1.receiver.test:mx2.receiver.test servername=hostname"
    )
    assert answer.mx_hosts == ("mx1.receiver.test", "mx2.receiver.test")
    assert answer.client_mx_hosts == ("out.receiver.test",)
    assert "sts" not in answer.reply()


def test_key_is_normalized(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    opted_in(dns_server, "receiver.test", "10 mx.receiver.test.")
    assert tls_policy("Receiver.TEST.", dns_resolver).reply() == (
        "OK secure match=mx.receiver.test servername=hostname"
    )


def test_implicit_mx(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    opted_in(dns_server)
    dns_server.add("receiver.test", "A", "127.0.0.2")
    answer = tls_policy("receiver.test", dns_resolver)
    assert answer.reply() == "OK secure match=receiver.test servername=hostname"
    assert "implicit" in answer.reason


def test_null_client_mx_still_opts_in(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    dns_server.add("receiver.test", 265, "0 .")
    dns_server.add("receiver.test", "MX", "10 mx.receiver.test.")
    assert tls_policy("receiver.test", dns_resolver).kind is PolicyKind.OK


def test_malformed_client_mx_still_opts_in(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add_raw("receiver.test", 265, b"\x00")
    dns_server.add("receiver.test", "MX", "10 mx.receiver.test.")
    answer = tls_policy("receiver.test", dns_resolver)
    assert answer.kind is PolicyKind.OK
    assert "unusable" in answer.reason


def test_null_mx_stays_strict(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    opted_in(dns_server, "receiver.test", "0 .")
    answer = tls_policy("receiver.test", dns_resolver)
    assert answer.reply() == "OK secure match=receiver.test servername=hostname"
    assert "null MX" in answer.reason


def test_no_mx_host_stays_strict(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    opted_in(dns_server)  # Client MX but neither MX nor A/AAAA
    answer = tls_policy("receiver.test", dns_resolver)
    assert answer.kind is PolicyKind.OK
    assert "no MX host" in answer.reason


def test_unusable_mx_is_temp(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    opted_in(dns_server, "receiver.test", "0 .", "10 mx.receiver.test.")
    answer = tls_policy("receiver.test", dns_resolver)
    assert answer.kind is PolicyKind.TEMP
    assert answer.reply().startswith("TEMP receiver.test opted in")


def test_no_client_mx_is_notfound(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    dns_server.add("plain.test", "MX", "10 mx.plain.test.")
    answer = tls_policy("plain.test", dns_resolver)
    assert answer.kind is PolicyKind.NOTFOUND
    assert answer.reply() == "NOTFOUND "
    assert tls_policy("nonexistent.test", dns_resolver).reply() == "NOTFOUND "


@pytest.mark.parametrize(
    "key",
    [
        ".receiver.test",
        "[mx.receiver.test]",
        "[mx.receiver.test]:587",
        "[192.0.2.1]",
        "[ipv6:2001:db8::1]:25",
        "192.0.2.1",
        "2001:db8::1",
        "receiver.test:587",
        "bad..domain",
        "",
    ],
)
def test_not_a_domain_key_is_notfound(
    key: str, dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    opted_in(dns_server, "receiver.test", "10 mx.receiver.test.")
    assert tls_policy(key, dns_resolver).reply() == "NOTFOUND "
    assert dns_server.queries == []  # decided without DNS


@pytest.mark.parametrize("failure", ["servfail", "drop"])
def test_client_mx_failure_is_temp(
    failure: str, dns_server: TestDnsServer, resolver_for: ResolverFactory
) -> None:
    getattr(dns_server, failure)("receiver.test")
    answer = tls_policy("receiver.test", resolver_for(timeout=0.3))
    assert answer.kind is PolicyKind.TEMP
    assert answer.reply().startswith("TEMP Client MX lookup for receiver.test failed")


def test_mx_failure_is_temp(dns_server: TestDnsServer, resolver_for: ResolverFactory) -> None:
    opted_in(dns_server)
    # Cache the Client MX answer, then make the name fail: the MX lookup now SERVFAILs.
    resolver = resolver_for()
    assert resolver.client_mx("receiver.test", 1.0).hosts == ("out.receiver.test",)
    dns_server.servfail("receiver.test")
    answer = tls_policy("receiver.test", resolver)
    assert answer.kind is PolicyKind.TEMP
    assert answer.reply().startswith("TEMP MX lookup for receiver.test failed: SERVFAIL")


def test_answers_are_cached_by_ttl(
    dns_server: TestDnsServer, resolver_for: ResolverFactory
) -> None:
    now = [1000.0]
    resolver = resolver_for(clock=lambda: now[0])
    dns_server.add("receiver.test", 265, "10 out.receiver.test.", ttl=30)
    dns_server.add("receiver.test", "MX", "10 mx.receiver.test.", ttl=30)
    first = tls_policy("receiver.test", resolver, clock=lambda: now[0]).reply()
    asked = len(dns_server.queries)
    dns_server.clear()  # the zone forgets the domain: only the cache still knows it
    assert tls_policy("receiver.test", resolver, clock=lambda: now[0]).reply() == first
    assert len(dns_server.queries) == 0 and asked == 2
    now[0] += 31  # TTL expired
    assert tls_policy("receiver.test", resolver, clock=lambda: now[0]).reply() == "NOTFOUND "


def test_more_than_ten_mx_hosts_are_all_pinned(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    # RFC 5321 sets no limit on MX hosts; the 10-name limit is for Client MX only.
    hosts = [f"h{i}.receiver.test" for i in range(1, 16)]
    opted_in(dns_server, "receiver.test", *(f"{i} {h}." for i, h in enumerate(hosts, 1)))
    answer = tls_policy("receiver.test", dns_resolver)
    assert answer.reply() == f"OK secure match={':'.join(hosts)} servername=hostname"
    assert answer.mx_hosts == tuple(hosts)


def test_eleven_client_mx_hosts_still_opt_in(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add("receiver.test", 265, *(f"{i} out{i}.receiver.test." for i in range(11)))
    dns_server.add("receiver.test", "MX", "10 mx.receiver.test.")
    answer = tls_policy("receiver.test", dns_resolver)
    assert answer.reply() == "OK secure match=mx.receiver.test servername=hostname"
    assert "11 Client MX host names, more than the limit of 10" in answer.reason


def test_reason_quotes_at_most_200_characters_of_dns_data(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    hosts = [f"{'x' * 60}-{i}.receiver.test" for i in range(30)]
    opted_in(dns_server, "receiver.test", *(f"10 {h}." for h in hosts))
    dns_server.add_raw("junk.test", 265, b"\x00\x0a" + b"v=spf1 include:_spf.example.net " * 2000)
    dns_server.add("junk.test", "MX", "10 mx.junk.test.")
    many = tls_policy("receiver.test", dns_resolver)
    assert many.mx_hosts == tuple(sorted(hosts))  # the policy itself pins every host
    junk = tls_policy("junk.test", dns_resolver)
    assert junk.reply() == "OK secure match=mx.junk.test servername=hostname"
    for answer in (many, junk):
        assert len(answer.reason) <= 300, answer.reason
