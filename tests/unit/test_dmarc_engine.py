"""Engine.dmarc: the one end-of-message call; our_methods for forged-field removal."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from mtls_milter.config import config_from_mapping
from mtls_milter.core.clock import FixedClock
from mtls_milter.core.dmarc_message import MessageFacts, our_methods
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
