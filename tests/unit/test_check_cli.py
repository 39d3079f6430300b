"""``mtls-milter check`` against the in-process DNS server: results, JSON schema, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.dnsserver import TestDnsServer
from support.pki import TestPki

from mtls_milter.cli.main import main
from mtls_milter.core.lookups import HostLookup
from mtls_milter.net.dns import DnsResolver

JSON_FIELDS = {"result", "reason", "domain", "evidence", "names", "matched", "header"}


@pytest.fixture
def sender_dns(dns_server: TestDnsServer) -> TestDnsServer:
    dns_server.add("sender.test", 265, "10 out.sender.test.")
    dns_server.add("multi.test", 265, "10 out2.sender.test.", "20 other.multi.test.")
    dns_server.add("null.test", 265, "0 .")
    dns_server.add("many.test", 265, *(f"10 h{i}.many.test." for i in range(11)))
    dns_server.add("optout.test", "MX", "10 mx.optout.test.")
    dns_server.servfail("broken.test")
    return dns_server


def check(
    capsys: pytest.CaptureFixture[str], pki: TestPki, dns: TestDnsServer, *args: str
) -> tuple[int, dict[str, Any]]:
    argv = [
        "check",
        *args,
        "--trust",
        str(pki.root_path),
        "--no-system-trust",
        "--dns",
        dns.nameserver,
        "--authserv-id",
        "mx.receiver.test",
        "--json",
    ]
    status = main(argv)
    out = capsys.readouterr().out
    return status, json.loads(out)


def test_acceptance_pass_as_a_subprocess(pki: TestPki, sender_dns: TestDnsServer) -> None:
    """The issue's acceptance command, run as an operator would."""
    command = [
        sys.executable, "-m", "mtls_milter", "check",
        "--mail-from", "a@sender.test",
        "--chain", str(pki.leaves["server"].chain_path),
        "--trust", str(pki.root_path), "--no-system-trust",
        "--dns", sender_dns.nameserver, "--authserv-id", "mx.receiver.test", "--json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert '"result": "pass"' in done.stdout
    report = json.loads(done.stdout)
    assert set(report) >= JSON_FIELDS
    assert report["evidence"] == "chain"
    assert report["names"] == ["out.sender.test"]
    assert report["matched"] == "out.sender.test"
    assert report["header"] == (
        "Authentication-Results: mx.receiver.test; mtls=pass "
        "(evidence=chain; matched out.sender.test in client-mx) smtp.mailfrom=sender.test"
    )


@pytest.mark.parametrize(
    ("leaf", "mail_from", "result", "reason"),
    [
        ("server", "a@sender.test", "pass", "certificate name out.sender.test matches"),
        ("san-not-cn", "a@multi.test", "pass", "certificate name out2.sender.test matches"),
        ("other-host", "a@sender.test", "fail", "no certificate name matches Client MX"),
        ("expired", "a@sender.test", "fail", "chain invalid: certificate expired"),
        ("not-yet-valid", "a@sender.test", "fail", "chain invalid: certificate not yet valid"),
        ("unknown-ca", "a@sender.test", "fail", "chain invalid: unknown issuer"),
        ("codesigning", "a@sender.test", "fail", "chain invalid: EKU lacks serverAuth/clientAuth"),
        ("eku-server-intermediate", "a@sender.test", "fail", "chain invalid: "),
        ("server", "a@null.test", "fail", "null.test publishes a null Client MX"),
        ("server", "a@optout.test", "none", "optout.test does not publish Client MX"),
        ("server", "a@nowhere.test", "none", "nowhere.test does not publish Client MX"),
        ("server", "<>", "none", "null sender"),
        ("server", "a@broken.test", "temperror", "Client MX lookup failed: SERVFAIL"),
        ("server", "a@many.test", "permerror", "Client MX unusable"),
    ],
)
def test_rows(
    capsys: pytest.CaptureFixture[str],
    pki: TestPki,
    sender_dns: TestDnsServer,
    leaf: str,
    mail_from: str,
    result: str,
    reason: str,
) -> None:
    chain = str(pki.leaves[leaf].chain_path)
    status, report = check(capsys, pki, sender_dns, "--mail-from", mail_from, "--chain", chain)
    assert status == 0
    assert (report["result"], report["reason"][: len(reason)]) == (result, reason)
    assert f"mtls={result}" in report["header"]


def test_fail_header_carries_reason_and_names(
    capsys: pytest.CaptureFixture[str], pki: TestPki, sender_dns: TestDnsServer
) -> None:
    status, report = check(
        capsys, pki, sender_dns, "--mail-from", "a@sender.test", "--mta-cn", "out.other.test"
    )
    assert status == 0
    assert report["header"] == (
        "Authentication-Results: mx.receiver.test; mtls=fail "
        'reason="no certificate name matches Client MX" '
        "(evidence=mta; names=out.other.test) smtp.mailfrom=sender.test"
    )


def test_at_moves_validation_time(
    capsys: pytest.CaptureFixture[str], pki: TestPki, sender_dns: TestDnsServer
) -> None:
    chain = str(pki.leaves["server"].chain_path)
    args = ("--mail-from", "a@sender.test", "--chain", chain)
    _, later = check(capsys, pki, sender_dns, *args, "--at", "2099-01-01T00:00:00Z")
    assert (later["result"], later["reason"][:29]) == ("fail", "chain invalid: certificate ex")


def test_readable_output(
    capsys: pytest.CaptureFixture[str], pki: TestPki, sender_dns: TestDnsServer
) -> None:
    status = main(
        [
            "check", "--mail-from", "a@sender.test", "--mta-cn", "out.sender.test",
            "--trust", str(pki.root_path), "--no-system-trust", "--dns", sender_dns.nameserver,
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    assert "result:    pass\n" in out
    assert "matched:   out.sender.test in client-mx\n" in out
    assert "published: out.sender.test\n" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--chain", "/nonexistent.pem"], "--chain /nonexistent.pem: No such file or directory"),
        (["--chain", "GARBAGE"], "--chain "),
        (["--mta-cn", "x", "--at", "yesterday"], "--at 'yesterday' is not an ISO-8601"),
        (["--mta-cn", "x", "--dns", "dns.google"], "--dns: name server 'dns.google'"),
        (["--mta-cn", "x", "--config", "/nonexistent.toml"], "/nonexistent.toml: cannot read"),
        (["--mta-cn", "x", "--chain", "y"], "not allowed with argument"),
        ([], "one of the arguments --chain --mta-cn is required"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    tmp_path: Path, pki: TestPki, args: list[str], message: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\x00\x01 not a certificate")
    args = [str(garbage) if a == "GARBAGE" else a for a in args]
    command = [sys.executable, "-m", "mtls_milter", "check", "--mail-from", "a@sender.test"]
    command += [*args, "--trust", str(pki.root_path), "--no-system-trust"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert message in lines[0]


def test_no_trust_at_all_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check", "--mail-from", "a@b.test", "--mta-cn", "x", "--no-system-trust"])
    assert status == 2
    assert "no trust anchors" in capsys.readouterr().err


@pytest.mark.parametrize("error", [RuntimeError, KeyError])
def test_internal_error_is_temperror_in_json(
    capsys: pytest.CaptureFixture[str],
    pki: TestPki,
    sender_dns: TestDnsServer,
    monkeypatch: pytest.MonkeyPatch,
    error: type[Exception],
) -> None:
    def broken(self: DnsResolver, domain: str, budget: float) -> HostLookup:
        raise error("injected")

    monkeypatch.setattr(DnsResolver, "client_mx", broken)
    chain = str(pki.leaves["server"].chain_path)
    status, report = check(
        capsys, pki, sender_dns, "--mail-from", "a@sender.test", "--chain", chain
    )
    assert status == 0
    assert set(report) >= JSON_FIELDS
    assert (report["result"], report["reason"]) == (
        "temperror",
        f"internal error: {error.__name__}",
    )
    assert report["header"] == (
        "Authentication-Results: mx.receiver.test; mtls=temperror "
        f'reason="internal error: {error.__name__}" (evidence=none) smtp.mailfrom=sender.test'
    )


def test_authserv_id_is_lower_case_a_labels(
    capsys: pytest.CaptureFixture[str], pki: TestPki, sender_dns: TestDnsServer
) -> None:
    status = main(
        [
            "check", "--mail-from", "a@sender.test", "--mta-cn", "out.sender.test",
            "--trust", str(pki.root_path), "--no-system-trust", "--dns", sender_dns.nameserver,
            "--authserv-id", "MX.Exämple.NET", "--json",
        ]
    )  # fmt: skip
    assert status == 0
    header = json.loads(capsys.readouterr().out)["header"]
    assert header.startswith("Authentication-Results: mx.xn--exmple-cua.net; mtls=pass ")
