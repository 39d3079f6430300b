"""Every row of SPEC §4, each fallback, and the evidence ladder, with DNS answers injected."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import pytest

from mtls_milter.config import Config, PolicyConfig, TlsConfig
from mtls_milter.core.certs import ChainValidator, parse_certificates
from mtls_milter.core.clock import FixedClock
from mtls_milter.core.dns import AddressLookup, HostLookup, LookupStatus
from mtls_milter.core.evaluate import Result, Transaction, Verdict, evaluate
from mtls_milter.core.evidence import (
    NO_TLS,
    CertPresence,
    Evidence,
    EvidenceKind,
    TlsSession,
    chain_evidence,
    mta_evidence,
)
from mtls_milter.testing.pki import TestPki

OK = LookupStatus.OK
SENDER = "<alice@sender.test>"
CLIENT_MX = {
    "sender.test": HostLookup(OK, ("out.sender.test",)),
    "multi.test": HostLookup(OK, ("a.multi.test", "out2.sender.test")),
    "null.test": HostLookup(OK, (), null=True),
    "broken.test": HostLookup(LookupStatus.TEMPFAIL, detail="SERVFAIL from 127.0.0.1:53"),
    "bad.test": HostLookup(LookupStatus.PERMFAIL, detail="more than 10 Client MX hosts"),
}
SERVER_MX = {
    "plain.test": HostLookup(OK, ("out.sender.test",)),
    "elsewhere.test": HostLookup(OK, ("mx.elsewhere.test",)),
    "flaky.test": HostLookup(LookupStatus.TEMPFAIL, detail="timed out"),
}


@dataclass
class FakeResolver:
    """An MxResolver answering from dictionaries; records what was asked."""

    client: dict[str, HostLookup] = field(default_factory=lambda: dict(CLIENT_MX))
    server: dict[str, HostLookup] = field(default_factory=lambda: dict(SERVER_MX))
    asked: list[tuple[str, str]] = field(default_factory=list)

    def client_mx(self, domain: str, budget: float) -> HostLookup:
        self.asked.append(("client", domain))
        return self.client.get(domain, HostLookup(LookupStatus.NOT_FOUND, detail="NXDOMAIN"))

    def server_mx(self, domain: str, budget: float) -> HostLookup:
        self.asked.append(("server", domain))
        return self.server.get(domain, HostLookup(LookupStatus.NOT_FOUND, detail="NXDOMAIN"))

    def addresses(self, host: str, budget: float) -> AddressLookup:
        return AddressLookup(LookupStatus.NOT_FOUND)

    def cached_client_mx(self, domain: str) -> HostLookup | None:
        return None


def chain(pki: TestPki, leaf: str) -> Evidence:
    return chain_evidence(parse_certificates(pki.leaves[leaf].chain_path.read_bytes()))


def run(
    pki: TestPki,
    validator: ChainValidator,
    evidence: Evidence,
    mail_from: str = SENDER,
    config: Config | None = None,
    helo: str = "out.sender.test",
    resolver: FakeResolver | None = None,
) -> Verdict:
    return evaluate(
        Transaction(mail_from, helo),
        evidence,
        config or Config(),
        resolver or FakeResolver(),
        validator,
        FixedClock(datetime.now(UTC)),
    )


TLS_NO_CERT = Evidence(TlsSession(tls=True, certificate=CertPresence.ABSENT))
TLS_UNKNOWN = Evidence(TlsSession(tls=True))  # Postfix: TLS, nothing about a certificate
TLS_UNTRUSTED = Evidence(TlsSession(tls=True, certificate=CertPresence.PRESENTED))


def test_pass_on_chain(pki: TestPki, validator: ChainValidator) -> None:
    verdict = run(pki, validator, chain(pki, "server"))
    assert (verdict.result, verdict.evidence, verdict.matched, verdict.source) == (
        Result.PASS,
        EvidenceKind.CHAIN,
        "out.sender.test",
        "client-mx",
    )
    assert verdict.domain == "sender.test"
    assert verdict.names == ("out.sender.test",)
    assert (
        verdict.reason == "certificate name out.sender.test matches client-mx host out.sender.test"
    )


def test_pass_on_mta_cn(pki: TestPki, validator: ChainValidator) -> None:
    verdict = run(pki, validator, mta_evidence("OUT.sender.test"))
    assert (verdict.result, verdict.evidence, verdict.matched) == (
        Result.PASS,
        EvidenceKind.MTA,
        "out.sender.test",
    )


def test_pass_on_san_that_is_not_the_cn(pki: TestPki, validator: ChainValidator) -> None:
    verdict = run(pki, validator, chain(pki, "san-not-cn"), mail_from="<a@multi.test>")
    assert (verdict.result, verdict.matched) == (Result.PASS, "out2.sender.test")


@pytest.mark.parametrize(
    ("evidence_name", "mail_from", "reason"),
    [
        ("no-cert", SENDER, "no client certificate"),
        ("unknown", SENDER, "no client certificate verified by the MTA"),
        ("untrusted", SENDER, "certificate not trusted by the MTA and no chain available"),
        ("other-host", SENDER, "no certificate name matches Client MX"),
        ("mta-other", SENDER, "no certificate name matches Client MX"),
        (
            "mta-empty-cn",
            SENDER,
            "the MTA-verified certificate has no usable CN and no chain is available",
        ),
        ("expired", SENDER, "chain invalid: "),
        ("not-yet-valid", SENDER, "chain invalid: "),
        ("unknown-ca", SENDER, "chain invalid: "),
        ("codesigning", SENDER, "chain invalid: "),
        ("name-constrained", "<a@other.test>", "chain invalid: "),
        ("server", "<a@null.test>", "null.test publishes a null Client MX: no host may send"),
        ("wildcard", SENDER, "no certificate name matches Client MX"),
    ],
)
def test_fail_rows(
    pki: TestPki, validator: ChainValidator, evidence_name: str, mail_from: str, reason: str
) -> None:
    special = {
        "no-cert": TLS_NO_CERT,
        "unknown": TLS_UNKNOWN,
        "untrusted": TLS_UNTRUSTED,
        "mta-other": mta_evidence("out.other.test"),
        "mta-empty-cn": mta_evidence(""),
    }
    resolver = FakeResolver()
    resolver.client["other.test"] = HostLookup(OK, ("out.other.test",))
    evidence = special.get(evidence_name) or chain(pki, evidence_name)
    verdict = run(pki, validator, evidence, mail_from=mail_from, resolver=resolver)
    assert verdict.result is Result.FAIL
    assert verdict.reason.startswith(reason), verdict.reason


def test_fail_reports_names_in_header(pki: TestPki, validator: ChainValidator) -> None:
    verdict = run(pki, validator, mta_evidence("out.other.test"))
    field = verdict.header_field("mx.receiver.test")
    assert field.comment == ("evidence=mta", "names=out.other.test")
    assert field.reason == "no certificate name matches Client MX"


@pytest.mark.parametrize(
    ("evidence", "mail_from", "reason"),
    [
        (Evidence(NO_TLS), SENDER, "no TLS"),
        (
            mta_evidence("out.sender.test"),
            "<a@optout.test>",
            "optout.test does not publish Client MX",
        ),
        (mta_evidence("out.sender.test"), "<>", "null sender (MAIL FROM:<>)"),
        (mta_evidence("out.sender.test"), "<postmaster>", "MAIL FROM has no domain"),
        (
            mta_evidence("out.sender.test"),
            "<a@[192.0.2.1]>",
            "MAIL FROM domain is an address literal",
        ),
    ],
)
def test_none_rows(
    pki: TestPki, validator: ChainValidator, evidence: Evidence, mail_from: str, reason: str
) -> None:
    verdict = run(pki, validator, evidence, mail_from=mail_from)
    assert (verdict.result, verdict.reason) == (Result.NONE, reason)


def test_no_tls_asks_no_dns(pki: TestPki, validator: ChainValidator) -> None:
    resolver = FakeResolver()
    run(pki, validator, Evidence(NO_TLS), resolver=resolver)
    assert resolver.asked == []


def test_not_opted_in_skips_chain_validation_and_server_mx(
    pki: TestPki, validator: ChainValidator
) -> None:
    resolver = FakeResolver()
    verdict = run(
        pki, validator, chain(pki, "expired"), mail_from="<a@plain.test>", resolver=resolver
    )
    assert verdict.result is Result.NONE
    assert resolver.asked == [("client", "plain.test")]


def test_temperror_and_permerror(pki: TestPki, validator: ChainValidator) -> None:
    evidence = mta_evidence("out.sender.test")
    temp = run(pki, validator, evidence, mail_from="<a@broken.test>")
    assert (temp.result, temp.reason) == (
        Result.TEMPERROR,
        "Client MX lookup failed: SERVFAIL from 127.0.0.1:53",
    )
    perm = run(pki, validator, evidence, mail_from="<a@bad.test>")
    assert (perm.result, perm.reason) == (
        Result.PERMERROR,
        "Client MX unusable: more than 10 Client MX hosts",
    )


FALLBACK = Config(policy=PolicyConfig(server_mx_fallback=True))


@pytest.mark.parametrize(
    ("domain", "result", "reason"),
    [
        (
            "plain.test",
            Result.PASS,
            "certificate name out.sender.test matches server-mx host out.sender.test",
        ),
        (
            "elsewhere.test",
            Result.NONE,
            "elsewhere.test does not publish Client MX; no certificate name matches MX",
        ),
        ("flaky.test", Result.TEMPERROR, "MX lookup failed: timed out"),
        ("nomx.test", Result.NONE, "nomx.test does not publish Client MX; no usable MX (NXDOMAIN)"),
    ],
)
def test_server_mx_fallback(
    pki: TestPki, validator: ChainValidator, domain: str, result: Result, reason: str
) -> None:
    verdict = run(pki, validator, chain(pki, "both"), mail_from=f"<a@{domain}>", config=FALLBACK)
    assert (verdict.result, verdict.reason) == (result, reason)
    if result is Result.PASS:
        assert verdict.source == "server-mx"


def test_server_mx_fallback_never_fails(pki: TestPki, validator: ChainValidator) -> None:
    verdict = run(pki, validator, TLS_NO_CERT, mail_from="<a@plain.test>", config=FALLBACK)
    assert verdict.result is Result.NONE
    assert verdict.reason == "plain.test does not publish Client MX; no client certificate"


def test_server_mx_fallback_off_by_default(pki: TestPki, validator: ChainValidator) -> None:
    resolver = FakeResolver()
    verdict = run(pki, validator, chain(pki, "both"), mail_from="<a@plain.test>", resolver=resolver)
    assert verdict.result is Result.NONE
    assert ("server", "plain.test") not in resolver.asked


def test_helo_fallback_for_null_sender(pki: TestPki, validator: ChainValidator) -> None:
    config = Config(policy=PolicyConfig(helo_fallback=True))
    verdict = run(
        pki, validator, chain(pki, "both"), mail_from="<>", helo="Sender.Test", config=config
    )
    assert (verdict.result, verdict.domain, verdict.identity) == (
        Result.PASS,
        "sender.test",
        "helo",
    )
    assert verdict.header_field("mx").ptype_property == "helo"
    bad = run(pki, validator, chain(pki, "both"), mail_from="<>", helo="[192.0.2.1]", config=config)
    assert bad.result is Result.NONE
    assert bad.reason.startswith("null sender and HELO name '[192.0.2.1]' unusable")


def test_wildcards_only_when_enabled(pki: TestPki, validator: ChainValidator) -> None:
    config = Config(tls=TlsConfig(allow_wildcards=True))
    verdict = run(pki, validator, chain(pki, "wildcard"), config=config)
    assert (verdict.result, verdict.matched) == (Result.PASS, "out.sender.test")


def test_chain_beats_mta_and_rechecks_sans(pki: TestPki, validator: ChainValidator) -> None:
    # The MTA verified CN mail.sender.test (not published); the chain's SAN out2.sender.test is.
    evidence = replace(
        chain(pki, "san-not-cn"),
        session=TlsSession(
            True, certificate=CertPresence.PRESENTED, mta_verified=True, mta_cn="mail.sender.test"
        ),
    )
    verdict = run(pki, validator, evidence, mail_from="<a@multi.test>")
    assert (verdict.result, verdict.evidence, verdict.matched) == (
        Result.PASS,
        EvidenceKind.CHAIN,
        "out2.sender.test",
    )


def test_invalid_chain_falls_back_to_mta(pki: TestPki, validator: ChainValidator) -> None:
    evidence = replace(
        chain(pki, "unknown-ca"),
        session=TlsSession(
            True, certificate=CertPresence.PRESENTED, mta_verified=True, mta_cn="out.sender.test"
        ),
    )
    verdict = run(pki, validator, evidence)
    assert (verdict.result, verdict.evidence) == (Result.PASS, EvidenceKind.MTA)
