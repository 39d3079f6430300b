"""``mtls-milter record``: zone file lines in RFC 3597 syntax that a zone parser loads back to
the Client MX records the milter reads."""

from __future__ import annotations

import dns.rdata
import dns.rdatatype
import dns.zone
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtls_milter.cli.main import main
from mtls_milter.cli.record import mx_rdata, record_lines
from mtls_milter.core.mxrdata import decode_mx_rdata

HOSTS = ["out1.sender.example", "Out2.Sender.Example."]


def test_zone_lines_load_as_client_mx() -> None:
    lines = record_lines("sender.example", HOSTS)
    zone_lines = [line for line in lines if " IN TYPE265 " in line]
    assert zone_lines == [
        "sender.example. 3600 IN TYPE265 \\# 23 000a046f7574310673656e646572076578616d706c6500",
        "sender.example. 3600 IN TYPE265 \\# 23 0014046f7574320673656e646572076578616d706c6500",
    ]
    text = "$ORIGIN sender.example.\n@ 3600 IN SOA ns hostmaster 1 3600 600 86400 60\n"
    text += "@ 3600 IN NS ns\n" + "\n".join(zone_lines) + "\n"
    zone = dns.zone.from_text(text, origin="sender.example.", relativize=False)
    rdataset = zone.find_rdataset("sender.example.", dns.rdatatype.RdataType.make(265))
    assert rdataset.ttl == 3600
    assert sorted(decode_mx_rdata(r.to_wire()) for r in rdataset) == [
        (10, "out1.sender.example"),
        (20, "out2.sender.example"),
    ]


def test_powerdns_and_dnsmasq_lines() -> None:
    lines = record_lines("sender.example", HOSTS[:1], ttl=300)
    assert (
        "pdnsutil add-record sender.example @ TYPE265 300 "
        "'\\# 23 000a046f7574310673656e646572076578616d706c6500'"
    ) in lines
    assert "dns-rr=sender.example,265,000a046f7574310673656e646572076578616d706c6500" in lines
    assert ";   out1.sender.example. 300 IN A <address of out1.sender.example>" in lines


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--domain", "sender.example", "--host", "a b.example"], "invalid label"),
        (["--domain", "sender.example", "--host", "a.example", "--ttl", "-1"], "--ttl -1"),
        (["--domain", "sender.example", "--host", "a.example", "--type", "0"], "--type 0"),
    ],
)
def test_bad_input_exits_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["record", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 65535), st.lists(LABEL, min_size=1, max_size=5))
def test_rdata_round_trips(preference: int, labels: list[str]) -> None:
    host = ".".join(labels)
    wire = mx_rdata(preference, host)
    assert decode_mx_rdata(wire) == (preference, host)
    parsed = dns.rdata.from_text("IN", "MX", f"{preference} {host}.")
    assert wire == parsed.to_wire()
