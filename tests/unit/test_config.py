"""Configuration: defaults, the README's key names, and clear errors naming the key and the file."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mtls_milter.config import (
    Config,
    ConfigError,
    EkuPolicy,
    FailAction,
    MilterTransport,
    TemperrorAction,
    known_keys,
    load_config,
)
from mtls_milter.endpoints import parse_nameserver


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mtls-milter.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_no_file_gives_documented_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.milter.socket == "inet:8898@127.0.0.1"
    assert config.dns.client_mx_type == 265
    assert config.dns.nameservers == ()
    assert config.tls.trust == ("system",)
    assert config.tls.eku is EkuPolicy.SERVER_OR_CLIENT
    assert config.tls.allow_wildcards is False
    assert config.tls.min_rsa_bits == 2048
    assert config.policy.on_fail is FailAction.ANNOTATE
    assert config.policy.on_temperror is TemperrorAction.ANNOTATE
    assert config.policy.internal_networks == ()


def test_spec_keys_exist() -> None:
    keys = known_keys()
    for section, key in [
        ("milter", "socket"),
        ("milter", "authserv_id"),
        ("dns", "nameservers"),
        ("dns", "timeout"),
        ("dns", "client_mx_type"),
        ("tls", "trust"),
        ("tls", "eku"),
        ("tls", "allow_wildcards"),
        ("tls", "min_rsa_bits"),
        ("policy", "on_fail"),
        ("policy", "on_temperror"),
        ("policy", "server_mx_fallback"),
        ("policy", "dry_run"),
    ]:
        assert key in keys[section]


def test_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[milter]
socket = "unix:/run/mtls-milter/milter.sock"
authserv_id = "mx.example.net"
[dns]
nameservers = ["127.0.0.1:5353", "[::1]:53", "192.0.2.1"]
timeout = 1.5
client_mx_type = 65280
[tls]
trust = ["system", "/etc/ssl/private-ca.pem"]
eku = "client"
allow_wildcards = true
min_rsa_bits = 3072
[policy]
on_fail = "reject"
on_temperror = "tempfail"
server_mx_fallback = true
dry_run = true
internal_networks = ["10.0.0.0/8", "2001:db8::/32"]
""",
    )
    config = load_config(path)
    assert config.milter.authserv_id == "mx.example.net"
    assert config.dns.nameservers == ("127.0.0.1:5353", "[::1]:53", "192.0.2.1")
    assert config.dns.timeout == 1.5
    assert config.dns.client_mx_type == 65280
    assert config.tls.trust == ("system", "/etc/ssl/private-ca.pem")
    assert config.tls.eku is EkuPolicy.CLIENT
    assert config.tls.min_rsa_bits == 3072
    assert config.policy.on_fail is FailAction.REJECT
    assert config.policy.on_temperror is TemperrorAction.TEMPFAIL
    assert config.policy.internal_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert config.source == str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[milter]\nsockett = 'unix:/x'\n", "unknown key [milter] sockett"),
        ("[dnss]\ntimeout = 1\n", "unknown section [dnss]"),
        ("[dns]\ntimeout = 'fast'\n", "[dns] timeout = 'fast': expected a number"),
        ("[dns]\ntimeout = 0\n", "[dns] timeout = 0: expected a number from"),
        ("[dns]\nclient_mx_type = 70000\n", "[dns] client_mx_type = 70000"),
        ("[dns]\nclient_mx_type = true\n", "expected an integer"),
        ("[dns]\nnameservers = ['dns.google']\n", "is not an IP address"),
        ("[dns]\nnameservers = '127.0.0.1'\n", "expected a list"),
        ("[dns]\ntimeout = 9\nbudget = 5\n", "[dns] timeout (9 s) exceeds [dns] budget"),
        ("[tls]\neku = 'server'\n", "[tls] eku = 'server': expected one of \"server-or-client\""),
        ("[milter]\ntransport = 'libmilter'\n", "[milter] transport = 'libmilter': expected one"),
        ("[tls]\ntrust = []\n", "[tls] trust is empty"),
        ("[tls]\nallow_wildcards = 'yes'\n", "expected true or false"),
        ("[tls]\nmin_rsa_bits = 1024\n", "[tls] min_rsa_bits = 1024: expected an integer"),
        ("[tls]\nmin_rsa_bits = 32768\n", "= 32768: expected an integer from 2048 to 16384"),
        ("[tls]\nmin_rsa_bits = 3072.0\n", "[tls] min_rsa_bits = 3072.0: expected an integer"),
        ("[tls]\nmin_rsa_bits = '4096'\n", "[tls] min_rsa_bits = '4096': expected an integer"),
        ("[policy]\non_fail = 'bounce'\n", "[policy] on_fail = 'bounce'"),
        ("[policy]\non_temperror = 'reject'\n", "[policy] on_temperror = 'reject'"),
        ("[policy]\ninternal_networks = ['10.0.0.300/8']\n", "is not a network"),
        ("[milter]\nsocket = 'tcp:25'\n", "unknown socket family 'tcp'"),
        ("[milter]\nsocket = 'inet:99999@localhost'\n", "bad port"),
        ("[milter]\nsocket = 'unix:relative'\n", "absolute path"),
        ("milter = 3\n", "milter must be a table"),
        ("[milter\n", "not valid TOML"),
    ],
)
def test_bad_values_name_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[milter]\nauthserv_id = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_milter_transport_defaults_to_asyncio_and_takes_pymilter(tmp_path: Path) -> None:
    assert load_config(None).milter.transport is MilterTransport.ASYNCIO
    config = load_config(write(tmp_path, '[milter]\ntransport = "pymilter"\n'))
    assert config.milter.transport is MilterTransport.PYMILTER


def test_config_is_immutable() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.dns.timeout = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
    ],
)
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected
