"""The [dmarc] configuration section: defaults and validation."""

from __future__ import annotations

import pytest

from mtls_milter.config import ConfigError, config_from_mapping


def test_dmarc_is_off_and_annotate_only_by_default() -> None:
    dmarc = config_from_mapping({}).dmarc
    assert (dmarc.enabled, dmarc.enforce, dmarc.spf, dmarc.dkim) == (
        False,
        False,
        "verify",
        "verify",
    )
    assert dmarc.trusted_authserv_ids == ()


def test_dmarc_section_is_read() -> None:
    raw = {
        "dmarc": {
            "enabled": True,
            "enforce": True,
            "spf": "trusted-results",
            "dkim": "off",
            "trusted_authserv_ids": ["mx.example.net"],
        }
    }
    dmarc = config_from_mapping(raw).dmarc
    assert (dmarc.enabled, dmarc.enforce, dmarc.spf, dmarc.dkim) == (
        True,
        True,
        "trusted-results",
        "off",
    )
    assert dmarc.trusted_authserv_ids == ("mx.example.net",)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"spf": "maybe"}, '[dmarc] spf = \'maybe\': expected one of "verify", "trusted-results"'),
        ({"trusted_authserv_ids": ["a b"]}, "expected an authserv-id"),
        ({"dkim": "trusted-results"}, '"trusted-results" needs trusted_authserv_ids'),
        ({"enforce": "yes"}, "[dmarc] enforce"),
    ],
)
def test_dmarc_section_errors(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"dmarc": section})
    assert message in str(info.value)
