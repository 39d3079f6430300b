"""Chain evidence end to end: real Postfix 3.7 / Sendmail 8.17, real TLS, real DNS.

The sending client connects FROM a loopback address 127.0.0.N, and a test SMTP server on that
same 127.0.0.N (port ``[chain_fetch] port``) plays the sender's own host, serving a chosen chain
over STARTTLS. The certificates are serverAuth-only, as public CAs issue them since mid-2026:

* Postfix (3.7 trusts only clientAuth client certificates) sends the milter no certificate
  macros at all; the fingerprint comes from its policy request (``check_policy_service`` to the
  daemon's ``[policy_service] socket``);
* Sendmail sends ``{verify}=FAIL`` and ``{cert_fp}`` (SHA-256, the harness sets the algorithm).

The daemon fetches the chain from 127.0.0.N, binds it by fingerprint, validates it and matches on
its SANs: ``evidence=chain``. A host that serves another certificate, hangs, refuses, talks
garbage or serves 60 certificates gives no chain evidence in bounded time, and mail still flows.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.daemon import MilterDaemon
from support.dnsserver import TestDnsServer
from support.mta import (
    MtaTls,
    PostfixHarness,
    SendmailHarness,
    require_mta,
    send_message,
)
from support.pki import TestPki, write_bundle
from support.ports import free_port
from support.smtp_tls_server import StartTlsServer

from mtls_milter.core.certs import fingerprint_sha256

pytestmark = pytest.mark.e2e

AUTHSERV_ID = "mx.receiver.test"
RCPT = "someone@receiver.test"
FETCH_TIMEOUT = 1.5
NO_CHAIN = (
    f'Authentication-Results: {AUTHSERV_ID}; mtls=fail reason="certificate not trusted by the '
    'MTA and no chain available" (evidence=none) smtp.mailfrom=sender.test'
)

Harness = PostfixHarness | SendmailHarness
_next_address = iter(range(20, 250))


def _address() -> str:
    """A fresh 127.0.0.N per test: the daemon's negative cache is per address."""
    return f"127.0.0.{next(_next_address)}"


@dataclass
class Rig:
    kind: str
    mta: Harness
    daemon: MilterDaemon
    pki: TestPki
    chain_port: int
    policy_port: int

    def send(
        self, source: str, leaf: str, mail_from: str, subject: str, source_port: int = 0
    ) -> tuple[str, float]:
        """Send from ``source`` with the client certificate ``leaf``; our header and seconds."""
        issued = self.pki.leaves[leaf]
        before = len(self.mta.sink.messages())
        message = (
            f"From: <{mail_from}>\r\nTo: <{RCPT}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{re.sub(r'[^a-z0-9]+', '.', subject.lower())}@sender.test>\r\n"
            "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"
        ).encode()
        started = time.monotonic()
        outcome = send_message(
            self.mta.port,
            mail_from=mail_from,
            rcpt=RCPT,
            message=message,
            client_chain=issued.chain_path,
            client_key=issued.key_path,
            source_address=source,
            source_port=source_port,
        )
        elapsed = time.monotonic() - started
        assert outcome.accepted, f"{outcome}\n{self.logs()}"
        raw = self.mta.delivered(count=before + 1)[before]
        first = raw.split(b"\r\n\tby ", 1)[0]
        header = re.sub(r"\r\n[ \t]", " ", raw.split(b"\r\nReceived: ", 1)[0].decode())
        assert header.startswith("Authentication-Results: "), first
        return header, elapsed

    def verdict(self) -> dict[str, Any]:
        records = self.daemon.verdicts()
        assert records, self.logs()
        return records[-1]

    def logs(self) -> str:
        return (
            f"--- {self.kind} ---\n{self.mta.log_text()[-3000:]}\n"
            f"--- mtls-milter ---\n{self.daemon.log_tail(4000)}"
        )


@pytest.fixture(scope="module")
def dns_zone() -> Iterator[TestDnsServer]:
    with TestDnsServer() as server:
        server.add("sender.test", 265, "10 out.sender.test.")
        server.add("san.test", 265, "10 out2.sender.test.")
        yield server


TRANSPORTS = ("pymilter", "asyncio")  # [milter] transport


