"""``mtls-milter probe`` against loopback SMTP servers with STARTTLS and the in-process DNS."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support import ports
from support.dnsserver import TestDnsServer
from support.pki import SERVER_AUTH, Issued, TestPki
from support.smtp_tls_server import StartTlsServer

from mtls_milter.cli.main import main
from mtls_milter.core.chain import ChainValidator
from mtls_milter.net.dns import DnsResolver
from mtls_milter.net.trust import load_trust_anchors
from mtls_milter.outbound.probe import probe_domain

HOST_KEYS = {
    "host",
    "address",
    "port",
    "connected",
    "starttls",
    "tls_version",
    "chain_valid",
    "error",
    "names",
    "name_matches",
    "verified",
    "seconds",
}
TOP_KEYS = {
    "schema",
    "domain",
    "checked",
    "opted_in",
    "client_mx",
    "mx",
    "policy",
    "hosts",
    "dns_errors",
    "verdict",
    "exit_status",
}


@dataclass
class Certs:
    good: Issued
    wrong_name: Issued
    untrusted: Issued


@pytest.fixture(scope="module")
def certs(pki: TestPki) -> Certs:
    return Certs(
        good=pki.leaves["mx-server"],
        wrong_name=pki.leaves["other-host"],
        untrusted=pki.issue(
            "probe-untrusted",
            cn="mx.receiver.test",
            sans=["mx.receiver.test"],
            eku=[SERVER_AUTH],
            issuer=pki.other_root,
        ),
    )


@pytest.fixture
def free_port() -> int:
    """A port free on all the loopback addresses the servers use (they all share it)."""
    return ports.free_port()


@pytest.fixture
def servers(free_port: int, certs: Certs) -> Iterator[int]:
    def start(host: str, issued: Issued | None = None, **kw: Any) -> StartTlsServer:
        return StartTlsServer(
            host,
            free_port,
            chain=issued.chain_path if issued else None,
            key=issued.key_path if issued else None,
            **kw,
        ).start()

    running = [
        start("127.0.0.2", certs.good),
        start("127.0.0.3", certs.wrong_name),
        start("127.0.0.4", certs.untrusted),
        start("127.0.0.5", None),  # no STARTTLS
        start("127.0.0.6", certs.good, hang=True),
        start("::1", certs.good),
    ]
    yield free_port
    for server in running:
        server.stop()


def run_probe(
    dns: TestDnsServer, pki: TestPki, domain: str, port: int, *extra: str
) -> tuple[int, dict[str, Any], float]:
    """The real command in a subprocess: (exit status, JSON, seconds)."""
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtls_milter",
            "probe",
            domain,
            "--json",
            "--port",
            str(port),
            "--dns",
            dns.nameserver,
            "--trust",
            str(pki.root_path),
            "--no-system-trust",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stderr == ""
    data = json.loads(proc.stdout)
    return proc.returncode, data, time.monotonic() - start


def add_domain(dns: TestDnsServer, domain: str, host: str, *addresses: str) -> None:
    dns.add(domain, 265, "10 out.sender.test.")
    dns.add(domain, "MX", f"10 {host}.")
    for address in addresses:
        dns.add(host, "AAAA" if ":" in address else "A", address)


def assert_schema(data: dict[str, Any]) -> None:
    assert set(data) == TOP_KEYS
    assert data["schema"] == 1
    assert set(data["client_mx"]) == {"status", "hosts", "null", "detail"}
    assert set(data["mx"]) == {"status", "hosts", "null", "detail"}
    for host in data["hosts"]:
        assert set(host) == HOST_KEYS


def test_matching_certificate_verified_ipv4_and_ipv6(
    dns_server: TestDnsServer, pki: TestPki, servers: int
) -> None:
    add_domain(dns_server, "receiver.test", "mx.receiver.test", "127.0.0.2", "::1")
    status, data, _ = run_probe(dns_server, pki, "receiver.test", servers)
    assert_schema(data)
    assert status == 0, data
    assert data["opted_in"] is True
    assert data["verdict"] == "verified"
    assert data["policy"] == "OK secure match=mx.receiver.test servername=hostname"
    assert [h["address"] for h in data["hosts"]] == ["127.0.0.2", "::1"]
    for host in data["hosts"]:
        assert host["connected"] and host["starttls"] and host["chain_valid"]
        assert host["name_matches"] and host["verified"] and host["error"] == ""
        assert host["tls_version"].startswith("TLSv1.")
        assert host["names"] == ["mx.receiver.test"]


def test_sni_is_the_mx_name(
    free_port: int, certs: Certs, pki: TestPki, dns_server: TestDnsServer
) -> None:
    add_domain(dns_server, "receiver.test", "mx.receiver.test", "127.0.0.7")
    with StartTlsServer(
        "127.0.0.7", free_port, chain=certs.good.chain_path, key=certs.good.key_path
    ) as server:
        report = probe_domain(
            "receiver.test",
            DnsResolver([dns_server.nameserver], timeout=0.5),
            ChainValidator(load_trust_anchors([str(pki.root_path)])),
            port=free_port,
            timeout=5,
        )
        assert report.exit_status == 0, report.as_dict()
        assert server.sessions[0].sni == "mx.receiver.test"
        assert server.sessions[0].tls


@pytest.mark.parametrize(
    ("address", "expect"),
    [
        ("127.0.0.3", {"chain_valid": True, "name_matches": False, "error": "name mismatch"}),
        ("127.0.0.4", {"chain_valid": False, "name_matches": True, "error": "chain invalid"}),
        ("127.0.0.5", {"starttls": False, "connected": True, "error": "STARTTLS not offered"}),
    ],
)
def test_failures(
    dns_server: TestDnsServer,
    pki: TestPki,
    servers: int,
    address: str,
    expect: dict[str, Any],
) -> None:
    add_domain(dns_server, "receiver.test", "mx.receiver.test", address)
    status, data, _ = run_probe(dns_server, pki, "receiver.test", servers)
    assert_schema(data)
    assert status == 1
    assert data["verdict"] == "failed"
    (host,) = data["hosts"]
    assert host["verified"] is False
    for key, value in expect.items():
        if key == "error":
            assert value in host["error"], host
        else:
            assert host[key] == value, (key, host)


def test_hang_is_bounded(dns_server: TestDnsServer, pki: TestPki, servers: int) -> None:
    add_domain(dns_server, "receiver.test", "mx.receiver.test", "127.0.0.6", "127.0.0.2")
    status, data, seconds = run_probe(dns_server, pki, "receiver.test", servers, "--timeout", "1")
    assert status == 1
    by_address = {h["address"]: h for h in data["hosts"]}
    hung, good = by_address["127.0.0.6"], by_address["127.0.0.2"]
    assert hung["connected"] and "timed out after 1 s (greeting)" in hung["error"]
    assert good["verified"]
    assert seconds < 5  # one timeout (addresses are probed in parallel) plus start-up


def test_refused_connection(dns_server: TestDnsServer, pki: TestPki, servers: int) -> None:
    add_domain(dns_server, "receiver.test", "mx.receiver.test", "127.0.0.9")
    status, data, _ = run_probe(dns_server, pki, "receiver.test", servers)
    assert status == 1
    assert data["hosts"][0]["connected"] is False
    assert "connect failed" in data["hosts"][0]["error"]


def test_not_opted_in(dns_server: TestDnsServer, pki: TestPki, servers: int) -> None:
    dns_server.add("plain.test", "MX", "10 mx.receiver.test.")
    dns_server.add("mx.receiver.test", "A", "127.0.0.2")
    status, data, _ = run_probe(dns_server, pki, "plain.test", servers)
    assert status == 0
    assert data["opted_in"] is False
    assert data["policy"] == "NOTFOUND "


def test_dns_failure_exits_3(dns_server: TestDnsServer, pki: TestPki, servers: int) -> None:
    dns_server.servfail("receiver.test")
    status, data, _ = run_probe(dns_server, pki, "receiver.test", servers)
    assert_schema(data)
    assert status == 3
    assert data["opted_in"] is None
    assert data["verdict"] == "dns-error"
    assert data["policy"].startswith("TEMP ")


def test_null_mx_exits_1(dns_server: TestDnsServer, pki: TestPki, servers: int) -> None:
    dns_server.add("receiver.test", 265, "10 out.sender.test.")
    dns_server.add("receiver.test", "MX", "0 .")
    status, data, _ = run_probe(dns_server, pki, "receiver.test", servers)
    assert status == 1
    assert data["verdict"] == "no-mx" and data["mx"]["null"] is True


def test_table_output(
    dns_server: TestDnsServer,
    pki: TestPki,
    servers: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    add_domain(dns_server, "receiver.test", "mx.receiver.test", "127.0.0.2", "127.0.0.3")
    args = ["probe", "receiver.test", "--port", str(servers), "--dns", dns_server.nameserver]
    args += ["--trust", str(pki.root_path), "--no-system-trust"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "opted in:   yes (Client MX: out.sender.test)" in out
    assert "127.0.0.2" in out and "verified" in out
    assert "FAILED: name mismatch" in out
    assert "verdict:    failed (exit 1)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bad..domain"], "DOMAIN"),
        (["receiver.test", "--dns", "not-an-ip"], "--dns"),
        (["receiver.test", "--port", "0"], "--port"),
        (["receiver.test", "--timeout", "0"], "--timeout"),
        (["receiver.test", "--no-system-trust"], "no trust anchors"),
        (["receiver.test", "--trust", "/nonexistent.pem"], "trust anchors"),
    ],
)
def test_usage_errors_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["probe", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtls-milter: error: ") and message in err
    assert err.count("\n") == 1


def test_sender_checks_the_client_mx_hosts(
    dns_server: TestDnsServer, pki: TestPki, free_port: int
) -> None:
    """--sender D: each Client MX host must serve a valid certificate naming it."""
    dns_server.add("sending.test", 265, "10 out.sender.test.", "20 bad.sending.test.")
    dns_server.add("sending.test", "MX", "10 mx.elsewhere.test.")
    dns_server.add("out.sender.test", "A", "127.0.0.7")
    dns_server.add("bad.sending.test", "A", "127.0.0.8")
    good, wrong = pki.leaves["server"], pki.leaves["mx-server"]
    command = [sys.executable, "-m", "mtls_milter", "probe", "--sender", "sending.test"]
    trust = ["--no-system-trust", "--trust", str(pki.root_path)]
    with (
        StartTlsServer("127.0.0.7", free_port, chain=good.chain_path, key=good.key_path),
        StartTlsServer("127.0.0.8", free_port, chain=wrong.chain_path, key=wrong.key_path),
    ):
        proc = subprocess.run(
            [*command, "--port", str(free_port), "--dns", dns_server.nameserver, *trust],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == "opted in:   yes (Client MX: out.sender.test, bad.sending.test)"
    rows = {line.split()[0]: line for line in lines if line.startswith(("out.", "bad."))}
    assert rows["out.sender.test"].endswith("valid  match     verified")
    assert (
        rows["bad.sending.test"]
        .split("  ")[-1]
        .startswith(
            "FAILED: name mismatch: certificate names mx.receiver.test, not bad.sending.test"
        )
    )
    assert lines[-1] == "verdict:    failed (exit 1)"


def test_sender_without_client_mx(
    dns_server: TestDnsServer, pki: TestPki, capsys: pytest.CaptureFixture[str]
) -> None:
    dns_server.add("quiet.test", "A", "192.0.2.1")
    argv = ["probe", "--sender", "quiet.test", "--json", "--dns", dns_server.nameserver]
    status = main([*argv, "--no-system-trust", "--trust", str(pki.root_path)])
    data = json.loads(capsys.readouterr().out)
    assert (status, data["verdict"], data["checked"], data["hosts"]) == (
        1,
        "no-client-mx",
        "client-mx",
        [],
    )


@pytest.mark.parametrize("argv", [["probe"], ["probe", "a.test", "--sender", "b.test"]])
def test_domain_or_sender(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err == "mtls-milter: error: give either DOMAIN or --sender D\n"
