"""TXT lookups of the resolver (DMARC records, DKIM keys): joined strings, cache, failures."""

from __future__ import annotations

from support.dnsserver import TestDnsServer

from mtls_milter.core.lookups import LookupStatus
from mtls_milter.net.dns import DnsResolver


def test_txt_joins_strings_and_is_cached(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add("_dmarc.example.com", "TXT", '"v=DMARC1; " "p=reject"')
    first = dns_resolver.txt("_dmarc.example.com", 1.0)
    assert (first.status, first.records) == (LookupStatus.OK, (b"v=DMARC1; p=reject",))
    dns_server.clear()
    assert dns_resolver.txt("_dmarc.example.com", 0.0) == first  # from the cache, no budget


def test_txt_failures(dns_server: TestDnsServer, dns_resolver: DnsResolver) -> None:
    missing = dns_resolver.txt("_dmarc.nowhere.example", 1.0)
    assert (missing.status, missing.detail) == (LookupStatus.NOT_FOUND, "NXDOMAIN")
    dns_server.servfail("_dmarc.broken.example")
    assert dns_resolver.txt("_dmarc.broken.example", 1.0).status is LookupStatus.TEMPFAIL
    assert dns_resolver.txt("_dmarc.other.example", 0.0).status is LookupStatus.TEMPFAIL
    assert dns_resolver.txt("bad..name", 1.0).status is LookupStatus.PERMFAIL
