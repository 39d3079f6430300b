"""ACME fixtures: an account key (josepy), a token, a free port on 127.0.0.2-7, MX hosts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from acme import challenges
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.b64 import b64decode, b64encode
from josepy.jwk import JWK, JWKEC
from support.dnsserver import TestDnsServer
from support.httphost import Handler, HttpHost
from support.ports import free_port

from mtls_milter.acme.fetch import http_fetch
from mtls_milter.acme.responder import ResponderThread
from mtls_milter.acme.results import ValidationResult, ValidatorPolicy
from mtls_milter.acme.validator import validate
from mtls_milter.net.dns import DnsResolver

ADDRESSES = tuple(f"127.0.0.{i}" for i in range(2, 8))


@dataclass(frozen=True)
class Account:
    """An ACME account key as the acme package sees it."""

    key: JWK

    @property
    def thumbprint(self) -> str:
        return b64encode(self.key.thumbprint()).decode("ascii")

    def key_authorization(self, token: str) -> str:
        chall = challenges.HTTP01(token=b64decode(token))
        return str(chall.key_authorization(self.key))


def new_account() -> Account:
    return Account(JWKEC(key=ec.generate_private_key(ec.SECP256R1())))


def new_token() -> str:
    return b64encode(os.urandom(challenges.HTTP01.TOKEN_SIZE)).decode("ascii")


@dataclass
class MxHosts:
    """Starts responders and scripted HTTP hosts on loopback addresses, all on one port."""

    root: Path
    port: int
    dns: TestDnsServer
    running: list[ResponderThread | HttpHost] = field(default_factory=list)

    def responder(self, address: str, files: dict[str, str | bytes]) -> Path:
        """Our responder on ``address``, serving ``files`` (token -> content); its DIR."""
        directory = self.root / f"tokens-{address}"
        directory.mkdir(exist_ok=True)
        for name, content in files.items():
            data = content.encode("ascii") if isinstance(content, str) else content
            (directory / name).write_bytes(data)
        thread = ResponderThread(directory, [(address, self.port)]).start()
        self.running.append(thread)
        return directory

    def http(self, address: str, handler: Handler, **kwargs: object) -> HttpHost:
        """A scripted HTTP host on ``address``."""
        host = HttpHost(address, self.port, handler, **kwargs).start()  # type: ignore[arg-type]
        self.running.append(host)
        return host

    def validate(
        self, kind: str, domain: str, token: str, thumbprint: str, **policy: object
    ) -> ValidationResult:
        """Run the validator against the test DNS server with short test limits."""
        settings: dict[str, object] = {"port": self.port, "request_timeout": 1.0, "deadline": 8.0}
        settings.update(policy)
        resolver = DnsResolver([self.dns.nameserver], timeout=0.5)
        return validate(
            kind,
            domain,
            token,
            thumbprint,
            resolver=resolver,
            fetch=http_fetch,
            policy=ValidatorPolicy(**settings),  # type: ignore[arg-type]
        )

    def stop(self) -> None:
        for item in reversed(self.running):
            item.stop()


@pytest.fixture(scope="session")
def acme_account() -> Account:
    """The ACME account key (EC P-256)."""
    return new_account()


@pytest.fixture
def acme_token() -> str:
    """A fresh challenge token (32 random bytes, base64url)."""
    return new_token()


@pytest.fixture
def mx_hosts(tmp_path: Path, dns_server: TestDnsServer) -> Iterator[MxHosts]:
    """An :class:`MxHosts` on a port free on 127.0.0.2-7; everything stopped afterwards."""
    hosts = MxHosts(tmp_path, free_port(ADDRESSES), dns_server)
    try:
        yield hosts
    finally:
        hosts.stop()
