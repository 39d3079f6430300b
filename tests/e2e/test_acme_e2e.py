"""End to end: ``mtls-milter acme respond`` as subprocesses on 127.0.0.2-4 (one port), the
in-process DNS server, and ``mtls-milter acme validate`` as a subprocess, as a CA would run it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_acme import Account
from support.dnsserver import TestDnsServer
from support.ports import free_port

pytestmark = pytest.mark.e2e

HOSTS = {
    "mx1.sender.test": "127.0.0.2",
    "mx2.sender.test": "127.0.0.3",
    "mx3.other.test": "127.0.0.4",
}


class Responders:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, address: str) -> Path:
        directory = self.root / address
        directory.mkdir()
        command = [
            sys.executable, "-m", "mtls_milter", "acme", "respond",
            "--dir", str(directory), "--listen", f"{address}:{self.port}",
        ]  # fmt: skip
        self.procs[address] = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection((address, self.port), timeout=0.5).close()
                return directory
            except OSError:
                if self.procs[address].poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"responder on {address} did not start")

    def stop(self) -> dict[str, tuple[int, str]]:
        results: dict[str, tuple[int, str]] = {}
        for address, proc in self.procs.items():
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            results[address] = (proc.returncode, err)
        self.procs.clear()
        return results


@pytest.fixture
def responders(tmp_path: Path) -> Iterator[Responders]:
    group = Responders(tmp_path, free_port(tuple(HOSTS.values())))
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
def zone(dns_server: TestDnsServer) -> TestDnsServer:
    dns_server.add("sender.test", 265, *(f"{10 * i} {h}." for i, h in enumerate(HOSTS, 1)))
    dns_server.add("sender.test", "MX", "10 mx1.sender.test.")
    for host, address in HOSTS.items():
        dns_server.add(host, "A", address)
    dns_server.add("implicit.test", "A", "127.0.0.2")
    dns_server.add("null.test", 265, "0 .")
    dns_server.servfail("broken.test")
    return dns_server


def validate(
    zone: TestDnsServer, port: int, kind: str, domain: str, token: str, key: list[str]
) -> tuple[int, dict[str, Any], str]:
    command = [
        sys.executable, "-m", "mtls_milter", "acme", "validate", "--type", kind,
        "--domain", domain, f"--token={token}", *key, "--dns", zone.nameserver,
        "--port", str(port), "--timeout", "2", "--deadline", "10", "--json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, json.loads(done.stdout) if done.stdout else {}, done.stderr


def test_acme_over_client_mx_end_to_end(
    responders: Responders,
    zone: TestDnsServer,
    acme_account: Account,
    acme_token: str,
    tmp_path: Path,
) -> None:
    keyauth = acme_account.key_authorization(acme_token)
    dirs = {address: responders.start(address) for address in HOSTS.values()}
    for directory in dirs.values():
        (directory / acme_token).write_text(keyauth + "\n")
    jwk = tmp_path / "account.json"
    jwk.write_text(json.dumps(acme_account.key.to_json()))
    key = ["--account-jwk", str(jwk)]
    port = responders.port

    status, data, err = validate(zone, port, "client-mx-http-01", "sender.test", acme_token, key)
    assert status == 0, (data, err)
    assert data["status"] == "valid" and len(data["hosts"]) == 3

    status, data, _ = validate(zone, port, "server-mx-http-01", "sender.test", acme_token, key)
    assert status == 0 and [h["host"] for h in data["hosts"]] == ["mx1.sender.test"]
    status, data, _ = validate(zone, port, "server-mx-http-01", "implicit.test", acme_token, key)
    assert status == 0 and data["implicit_mx"] is True

    (dirs["127.0.0.3"] / acme_token).unlink()
    status, data, _ = validate(zone, port, "client-mx-http-01", "sender.test", acme_token, key)
    assert status == 1
    assert data["reason"].startswith("mx2.sender.test: 127.0.0.3: HTTP 404")

    status, data, _ = validate(zone, port, "client-mx-http-01", "null.test", acme_token, key)
    assert status == 1 and data["reason"].startswith("no hosts")
    status, data, _ = validate(zone, port, "client-mx-http-01", "broken.test", acme_token, key)
    assert status == 3 and data["reason"].startswith("DNS: Client MX lookup failed: SERVFAIL")

    # Path traversal against the real responder process.
    (tmp_path / "secret").write_text("secret\n")
    for target in (
        "/.well-known/acme-challenge/../../secret",
        "/.well-known/acme-challenge/..%2F..%2Fsecret",
        "/.well-known/acme-challenge/%2e%2e%2f%2e%2e%2fsecret",
    ):
        with socket.create_connection(("127.0.0.2", port), timeout=5) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: mx1.sender.test\r\n\r\n".encode())
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 404 ") and b"secret" not in reply

    results = responders.stop()
    for address, (code, err) in results.items():
        assert code == 0, err
        assert f"listening on {address}:{port}" in err
        assert f"GET /.well-known/acme-challenge/{acme_token} 200" in err or address == "127.0.0.3"
    assert " 404 " in results["127.0.0.2"][1]
