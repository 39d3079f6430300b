"""The milter with chain evidence: policy-table fingerprints (Postfix), {cert_fp} (Sendmail)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import Milter
import pytest
from cryptography.hazmat.primitives import hashes
from support.dnsserver import TestDnsServer
from support.pki import Issued, TestPki

from mtls_milter.config import config_from_mapping
from mtls_milter.core.certs import fingerprint_sha256
from mtls_milter.engine import Engine
from mtls_milter.inbound.chain_fetch import ChainFetcher
from mtls_milter.inbound.milter import EngineHolder, MtlsMilter
from mtls_milter.inbound.policy_service import PolicyFacts, SessionTable
from mtls_milter.inbound.session import MilterSession
from mtls_milter.net.starttls import StartTlsResult

CLIENT = ("93.184.216.34", 41000)  # global: fetching is allowed
POSTFIX_UNTRUSTED = {"{tls_version}": "TLSv1.3"}  # Postfix sends nothing more
SENDMAIL_NOTHING = {"{tls_version}": "TLSv1.3", "{verify}": "NO"}  # no certificate: no fetch


class Ctx:
    def __init__(self) -> None:
        self.macros: dict[str, str | None] = {}
        self.added: list[str] = []
        self._priv: Any = None

    def getpriv(self) -> Any:
        return self._priv

    def setpriv(self, priv: Any) -> None:
        self._priv = priv

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setsymlist(self, stage: int, macros: str) -> None:
        pass

    def addheader(self, field: str, value: str, idx: int = -1) -> None:
        self.added.append(value.replace("\n\t", " "))

    def chgheader(self, field: str, idx: int, value: str) -> None:
        pass

    def setreply(self, *args: str) -> None:
        pass


class FakeHost:
    """The fetch function: serves ``chain`` for every address, or hangs for ``hang`` seconds."""

    def __init__(self, chain: tuple[Any, ...] = (), hang: float = 0.0) -> None:
        self.chain = chain
        self.hang = hang
        self.calls: list[tuple[str, int, str]] = []

    def __call__(self, address: str, port: int, sni: str, **kwargs: Any) -> StartTlsResult:
        self.calls.append((address, port, sni))
        if self.hang:
            time.sleep(min(self.hang, kwargs["timeout"]))
            return StartTlsResult(connected=True, error=f"timed out after {kwargs['timeout']} s")
        return StartTlsResult(connected=True, starttls=True, chain=list(self.chain))


@pytest.fixture
def zone(dns_server: TestDnsServer) -> TestDnsServer:
    dns_server.add("sender.test", 265, "10 out.sender.test.")
    dns_server.add("san.test", 265, "10 out2.sender.test.")
    dns_server.add("plain.test", "A", "192.0.2.1")
    return dns_server


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(4)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


class Rig:
    def __init__(self, zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor) -> None:
        self.zone, self.pki, self.executor = zone, pki, executor
        self.sessions = SessionTable()
        self._engines: dict[str, Engine] = {}  # one per settings: its DNS cache lives on

    def engine(self, **chain_fetch: Any) -> Engine:
        key = repr(sorted(chain_fetch.items()))
        if key not in self._engines:
            self._engines[key] = self._new_engine(**chain_fetch)
        return self._engines[key]

    def _new_engine(self, **chain_fetch: Any) -> Engine:
        raw: dict[str, dict[str, Any]] = {
            "milter": {"authserv_id": "mx.receiver.test"},
            "dns": {"nameservers": [self.zone.nameserver], "timeout": 1.0, "budget": 2.0},
            "tls": {"trust": [str(self.pki.root_path)]},
            "chain_fetch": {"timeout": 0.5, **chain_fetch},
        }
        return Engine.from_config(config_from_mapping(raw))

    def run(
        self,
        host: FakeHost,
        macros: Mapping[str, str | None],
        *,
        mail_from: str = "<a@sender.test>",
        policy_fp: str = "",
        earlier_fp: str = "",
        **chain_fetch: Any,
    ) -> tuple[str, dict[str, Any], FakeHost]:
        """One SMTP session; ``earlier_fp`` is a policy record from an earlier session of the
        same client address and port, made before this session's connect."""
        fetcher = ChainFetcher(fetch=host, ehlo_name="mx.receiver.test")
        ctx = Ctx()
        milter = MtlsMilter(
            MilterSession(
                EngineHolder(self.engine(**chain_fetch)),
                self.executor,
                sessions=self.sessions,
                fetcher=fetcher,
            )
        )
        milter._setctx(ctx)
        if earlier_fp:
            self.sessions.record(CLIENT[0], str(CLIENT[1]), PolicyFacts(fingerprint=earlier_fp))
        try:
            assert milter.connect("client", 2, CLIENT) == Milter.CONTINUE
            ctx.macros = dict(macros)
            milter.hello("out.sender.test")
            milter.envfrom_bytes(mail_from.encode())
            if policy_fp:  # Postfix's policy request at RCPT
                self.sessions.record(CLIENT[0], str(CLIENT[1]), PolicyFacts(fingerprint=policy_fp))
            milter.data()
            with self._capture() as records:
                milter.eom()
            return ctx.added[0], records[0], host
        finally:
            fetcher.shutdown()

    @staticmethod
    def _capture() -> Any:
        @contextlib.contextmanager
        def cm() -> Iterator[list[dict[str, Any]]]:
            records: list[dict[str, Any]] = []

            class H(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    msg = record.getMessage()
                    if msg.startswith("verdict "):
                        records.append(json.loads(msg[8:]))

            handler = H()
            logger = logging.getLogger("mtls_milter")
            logger.addHandler(handler)
            old = logger.level
            logger.setLevel(logging.INFO)
            try:
                yield records
            finally:
                logger.removeHandler(handler)
                logger.setLevel(old)

        return cm()


@pytest.fixture
def rig(zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor) -> Rig:
    return Rig(zone, pki, executor)


def fp(issued: Issued) -> str:
    return fingerprint_sha256(issued.cert)


def test_postfix_untrusted_with_policy_fingerprint_passes_on_chain(rig: Rig, pki: TestPki) -> None:
    leaf = pki.leaves["server"]  # serverAuth only: Postfix < 3.12 does not trust it
    header, record, host = rig.run(
        FakeHost(leaf.chain), POSTFIX_UNTRUSTED, policy_fp=fp(leaf).replace(":", "").lower()
    )
    assert "mtls=pass (evidence=chain; matched out.sender.test in client-mx)" in header
    assert host.calls == [(CLIENT[0], 25, "out.sender.test")]  # SNI: the HELO name
    assert record["evidence"] == "chain" and record["chain"].startswith("chain fetched from")


def test_match_only_on_a_san_that_is_not_the_cn(rig: Rig, pki: TestPki) -> None:
    leaf = pki.leaves["san-not-cn"]  # CN mail.sender.test, SANs + out2.sender.test
    header, _, _ = rig.run(
        FakeHost(leaf.chain), POSTFIX_UNTRUSTED, mail_from="<a@san.test>", policy_fp=fp(leaf)
    )
    assert "mtls=pass (evidence=chain; matched out2.sender.test in client-mx)" in header


def test_host_serving_another_certificate_gives_no_chain(rig: Rig, pki: TestPki) -> None:
    header, record, _ = rig.run(
        FakeHost(pki.leaves["both"].chain),
        POSTFIX_UNTRUSTED,
        policy_fp=fp(pki.leaves["server"]),
    )
    assert "mtls=fail" in header and "evidence=none" in header
    assert record["reason"] == "certificate not trusted by the MTA and no chain available"
    assert "different certificate" in record["chain"]


def test_sendmail_verify_fail_with_cert_fp(rig: Rig, pki: TestPki) -> None:
    leaf = pki.leaves["server"]
    macros = {
        "{tls_version}": "TLSv1.3",
        "{verify}": "FAIL",
        "{cn_subject}": "out.sender.test",
        "{cert_fp}": fp(leaf),
    }
    header, _, _ = rig.run(FakeHost(leaf.chain), macros)
    assert "mtls=pass (evidence=chain;" in header


def test_sendmail_md5_only(rig: Rig, pki: TestPki) -> None:
    leaf = pki.leaves["server"]
    md5 = leaf.cert.fingerprint(hashes.MD5()).hex(":").upper()
    macros = {"{tls_version}": "TLSv1.3", "{verify}": "FAIL", "{cert_md5}": md5}
    header, record, _ = rig.run(FakeHost(leaf.chain), macros)
    assert "mtls=pass (evidence=chain;" in header
    assert "MD5 only" in record["chain"]


def test_mta_cn_that_does_not_match_is_rechecked_with_sans(rig: Rig, pki: TestPki) -> None:
    leaf = pki.leaves["san-not-cn"]
    macros = {
        "{tls_version}": "TLSv1.3",
        "{verify}": "OK",
        "{cn_subject}": "mail.sender.test",
        "{cert_fp}": fp(leaf),
    }
    header, _, host = rig.run(FakeHost(leaf.chain), macros, mail_from="<a@san.test>")
    assert "mtls=pass (evidence=chain; matched out2.sender.test" in header
    assert host.calls[0][2] == "mail.sender.test"  # SNI: the verified CN


def test_no_fetch_when_mta_cn_matches_or_not_opted_in(rig: Rig, pki: TestPki) -> None:
    leaf = pki.leaves["both"]
    macros = {
        "{tls_version}": "TLSv1.3",
        "{verify}": "OK",
        "{cn_subject}": "out.sender.test",
        "{cert_fp}": fp(leaf),
    }
    header, _, host = rig.run(FakeHost(leaf.chain), macros)
    assert "evidence=mta" in header and host.calls == []
    _, record, host = rig.run(FakeHost(leaf.chain), macros, mail_from="<a@plain.test>")
    assert record["result"] == "none" and host.calls == []


def test_hanging_host_is_bounded(rig: Rig, pki: TestPki) -> None:
    leaf = pki.leaves["server"]
    started = time.monotonic()
    header, record, _ = rig.run(FakeHost(hang=5.0), POSTFIX_UNTRUSTED, policy_fp=fp(leaf))
    assert time.monotonic() - started < 2.5
    assert "evidence=none" in header
    assert record["chain"]  # says why there is no chain


def test_without_policy_record_nothing_is_fetched(rig: Rig, pki: TestPki) -> None:
    header, _, host = rig.run(FakeHost(pki.leaves["server"].chain), POSTFIX_UNTRUSTED)
    assert host.calls == [] and "mtls=fail" in header


def test_an_earlier_sessions_fingerprint_is_never_used(rig: Rig, pki: TestPki) -> None:
    """A record from an earlier session of the same address and port (a renewed certificate,
    another client behind the same NAT) neither starts a fetch nor binds a chain."""
    renewed, earlier = pki.leaves["server"], pki.leaves["both"]
    rig.run(FakeHost(renewed.chain), SENDMAIL_NOTHING)  # warms the Client MX cache
    header, record, host = rig.run(
        FakeHost(earlier.chain), POSTFIX_UNTRUSTED, earlier_fp=fp(earlier)
    )
    assert host.calls == []  # not at MAIL FROM (Client MX cached), not at DATA, not at the end
    assert "mtls=fail" in header and "evidence=none" in header
    assert record["reason"] == "no client certificate verified by the MTA"
    # This session's own record (made at RCPT, after connect) replaces it and is used.
    header, record, host = rig.run(
        FakeHost(renewed.chain),
        POSTFIX_UNTRUSTED,
        earlier_fp=fp(earlier),
        policy_fp=fp(renewed),
    )
    assert len(host.calls) == 1
    assert "mtls=pass (evidence=chain;" in header, record


def test_a_stale_record_does_not_start_a_fetch_for_the_old_certificate(
    rig: Rig, pki: TestPki
) -> None:
    """Certificate renewed between two sessions from the same address and port: the fetch at
    MAIL FROM (Client MX cached) must not bind the old fingerprint and then refuse the new one."""
    renewed, old = pki.leaves["server"], pki.leaves["both"]
    rig.run(FakeHost(renewed.chain), SENDMAIL_NOTHING)  # warms the Client MX cache
    header, record, _ = rig.run(
        FakeHost(renewed.chain), POSTFIX_UNTRUSTED, earlier_fp=fp(old), policy_fp=fp(renewed)
    )
    assert "mtls=pass (evidence=chain;" in header, record
    assert "different certificate" not in record["chain"]
