"""DNS fixtures: an in-process DNS server per test and resolvers pointed at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.dnsserver import TestDnsServer

from mtls_milter.net.dns import DnsResolver

ResolverFactory = Callable[..., DnsResolver]


@pytest.fixture
def dns_server() -> Iterator[TestDnsServer]:
    """A started :class:`TestDnsServer` with an empty zone, stopped after the test."""
    with TestDnsServer() as server:
        yield server


@pytest.fixture
def resolver_for(dns_server: TestDnsServer) -> ResolverFactory:
    """Factory: ``resolver_for(**kwargs)`` → a DnsResolver on ``dns_server`` (timeout 0.5 s)."""

    def make(**kwargs: Any) -> DnsResolver:
        kwargs.setdefault("timeout", 0.5)
        return DnsResolver([dns_server.nameserver], **kwargs)

    return make


@pytest.fixture
def dns_resolver(resolver_for: ResolverFactory) -> DnsResolver:
    """A DnsResolver on ``dns_server`` with a 0.5 s timeout and the default cache."""
    return resolver_for()
