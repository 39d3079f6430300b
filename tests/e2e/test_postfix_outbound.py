"""End to end: a real SENDING Postfix consults ``mtls-milter policy-map`` (a real subprocess)
through ``smtp_tls_policy_maps = socketmap:…``, resolves real DNS answers (served on port 53 of
a loopback address, see :mod:`support.postfix_sender`) and delivers to loopback
STARTTLS servers - or refuses to.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.pki import SERVER_AUTH, TestPki
from support.policy_map import socketmap_query
from support.ports import free_port
from support.postfix_sender import (
    LoopbackDnsServer,
    PostfixSender,
    missing_sender_support,
    unused_loopback,
)
from support.smtp_tls_server import StartTlsServer

_REASON = missing_sender_support()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        _REASON is not None,
        reason=f"SENDING-POSTFIX E2E NOT RUN: {_REASON} (run tests/e2e/install_mtas.sh as root)",
    ),
]

CLIENT_MX = "10 out.remote.test."


@dataclass
class World:
    dns: LoopbackDnsServer
    sender: PostfixSender
    servers: dict[str, StartTlsServer]  # domain -> its MX server
    policy_log: Path


@pytest.fixture(scope="module")
def world(pki: TestPki) -> Iterator[World]:
    # Postfix's daemons run as user postfix: pytest's 0700 temp tree is not reachable for them.
    workdir = Path(tempfile.mkdtemp(prefix="mtls-outbound-"))
    workdir.chmod(0o755)
    dns = LoopbackDnsServer(unused_loopback()).start()
    smtp_port = free_port()
    good = pki.issue("mx-good", cn="mx.good.test", sans=["mx.good.test"], eku=[SERVER_AUTH])
    plain = pki.issue("mx-plain", cn="mx.plain.test", sans=["mx.plain.test"], eku=[SERVER_AUTH])
    wrong = pki.leaves["other-host"]  # names out.other.test only
    layout = {
        # domain: (MX address, certificate, publishes Client MX)
        "good.test": ("127.0.0.2", good, True),
        "wrong.test": ("127.0.0.3", wrong, True),
        "plain.test": ("127.0.0.4", plain, False),
        "plainwrong.test": ("127.0.0.5", wrong, False),
        "broken.test": ("127.0.0.6", good, True),
    }
    servers: dict[str, StartTlsServer] = {}
    for domain, (address, issued, opted_in) in layout.items():
        if opted_in:
            dns.add(domain, 265, CLIENT_MX, ttl=5)
        dns.add(domain, "MX", f"10 mx.{domain}.", ttl=5)
        dns.add(f"mx.{domain}", "A", address, ttl=5)
        servers[domain] = StartTlsServer(
            address,
            smtp_port,
            chain=issued.chain_path,
            key=issued.key_path,
            hostname=f"mx.{domain}",
        ).start()
    dns.servfail_type("broken.test", 265)  # only the Client MX lookup fails
    dns.add("nullmx.test", 265, CLIENT_MX)
    dns.add("nullmx.test", "MX", "0 .")

    policy_port = free_port()
    config = workdir / "mtls-milter.toml"
    config.write_text(
        f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 1.0\n'
        f'[policy_map]\nsocket = "inet:{policy_port}@127.0.0.1"\n'
    )
    policy_log = workdir / "policy-map.log"
    with policy_log.open("w") as log:
        service = subprocess.Popen(
            [sys.executable, "-m", "mtls_milter", "policy-map", "--config", str(config)],
            stderr=log,
        )
    sender = PostfixSender(
        workdir / "postfix",
        policy_map=f"socketmap:inet:127.0.0.1:{policy_port}:mtls",
        ca_path=pki.root_path,
        dns_address=dns.address[0],
        smtp_port=smtp_port,
    )
    try:
        _wait_for_service(policy_port)
        sender.start()
        yield World(dns, sender, servers, policy_log)
    finally:
        sender.stop()
        service.terminate()
        service.wait(10)
        for server in servers.values():
            server.stop()
        dns.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_service(port: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socketmap_query(("127.0.0.1", port), [b"mtls probe.invalid"], 1)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _clear_text_mail(server: StartTlsServer) -> list[str]:
    """Commands of sessions that never reached TLS but sent MAIL/DATA."""
    return [
        ",".join(s.commands)
        for s in server.sessions
        if not s.tls and ("MAIL" in s.commands or "DATA" in s.commands)
    ]


def test_client_mx_domain_delivered_over_verified_tls(world: World) -> None:
    world.sender.send("bob@good.test")
    status = world.sender.wait_status("bob@good.test")
    assert "status=sent" in status, world.sender.log_text()
    assert world.sender.lines_for("Verified TLS connection established to mx.good.test[127.0.0.2]")
    (message,) = world.servers["good.test"].wait_messages(1)
    assert message.tls and message.rcpts == ["<bob@good.test>"]
    assert world.servers["good.test"].sessions[-1].sni == "mx.good.test"
    assert "good.test: 'OK secure match=mx.good.test servername=hostname'" in (
        world.policy_log.read_text()
    )


def test_wrong_name_certificate_deferred_never_in_clear(world: World) -> None:
    world.sender.send("bob@wrong.test")
    status = world.sender.wait_status("bob@wrong.test")
    assert "status=deferred" in status, world.sender.log_text()
    assert "Server certificate not verified" in status
    assert world.sender.lines_for(
        "server certificate verification failed for mx.wrong.test[127.0.0.3]"
    )
    server = world.servers["wrong.test"]
    assert server.messages == []
    assert _clear_text_mail(server) == []
    assert server.sessions, "Postfix never tried the MX"


def test_domain_without_client_mx_delivered_as_before(world: World) -> None:
    world.sender.send("bob@plain.test")
    assert "status=sent" in world.sender.wait_status("bob@plain.test")
    assert world.sender.lines_for("Trusted TLS connection established to mx.plain.test")
    # Opportunistic TLS as before: even a certificate for another name does not stop delivery.
    world.sender.send("bob@plainwrong.test")
    assert "status=sent" in world.sender.wait_status("bob@plainwrong.test")
    assert world.sender.lines_for("Trusted TLS connection established to mx.plainwrong.test")
    assert world.servers["plainwrong.test"].wait_messages(1)[0].tls


def test_client_mx_servfail_deferred(world: World) -> None:
    world.sender.send("bob@broken.test")
    status = world.sender.wait_status("bob@broken.test")
    assert "status=deferred" in status, world.sender.log_text()
    assert world.sender.lines_for("TLS policy lookup for broken.test")
    server = world.servers["broken.test"]
    assert server.sessions == [] and server.messages == []
    assert "TEMP Client MX lookup for broken.test failed: SERVFAIL" in (
        world.policy_log.read_text()
    )


def test_null_mx_bounced_at_once(world: World) -> None:
    world.sender.send("bob@nullmx.test")
    status = world.sender.wait_status("bob@nullmx.test")
    assert "status=bounced" in status, world.sender.log_text()
    assert "nullMX" in status