@pytest.fixture(
    scope="module",
    params=[(m, t) for t in TRANSPORTS for m in ("postfix", "sendmail")],
    ids=[f"{m}-{t}" for t in TRANSPORTS for m in ("postfix", "sendmail")],
)
def rig(
    request: pytest.FixtureRequest,
    pki: TestPki,
    dns_zone: TestDnsServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Rig]:
    kind, transport = request.param
    require_mta(kind)
    work = tmp_path_factory.mktemp(f"chain-{kind}-{transport}")
    policy_port, chain_port = free_port(), free_port()
    config: dict[str, dict[str, Any]] = {
        "milter": {"authserv_id": AUTHSERV_ID, "transport": transport},
        "dns": {"nameservers": [dns_zone.nameserver], "timeout": 1.0, "budget": 3.0},
        "tls": {"trust": [str(pki.root_path)]},
        "policy_service": {"socket": f"inet:{policy_port}@127.0.0.1"},
        "chain_fetch": {
            "allow_private": True,  # the test hosts are on loopback
            "port": chain_port,
            "timeout": FETCH_TIMEOUT,
            "cache_ttl": 0,  # every test fetches: no test sees another's chain
        },
    }
    mx = pki.leaves["mx-server"]
    tls = MtaTls(cert_path=mx.chain_path, key_path=mx.key_path, ca_path=pki.root_path)
    with MilterDaemon(work / "milter", config) as daemon:
        mta: Harness
        if kind == "postfix":
            restrictions = (
                # as in examples/postfix/main.cf.policy
                f"check_policy_service {{ inet:127.0.0.1:{policy_port}, default_action=DUNNO }}, "
                "permit_mynetworks, reject_unauth_destination"
            )
            mta = PostfixHarness(
                work / "mta",
                milter_socket=daemon.postfix_socket,
                tls=tls,
                extra_main_cf={"smtpd_recipient_restrictions": restrictions},
            )
        else:
            mta = SendmailHarness(
                work / "mta", milter_socket=daemon.socket, tls=tls, milter_flags=""
            )
        with mta:
            yield Rig(kind, mta, daemon, pki, chain_port, policy_port)


def _host(rig: Rig, address: str, leaf: str, **kwargs: Any) -> StartTlsServer:
    issued = rig.pki.leaves[leaf]
    return StartTlsServer(
        address,
        rig.chain_port,
        chain=issued.chain_path,
        key=issued.key_path,
        hostname="out.sender.test",
        **kwargs,
    )


def test_server_auth_only_sender_passes_on_chain(rig: Rig) -> None:
    address = _address()
    with _host(rig, address, "server") as host:
        header, _ = rig.send(address, "server", "a@sender.test", f"{rig.kind} chain pass")
    assert header == (
        f"Authentication-Results: {AUTHSERV_ID}; mtls=pass "
        "(evidence=chain; matched out.sender.test in client-mx) smtp.mailfrom=sender.test"
    ), rig.logs()
    assert host.sessions and host.sessions[0].tls
    assert host.last_sni == "out.sender.test"  # SNI: the HELO name (nothing verified)
    record = rig.verdict()
    assert record["evidence"] == "chain" and record["client"] == address


def test_match_on_a_san_that_is_not_the_cn(rig: Rig) -> None:
    address = _address()
    with _host(rig, address, "san-not-cn"):
        header, _ = rig.send(address, "san-not-cn", "a@san.test", f"{rig.kind} san")
    assert header == (
        f"Authentication-Results: {AUTHSERV_ID}; mtls=pass "
        "(evidence=chain; matched out2.sender.test in client-mx) smtp.mailfrom=san.test"
    ), rig.logs()


def test_host_serving_another_certificate_gives_no_chain(rig: Rig) -> None:
    address = _address()
    with _host(rig, address, "both"):  # the client presents "server"
        header, _ = rig.send(address, "server", "a@sender.test", f"{rig.kind} other cert")
    assert header == NO_CHAIN, rig.logs()
    assert "different certificate" in rig.verdict()["chain"]
    assert "the host serves a different certificate" in rig.daemon.log_text()


