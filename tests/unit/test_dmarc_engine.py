"""Engine.dmarc: the one end-of-message call; our_methods for forged-field removal."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mtls_milter.config import config_from_mapping
from mtls_milter.core.clock import FixedClock
from mtls_milter.core.dkim_input import verify_dkim
from mtls_milter.core.dmarc_message import MessageCollector, MessageFacts, our_methods
from mtls_milter.core.dmarc_walk import Budget
from mtls_milter.core.evaluate import Result, Verdict
from mtls_milter.core.lookups import LookupStatus, TxtLookup
from mtls_milter.engine import Engine

CLOCK = FixedClock(datetime(2026, 1, 1, tzinfo=UTC))
PASS = Verdict(Result.PASS, "matched", domain="example.com")


class Resolver:
    def __init__(self, explode: bool = False) -> None:
        self.explode = explode

    def txt(self, name: str, budget: float) -> TxtLookup:
        if self.explode:
            raise RuntimeError("bug")
        if name == "_dmarc.example.com":
            return TxtLookup(LookupStatus.OK, (b"v=DMARC1; p=quarantine",))
        return TxtLookup(LookupStatus.NOT_FOUND, detail="NXDOMAIN")

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def engine(resolver: Any, **dmarc: Any) -> Engine:
    config = config_from_mapping({"dmarc": {"enabled": True, **dmarc}})
    return Engine(config=config, resolver=resolver, validator=None, clock=CLOCK)  # type: ignore[arg-type]


def test_mtls_pass_aligns_and_a_helo_verdict_does_not() -> None:
    facts = MessageFacts(from_fields=["a@example.com"])
    outcome = engine(Resolver(), spf="off", dkim="off").dmarc(facts, PASS)
    assert (outcome.result.result, outcome.result.aligned) == ("pass", ("mtls",))
    helo = Verdict(Result.PASS, "matched", domain="example.com", identity="helo")
    failed = engine(Resolver(), spf="off", dkim="off", enforce=True).dmarc(facts, helo)
    assert (failed.result.result, failed.decision.action) == ("fail", "quarantine")


def test_internal_networks_and_dry_run_do_not_act() -> None:
    facts = MessageFacts(from_fields=["a@example.com"])
    fail = Verdict(Result.FAIL, "no match", domain="example.com")
    outcome = engine(Resolver(), enforce=True).dmarc(facts, fail, internal=True)
    assert (outcome.result.result, outcome.decision.action) == ("fail", "none")


def test_an_internal_error_is_temperror_without_action() -> None:
    facts = MessageFacts(from_fields=["a@example.com"])
    outcome = engine(Resolver(explode=True), enforce=True).dmarc(facts, PASS)
    assert outcome.result.result == "temperror"
    assert outcome.result.reason == "internal error: RuntimeError"
    assert outcome.decision.action == "none"


@pytest.mark.parametrize(
    ("dmarc", "methods"),
    [
        ({"enabled": False}, {"mtls"}),
        ({"enabled": True}, {"mtls", "dmarc", "spf", "dkim"}),
        (
            {"enabled": True, "spf": "trusted-results", "trusted_authserv_ids": ["a.example"]},
            {"mtls", "dmarc", "dkim"},
        ),
    ],
)
def test_our_methods(dmarc: dict[str, Any], methods: set[str]) -> None:
    assert our_methods(config_from_mapping({"dmarc": dmarc})) == methods


def test_collector_rebuilds_a_message_that_dkim_verifies() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    message = b"From: A <a@example.com>\r\nSubject: folded\r\n  line\r\n\r\nBody.\r\n"
    signature = dkim.sign(message, b"s", b"example.com", pem, include_headers=[b"from", b"subject"])
    name, _, value = bytes(signature).rstrip(b"\r\n").partition(b": ")

    collector = MessageCollector(keep_message=True)
    collector.header(name.decode(), value.decode().replace("\r\n", "\n"))
    collector.header("From", "A <a@example.com>")
    collector.header("Subject", "folded\n  line")
    collector.header("Authentication-Results", "other.example; spf=pass")
    collector.body(b"Body.\r\n")
    facts = collector.facts("192.0.2.1", "<a@example.com>", "h.example.com")
    assert facts.from_fields == ["A <a@example.com>"]
    assert facts.results_fields == ["other.example; spf=pass"]

    class Keys:
        def txt(self, name: str, budget: float) -> TxtLookup:
            return TxtLookup(LookupStatus.OK, (record,))

    ids = verify_dkim(facts.raw_message, Keys(), Budget(CLOCK, 5.0))
    assert [(i.result, i.domain) for i in ids] == [("pass", "example.com")]


def test_collector_without_dkim_keeps_no_message() -> None:
    collector = MessageCollector(keep_message=False)
    collector.header("From", "a@example.com")
    collector.body(b"x" * 1000)
    assert collector.facts("", "", "").raw_message == b""
