"""Every row of the result table, each fallback, and the evidence rules, with DNS injected."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from support.pki import TestPki

from mtls_milter.config import Config, PolicyConfig, TlsConfig
from mtls_milter.core.certs import TrustAnchors, certificate_names, parse_certificates
from mtls_milter.core.chain import ChainValidator
from mtls_milter.core.clock import FixedClock
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
from mtls_milter.core.lookups import AddressLookup, HostLookup, LookupStatus
from mtls_milter.engine import Engine

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
        (Evidence(NO_TLS), "<a@optout.test>", "optout.test does not publish Client MX; no TLS"),
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


def test_no_tls_from_an_opted_in_domain_fails(pki: TestPki, validator: ChainValidator) -> None:
    # A spoofer that skips STARTTLS must not escape on_fail: Client MX is looked up anyway.
    resolver = FakeResolver()
    verdict = run(pki, validator, Evidence(NO_TLS), resolver=resolver)
    assert (verdict.result, verdict.reason, verdict.evidence) == (
        Result.FAIL,
        "no TLS",
        EvidenceKind.NONE,
    )
    assert resolver.asked == [("client", "sender.test")]
    assert verdict.header_field("mx").reason == "no TLS"


@pytest.mark.parametrize(
    ("mail_from", "result", "reason"),
    [
        ("<a@null.test>", Result.FAIL, "null.test publishes a null Client MX: no host may send"),
        (
            "<a@broken.test>",
            Result.TEMPERROR,
            "Client MX lookup failed: SERVFAIL from 127.0.0.1:53",
        ),
        ("<a@bad.test>", Result.PERMERROR, "Client MX unusable: more than 10 Client MX hosts"),
    ],
)
def test_no_tls_still_follows_client_mx(
    pki: TestPki, validator: ChainValidator, mail_from: str, result: Result, reason: str
) -> None:
    verdict = run(pki, validator, Evidence(NO_TLS), mail_from=mail_from)
    assert (verdict.result, verdict.reason) == (result, reason)


def test_no_tls_with_server_mx_fallback_is_none(pki: TestPki, validator: ChainValidator) -> None:
    verdict = run(pki, validator, Evidence(NO_TLS), mail_from="<a@plain.test>", config=FALLBACK)
    assert (verdict.result, verdict.reason) == (
        Result.NONE,
        "plain.test does not publish Client MX; no TLS",
    )


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


def mta_verified(evidence: Evidence, cn: str) -> Evidence:
    """``evidence`` in a session whose certificate the MTA verified, with CN ``cn``."""
    session = TlsSession(True, certificate=CertPresence.PRESENTED, mta_verified=True, mta_cn=cn)
    return replace(evidence, session=session)


def test_invalid_bound_chain_fails_whatever_the_mta_trusted(
    pki: TestPki, validator: ChainValidator
) -> None:
    verdict = run(pki, validator, mta_verified(chain(pki, "unknown-ca"), "out.sender.test"))
    assert (verdict.result, verdict.evidence) == (Result.FAIL, EvidenceKind.CHAIN)
    assert verdict.reason == "chain invalid: unknown issuer (no path to a trusted root)"


def test_valid_bound_chain_names_are_the_only_names(
    pki: TestPki, validator: ChainValidator
) -> None:
    # The MTA verified CN out.sender.test (published), but the bound chain names another host.
    verdict = run(pki, validator, mta_verified(chain(pki, "other-host"), "out.sender.test"))
    assert (verdict.result, verdict.reason, verdict.evidence, verdict.names) == (
        Result.FAIL,
        "no certificate name matches Client MX",
        EvidenceKind.CHAIN,
        ("out.other.test",),
    )


@pytest.mark.parametrize(
    "bad_san",
    [
        pytest.param("out.sender.test\x00.evil.test", id="nul"),
        pytest.param("a" * 65_000, id="65kB"),
        pytest.param("out sender.test", id="space"),
        pytest.param("-out-.sender.test", id="not-ldh"),
    ],
)
def test_unusable_san_leaves_no_names_and_no_cn_fallback(
    pki: TestPki, validator: ChainValidator, bad_san: str
) -> None:
    # The CN is the published host; an unusable SAN dNSName must not let it through.
    issued = pki.issue("bad-san", cn="out.sender.test", sans=[bad_san])
    evidence = chain_evidence(issued.chain)
    verdict = run(pki, validator, evidence)
    assert (verdict.result, verdict.reason, verdict.evidence, verdict.names) == (
        Result.FAIL,
        "the certificate has no usable host name",
        EvidenceKind.CHAIN,
        (),
    )
    mixed = pki.issue("mixed-san", cn="out.sender.test", sans=["out.sender.test", bad_san])
    assert certificate_names(mixed.cert) == ()


# IDNA 2008 and IDNA 2003 differ on "ß": xn--fa-hia (2008) versus fass (2003).
IDN_MX = {
    "xn--fa-hia.test": HostLookup(OK, ("out.faß.test",)),
    "sender.test": HostLookup(OK, ("out.xn--fa-hia.test",)),
}


@pytest.mark.parametrize(
    ("sans", "cn", "mail_from"),
    [
        pytest.param(["out.xn--fa-hia.test"], "out.xn--fa-hia.test", "<a@faß.test>", id="san"),
        pytest.param([], "out.faß.test", SENDER, id="unicode-cn"),
    ],
)
def test_one_idna_2008_normalization_for_every_name(
    pki: TestPki, validator: ChainValidator, sans: list[str], cn: str, mail_from: str
) -> None:
    issued = pki.issue("idn", cn=cn, sans=sans)
    resolver = FakeResolver(client=dict(IDN_MX))
    verdict = run(pki, validator, chain_evidence(issued.chain), mail_from, resolver=resolver)
    assert (verdict.result, verdict.names) == (Result.PASS, ("out.xn--fa-hia.test",))
    assert verdict.domain in ("xn--fa-hia.test", "sender.test")
    mta = run(pki, validator, mta_evidence(cn), mail_from, resolver=resolver)
    assert (mta.result, mta.names) == (Result.PASS, ("out.xn--fa-hia.test",))


# -- internal errors: the engine is the one boundary, and its answer is temperror ------------------


class RaisingResolver(FakeResolver):
    def client_mx(self, domain: str, budget: float) -> HostLookup:
        raise RuntimeError("resolver bug")


class RaisingValidator(ChainValidator):
    def _validate_client(self, *args: object, **kwargs: object) -> Any:
        raise KeyError("validator bug")


def test_internal_error_in_a_collaborator_is_temperror_never_fail(
    pki: TestPki, trust_anchors: TrustAnchors, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FixedClock(datetime.now(UTC))
    engine = Engine(Config(), RaisingResolver(), ChainValidator(trust_anchors), clock)
    with caplog.at_level(logging.ERROR, logger="mtls_milter.engine"):
        verdict = engine.evaluate(Transaction(SENDER), mta_evidence("out.sender.test"))
    assert (verdict.result, verdict.reason, verdict.domain) == (
        Result.TEMPERROR,
        "internal error: RuntimeError",
        "sender.test",
    )
    [record] = caplog.records
    assert record.exc_info is not None and "resolver bug" in str(record.exc_info[1])
    assert "internal error: RuntimeError" in record.getMessage()


def test_internal_error_in_chain_validation_is_temperror(
    pki: TestPki, trust_anchors: TrustAnchors
) -> None:
    # Before, the validator turned its own bug into an invalid chain, i.e. fail.
    clock = FixedClock(datetime.now(UTC))
    engine = Engine(Config(), FakeResolver(), RaisingValidator(trust_anchors), clock)
    verdict = engine.evaluate(Transaction(SENDER), chain(pki, "server"))
    assert (verdict.result, verdict.reason) == (Result.TEMPERROR, "internal error: KeyError")
    header = verdict.header_field("mx.receiver.test")
    assert (header.result, header.reason) == ("temperror", "internal error: KeyError")
