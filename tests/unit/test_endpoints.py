"""The one parser of socket specs and HOST:PORT texts: table cases and properties."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtls_milter.endpoints import (
    SocketSpec,
    check_dns_option,
    parse_host_port,
    parse_nameserver,
    parse_socket_spec,
)
from mtls_milter.errors import InputError

ADDRESS_TEXT = st.text(alphabet="[]:@/0123456789abcdefilnstux6.", max_size=24)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/m.sock", SocketSpec("unix", path="/run/m.sock")),
        ("local:/run/m.sock", SocketSpec("unix", path="/run/m.sock")),
        ("inet:8898@127.0.0.1", SocketSpec("inet", host="127.0.0.1", port=8898)),
        ("inet6:8898@[::1]", SocketSpec("inet", host="::1", port=8898)),
    ],
)
def test_socket_specs(text: str, expected: SocketSpec) -> None:
    assert parse_socket_spec(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("inet:0@127.0.0.1", "bad port '0'"),
        ("inet:70000@h", "bad port '70000'"),
        ("unix:run/m.sock", "absolute path"),
        ("tcp:1@h", "unknown socket family 'tcp'"),
        ("inet:25@", "expected inet:PORT@HOST"),
        ("inet", "expected unix:/path"),
    ],
)
def test_bad_socket_specs_say_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_socket_spec(text)


def test_port_zero_only_when_asked_for() -> None:
    assert parse_socket_spec("inet:0@127.0.0.1", ephemeral_port=True).port == 0


def test_host_and_port_texts() -> None:
    assert parse_nameserver("192.0.2.1") == ("192.0.2.1", 53)
    assert parse_nameserver("[2001:db8::1]:5353") == ("2001:db8::1", 5353)
    assert parse_nameserver("2001:db8::1") == ("2001:db8::1", 53)
    assert parse_host_port("[::]:80") == ("::", 80)
    assert parse_host_port("0.0.0.0:0") == ("0.0.0.0", 0)
    with pytest.raises(ValueError, match="bad port in"):
        parse_nameserver("192.0.2.1:")
    with pytest.raises(InputError, match=r"^--dns: name server 'ns\.example'"):
        check_dns_option(["192.0.2.1", "ns.example"])


@settings(max_examples=200, deadline=None)
@given(ADDRESS_TEXT)
def test_parsers_raise_only_value_error(text: str) -> None:
    for parse in (parse_socket_spec, parse_nameserver, parse_host_port):
        with contextlib.suppress(ValueError):
            parse(text)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 65535), st.sampled_from(["127.0.0.1", "::1", "mx.example"]))
def test_inet_specs_round_trip(port: int, host: str) -> None:
    text = f"inet6:{port}@[{host}]" if ":" in host else f"inet:{port}@{host}"
    assert parse_socket_spec(text) == SocketSpec("inet", host=host, port=port)
