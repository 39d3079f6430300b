"""The Client MX rdata decoder on its own: examples and Hypothesis properties (no I/O).

The end-to-end properties (through a DNS server on loopback) are in test_properties_dns.py;
these run the pure decoder on many more inputs.
"""

from __future__ import annotations

import dns.name
import dns.rdata
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mtls_milter.core.lookups import HostLookup, LookupStatus
from mtls_milter.core.mxrdata import MxRdataError, decode_mx_rdata
from mtls_milter.errors import InputError
from mtls_milter.net.dns import MAX_HOSTS, hosts_from_rdatas

PROPERTY = settings(max_examples=200, deadline=None)

label = st.from_regex(r"[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,61}[a-zA-Z0-9_])?", fullmatch=True)
host_name = st.lists(label, min_size=1, max_size=4).map(".".join)


def mx_wire(preference: int, host: str) -> bytes:
    """MX rdata as dnspython writes it without a compression table: never compressed."""
    wire = dns.rdata.from_text("IN", "MX", f"{preference} {host}.").to_wire()
    assert wire is not None
    return wire


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x0a\xc0\x00", "compression pointer at byte 2"),
        (b"\x00\x0a\x03out\xc0\x00", "compression pointer at byte 6"),
        (b"\x00\x0a\x03out", "exchange name truncated: it runs past the end"),
        (b"\x00\x0a\x05out\x00", "exchange name truncated: a label runs past the end"),
        (b"\x00\x0a\x00\x00", "1 trailing bytes after the exchange name"),
        (b"\x00\x0a\x80", "unknown label type 0x80 at byte 2"),
        (b"\x00\x0a\x03a!b\x00", "exchange 'a!b' is not a host name"),
        (b"\x00\x0a\x03a.b\x00", "exchange 'a.b' is not a host name"),
        (b"\x00", "rdata too short (1 bytes, need at least 3)"),
    ],
)
def test_unusable_rdata(data: bytes, message: str) -> None:
    with pytest.raises(MxRdataError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        decode_mx_rdata(data)


def test_decoded_examples() -> None:
    assert decode_mx_rdata(b"\x00\x00\x00") == (0, ".")
    assert decode_mx_rdata(mx_wire(20, "Out_1.Example-Mail.test")) == (
        20,
        "out_1.example-mail.test",
    )


def test_error_is_an_input_error() -> None:
    assert issubclass(MxRdataError, InputError)


@PROPERTY
@given(st.binary(max_size=300))
@example(b"\x00\x0a" + b"\x3f" + b"a" * 63 + b"\xc0\x02")
@example(b"\x00\x0a" + (b"\x3f" + b"a" * 63) * 4 + b"\x00")
def test_any_bytes_decode_or_raise_our_error(data: bytes) -> None:
    try:
        preference, exchange = decode_mx_rdata(data)
    except MxRdataError as exc:
        assert str(exc) and len(str(exc)) <= 300 and str(exc).isprintable()
        return
    assert 0 <= preference <= 0xFFFF
    assert exchange == "." or (exchange == exchange.lower() and not exchange.endswith("."))
    assert data[2] & 0xC0 == 0  # a name starting with a pointer (or unknown label) never decodes


@PROPERTY
@given(st.lists(st.binary(max_size=80), max_size=12))
def test_any_rdata_set_gives_a_defined_lookup(rdatas: list[bytes]) -> None:
    result = hosts_from_rdatas(rdatas)
    assert isinstance(result, HostLookup)
    assert result.status in (LookupStatus.OK, LookupStatus.PERMFAIL, LookupStatus.NOT_FOUND)
    assert len(result.detail) <= 300 and result.detail.isprintable()
    if result.status is LookupStatus.OK:
        assert len(result.hosts) <= MAX_HOSTS
        assert result.null == (result.hosts == ())
    else:
        assert result.hosts == ()
    assert (result.status is LookupStatus.NOT_FOUND) == (rdatas == [])


@PROPERTY
@given(st.integers(0, 0xFFFF), host_name)
def test_uncompressed_mx_wire_round_trips(preference: int, host: str) -> None:
    wire = mx_wire(preference, host)
    assert decode_mx_rdata(wire) == (preference, host.lower())
    assert hosts_from_rdatas([wire]).hosts == (host.lower(),)


@PROPERTY
@given(st.integers(0, 0xFFFF), host_name, st.integers(0, 0x3FFF))
def test_a_pointer_in_place_of_the_root_label_is_refused(
    preference: int, host: str, target: int
) -> None:
    # Whatever the pointer would resolve to (dnspython follows it), the record is unusable.
    wire = mx_wire(preference, host)[:-1] + bytes([0xC0 | target >> 8, target & 0xFF])
    with pytest.raises(MxRdataError, match="compression pointer"):
        decode_mx_rdata(wire)


@PROPERTY
@given(st.integers(0, 0xFFFF), host_name, st.data())
def test_truncated_or_extended_wire_is_refused(
    preference: int, host: str, data: st.DataObject
) -> None:
    wire = mx_wire(preference, host)
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(MxRdataError):
        decode_mx_rdata(wire[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=20))
    with pytest.raises(MxRdataError, match="trailing bytes"):
        decode_mx_rdata(wire + extra)


label_wire = st.binary(min_size=1, max_size=12).map(lambda b: bytes([len(b)]) + b)
name_shaped = st.tuples(
    st.binary(min_size=2, max_size=2),
    st.lists(st.one_of(label_wire, label.map(lambda t: bytes([len(t)]) + t.encode())), max_size=5),
).map(lambda parts: parts[0] + b"".join(parts[1]) + b"\x00")


@PROPERTY
@given(st.one_of(st.binary(min_size=3, max_size=120), name_shaped))
def test_agrees_with_dnspython_on_pointer_free_names(data: bytes) -> None:
    # Where dnspython's general decoder reads a whole, uncompressed name, so do we.
    try:
        name, used = dns.name.from_wire(data, 2)
    except Exception:
        return
    if 2 + used != len(data) or name.to_wire() != data[2:]:
        return  # trailing bytes, or a pointer was followed
    try:
        _, exchange = decode_mx_rdata(data)
    except MxRdataError as exc:
        assert "not a host name" in str(exc)  # stricter about bytes, never about structure
        return
    assert exchange == name.to_text(omit_final_dot=True).lower() or (
        exchange == "." and name == dns.name.root
    )
