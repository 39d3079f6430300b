"""The decisions every front end takes from the core: the action, and whether a chain can help."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from support.pki import TestPki
from test_evaluate import FakeResolver, chain

from mtls_milter.config import Config, FailAction, PolicyConfig, TemperrorAction, TlsConfig
from mtls_milter.core.chain import ChainValidator
from mtls_milter.core.clock import FixedClock
from mtls_milter.core.decisions import Action, action_for, chain_could_change
from mtls_milter.core.evaluate import Result, Transaction, Verdict, evaluate
from mtls_milter.core.evidence import CertPresence, TlsSession
from mtls_milter.core.lookups import HostLookup, LookupStatus

OK, NOT_FOUND = LookupStatus.OK, LookupStatus.NOT_FOUND
REJECTING = PolicyConfig(on_fail=FailAction.REJECT, on_temperror=TemperrorAction.TEMPFAIL)
DEFERRING = PolicyConfig(on_fail=FailAction.TEMPFAIL)


@pytest.mark.parametrize(
    ("result", "policy", "action"),
    [
        (Result.FAIL, PolicyConfig(), Action.ACCEPT),
        (Result.FAIL, REJECTING, Action.REJECT),
        (Result.FAIL, DEFERRING, Action.TEMPFAIL),
        (Result.TEMPERROR, PolicyConfig(), Action.ACCEPT),
        (Result.TEMPERROR, REJECTING, Action.TEMPFAIL),
        (Result.TEMPERROR, DEFERRING, Action.ACCEPT),
        (Result.PERMERROR, REJECTING, Action.ACCEPT),
        (Result.NONE, REJECTING, Action.ACCEPT),
        (Result.PASS, REJECTING, Action.ACCEPT),
    ],
)
def test_action_for_each_result_and_policy(
    result: Result, policy: PolicyConfig, action: Action
) -> None:
    assert action_for(Verdict(result, "why"), policy) is action


TRUSTED_MATCH = TlsSession(
    tls=True, certificate=CertPresence.PRESENTED, mta_verified=True, mta_cn="out.sender.test"
)
TRUSTED_OTHER = TlsSession(
    tls=True, certificate=CertPresence.PRESENTED, mta_verified=True, mta_cn="out.other.test"
)
UNTRUSTED = TlsSession(tls=True, certificate=CertPresence.PRESENTED)
PUBLISHED = HostLookup(OK, ("out.sender.test",))
FALLBACK = Config(policy=PolicyConfig(server_mx_fallback=True))


@pytest.mark.parametrize(
    ("client_mx", "session", "config", "could"),
    [
        (PUBLISHED, TRUSTED_MATCH, Config(), False),  # the MTA's CN already matches
        (PUBLISHED, TRUSTED_OTHER, Config(), True),  # the chain's SANs may match
        (PUBLISHED, UNTRUSTED, Config(), True),  # only a chain can give names
        (HostLookup(NOT_FOUND), UNTRUSTED, Config(), False),  # not opted in: "none" stays
        (HostLookup(NOT_FOUND), UNTRUSTED, FALLBACK, True),  # ... unless MX may match
        (HostLookup(OK, (), null=True), UNTRUSTED, Config(), False),  # null: fail regardless
        (HostLookup(LookupStatus.TEMPFAIL), UNTRUSTED, Config(), False),
        (HostLookup(LookupStatus.PERMFAIL), UNTRUSTED, Config(), False),
        (None, TRUSTED_MATCH, Config(), False),  # no domain: only the evidence counts
        (None, UNTRUSTED, Config(), True),
    ],
)
def test_chain_could_change(
    client_mx: HostLookup | None, session: TlsSession, config: Config, could: bool
) -> None:
    assert chain_could_change(client_mx, session, config) is could


def test_wildcard_cn_counts_only_when_wildcards_are_allowed() -> None:
    wildcard = TlsSession(tls=True, mta_verified=True, mta_cn="*.sender.test")
    wild = Config(tls=TlsConfig(allow_wildcards=True))
    assert chain_could_change(PUBLISHED, wildcard, Config())
    assert not chain_could_change(PUBLISHED, wildcard, wild)


def test_evaluate_uses_the_answer_the_caller_holds(pki: TestPki, validator: ChainValidator) -> None:
    """A milter looked Client MX up at MAIL FROM: evaluating must not ask (and spend) again."""
    resolver = FakeResolver()
    held = HostLookup(LookupStatus.TEMPFAIL, detail="no answer within 2 s from 127.0.0.1:53")
    verdict = evaluate(
        Transaction("<alice@sender.test>"),
        chain(pki, "server"),
        Config(),
        resolver,
        validator,
        FixedClock(datetime.now(UTC)),
        client_mx=held,
    )
    assert (verdict.result, verdict.reason) == (
        Result.TEMPERROR,
        "Client MX lookup failed: no answer within 2 s from 127.0.0.1:53",
    )
    assert resolver.asked == []