class _Garbage:
    """Answers every connection on ``address:port`` with non-SMTP bytes."""

    def __init__(self, address: str, port: int) -> None:
        self.sock = socket.create_server((address, port))
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(b"\x16\x03\x01\x02\x00 this is not smtp\r\n")
                    time.sleep(0.5)
                except OSError:
                    pass

    def __enter__(self) -> _Garbage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _long_chain_host(rig: Rig, address: str, directory: Path) -> StartTlsServer:
    leaf = rig.pki.leaves["server"]
    bundle = write_bundle(directory / "long.pem", leaf, *([rig.pki.intermediate] * 59))
    return StartTlsServer(address, rig.chain_port, chain=bundle, key=leaf.key_path)


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        ("silent", "connect failed"),
        ("hangs", "timed out after 1.5 s (greeting)"),
        ("no-starttls", "STARTTLS not offered"),
        ("garbage", "not an SMTP reply"),
        ("60-certificates", "60 certificates served"),
    ],
)
def test_unhelpful_hosts_are_bounded(
    rig: Rig, behaviour: str, expected: str, tmp_path: Path
) -> None:
    address = _address()
    host: Any
    if behaviour == "silent":
        host = None
    elif behaviour == "hangs":
        host = _host(rig, address, "server", hang=True, hang_seconds=30)
    elif behaviour == "no-starttls":
        host = StartTlsServer(address, rig.chain_port, chain=None)
    elif behaviour == "garbage":
        host = _Garbage(address, rig.chain_port)
    else:
        host = _long_chain_host(rig, address, tmp_path)
    subject = f"{rig.kind} host {behaviour}"
    if host is None:
        header, elapsed = rig.send(address, "server", "a@sender.test", subject)
    else:
        with host:
            header, elapsed = rig.send(address, "server", "a@sender.test", subject)
    assert header == NO_CHAIN, rig.logs()
    assert elapsed < FETCH_TIMEOUT + 4.0, elapsed  # the fetch budget + an ordinary message
    record = rig.verdict()
    assert expected in record["chain"], record
    log = rig.daemon.log_text()
    assert f"chain fetch from {address}:{rig.chain_port}" in log and expected in log


def _policy_request(port: int, **attributes: str) -> bytes:
    """One request to the daemon's policy listener, as Postfix sends it; the reply."""
    text = "".join(f"{name}={value}\n" for name, value in attributes.items()) + "\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(text.encode())
        return conn.recv(100)


@pytest.mark.parametrize(  # the policy listener is Postfix's
    "rig",
    [("postfix", t) for t in TRANSPORTS],
    ids=[f"postfix-{t}" for t in TRANSPORTS],
    indirect=True,
)
def test_an_earlier_sessions_fingerprint_is_not_this_sessions(rig: Rig) -> None:
    """The policy listener still holds a record for the client's address and port from an
    earlier session, whose certificate has since been renewed. The new session (same address,
    same port) must be judged on its own certificate: no fetch for the old fingerprint at MAIL
    FROM, and the chain its host serves now binds to this session's fingerprint."""
    address = _address()
    with _host(rig, address, "server") as host:
        rig.send(address, "server", "a@sender.test", "postfix warm the dns cache")
        port = free_port()
        earlier = rig.pki.leaves["both"]  # the certificate before the renewal
        reply = _policy_request(
            rig.policy_port,
            request="smtpd_access_policy",
            protocol_state="RCPT",
            client_address=address,
            client_port=str(port),
            ccert_fingerprint=fingerprint_sha256(earlier.cert),
        )
        assert reply == b"action=DUNNO\n\n"
        fetches, log_before = len(host.sessions), len(rig.daemon.log_text())
        header, _ = rig.send(address, "server", "a@sender.test", "postfix renewed", port)
    assert header == (
        f"Authentication-Results: {AUTHSERV_ID}; mtls=pass "
        "(evidence=chain; matched out.sender.test in client-mx) smtp.mailfrom=sender.test"
    ), rig.logs()
    assert len(host.sessions) == fetches + 1  # one fetch, for this session's certificate
    record = rig.verdict()
    assert record["chain"].startswith("chain fetched from"), record
    assert "different certificate" not in rig.daemon.log_text()[log_before:]
