"""Our Authentication-Results field with spf=, dkim= and dmarc= after mtls= (authres parses it)."""

from __future__ import annotations

import authres
import pytest

from mtls_milter.core.dmarc import DmarcResult, Identifier, dmarc_method, identifier_method
from mtls_milter.core.header import MethodResult, MtlsField, fields_to_delete, render_value


def field(*more: MethodResult) -> MtlsField:
    return MtlsField(
        "mx.example.net", "pass", comment=("evidence=chain",), value="example.com", more=more
    )


def test_dmarc_pass_aligned_by_mtls_renders_and_parses() -> None:
    dmarc = dmarc_method(
        DmarcResult("pass", domain="example.com", policy="reject", aligned=("mtls",))
    )
    value = render_value(field(dmarc))
    assert value == (
        "mx.example.net; mtls=pass (evidence=chain) smtp.mailfrom=example.com; "
        "dmarc=pass (p=reject; aligned=mtls) header.from=example.com"
    )
    parsed = authres.AuthenticationResultsHeader.parse_value(value)
    methods = [(str(r.method), str(r.result)) for r in parsed.results]
    assert methods == [("mtls", "pass"), ("dmarc", "pass")]
    assert parsed.results[1].properties[0].value == "example.com"


def test_spf_dkim_and_dmarc_fail_parse_with_their_properties() -> None:
    more = (
        identifier_method(Identifier("spf", "softfail", "bounce.example.org")),
        identifier_method(Identifier("dkim", "pass", "example.org", "sel_1")),
        dmarc_method(
            DmarcResult("fail", "no aligned authenticated identifier", "example.com", "quarantine")
        ),
    )
    value = render_value(field(*more))
    assert "spf=softfail smtp.mailfrom=bounce.example.org;" in value
    assert "dkim=pass header.d=example.org header.s=sel_1;" in value
    assert value.endswith(
        "dmarc=fail (p=quarantine; no aligned authenticated identifier) header.from=example.com"
    )
    parsed = authres.AuthenticationResultsHeader.parse_value(value)
    props = {(str(r.method), p.type, p.name, p.value) for r in parsed.results for p in r.properties}
    assert ("dkim", "header", "s", "sel_1") in props
    assert ("spf", "smtp", "mailfrom", "bounce.example.org") in props


def test_hostile_values_stay_parseable() -> None:
    dmarc = DmarcResult("permerror", 'author domain "x;y" (bad)\r\n', "", "")
    dkim = Identifier("dkim", "fail", "ex ample;.com", 'sel"(')
    value = render_value(field(identifier_method(dkim), dmarc_method(dmarc)))
    parsed = authres.AuthenticationResultsHeader.parse_value(value)
    assert [str(r.method) for r in parsed.results] == ["mtls", "dkim", "dmarc"]


def test_invalid_method_results_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid 'dmarc' result 'softfail'"):
        MethodResult("dmarc", "softfail")


def test_forged_spf_dkim_dmarc_fields_with_our_id_are_deleted_when_we_write_them() -> None:
    values = [
        "mx.example.net; dmarc=pass header.from=bank.example",
        "mx.example.net; spf=pass smtp.mailfrom=bank.example",
        "other.example; dmarc=pass header.from=bank.example",
    ]
    ours = frozenset({"mtls", "dmarc", "spf", "dkim"})
    assert fields_to_delete(values, "mx.example.net", methods=ours) == [2, 1]
    # DMARC off: only mtls is ours, another tool's spf= under the same id stays.
    assert fields_to_delete(values, "mx.example.net") == []
