"""Reason classes: every reason text the evaluator, the engine and the session produce."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtls_milter.core.evaluate import Result
from mtls_milter.core.reason_class import REASON_CLASSES, reason_class

P, F, N, T, E = Result.PASS, Result.FAIL, Result.NONE, Result.TEMPERROR, Result.PERMERROR

CASES = [
    (P, "certificate name mx.a.test matches client-mx host mx.a.test", "ok"),
    (P, "a.test does not publish Client MX; certificate name x matches server-mx host x", "ok"),
    (N, "null sender (MAIL FROM:<>)", "no_domain"),
    (N, "MAIL FROM has no domain", "no_domain"),
    (N, "MAIL FROM domain is an address literal", "no_domain"),
    (N, "MAIL FROM domain is invalid: label too long", "no_domain"),
    (N, "null sender and HELO name 'x y' unusable: bad label", "no_domain"),
    (N, "optout.test does not publish Client MX", "not_opted_in"),
    (N, "optout.test does not publish Client MX; no TLS", "not_opted_in"),
    (N, "a.test does not publish Client MX; no certificate name matches MX", "not_opted_in"),
    (N, "nomx.test does not publish Client MX; no usable MX (NXDOMAIN)", "not_opted_in"),
    (N, "a.test does not publish Client MX; chain invalid: expired", "not_opted_in"),
    (T, "Client MX lookup failed: SERVFAIL from 127.0.0.1", "dns"),
    (T, "Client MX lookup did not finish within the 5 s DNS budget", "dns"),
    (T, "MX lookup failed: DNS time budget exhausted", "dns"),
    (E, "Client MX unusable: more than 10 hosts", "dns"),
    (T, "internal error: ZeroDivisionError", "internal"),
    (T, "internal error", "internal"),
    (
        T,
        "policy table unavailable: the MTA's certificate fingerprint could not be looked up",
        "internal",
    ),
    (F, "a.test publishes a null Client MX: no host may send", "null_cmx"),
    (F, "no TLS", "no_tls"),
    (F, "chain invalid: certificate has expired", "chain_invalid"),
    (F, "no client certificate", "no_cert"),
    (F, "no client certificate verified by the MTA", "no_cert"),
    (F, "certificate not trusted by the MTA and no chain available", "untrusted"),
    (F, "no certificate name matches Client MX", "name_mismatch"),
    (F, "the certificate has no usable host name", "name_mismatch"),
    (F, "the MTA-verified certificate has no usable CN and no chain is available", "name_mismatch"),
    (F, "something nobody wrote yet", "none_other"),
    (N, "something nobody wrote yet", "none_other"),
    (T, "something nobody wrote yet", "none_other"),
    (F, "internal error: KeyError", "none_other"),  # only temperror may be an internal error
]


@pytest.mark.parametrize(("result", "reason", "expected"), CASES)
def test_reason_class_of_each_reason_text(result: Result, reason: str, expected: str) -> None:
    assert reason_class(result, reason) == expected
    assert reason_class(result.value, reason) == expected


def test_every_class_but_the_catch_all_is_reachable() -> None:
    assert {expected for _, _, expected in CASES} == REASON_CLASSES


def test_evaluator_reasons_are_classified(evaluated_reasons: list[tuple[Result, str]]) -> None:
    """No reason text written in the evaluator's sources falls to none_other."""
    for result, reason in evaluated_reasons:
        assert reason_class(result, reason) != "none_other", (result, reason)


@pytest.fixture
def evaluated_reasons() -> list[tuple[Result, str]]:
    """Every (result, reason) literal in the evaluator's source, with a sample domain."""
    import inspect
    import re

    from mtls_milter import engine
    from mtls_milter.core import evaluate, names
    from mtls_milter.inbound import session_evidence

    found: list[tuple[Result, str]] = []
    for module in (evaluate, names, engine, session_evidence):
        source = inspect.getsource(module)
        for text in re.findall(r'(?:reason=|problem=|Verdict\(Result\.\w+, )f?"([^"]+)"', source):
            text = text.replace("{not_published}", "{domain} does not publish Client MX")
            text = text.replace("{domain}", "a.test").replace("{base.domain}", "a.test")
            found.append((_result_for(text), text))
    assert len(found) >= 8
    return found


def _result_for(text: str) -> Result:
    if text.startswith("certificate name "):
        return Result.PASS
    if text.startswith(("internal error", "Client MX lookup", "MX lookup")):
        return Result.TEMPERROR
    if text.startswith(("null sender", "MAIL FROM", "a.test does not publish")):
        return Result.NONE
    return Result.FAIL


@settings(max_examples=200, deadline=None)
@given(result=st.sampled_from([*Result, "bogus"]), reason=st.text(max_size=300))
def test_any_text_gets_a_member_of_the_set(result: Result | str, reason: str) -> None:
    assert reason_class(result, reason) in REASON_CLASSES
