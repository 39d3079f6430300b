"""``[milter] workers = 2`` end to end: real Postfix 3.7, real TLS, real DNS, the real daemon.

The daemon's parent forks two workers that serve the milter socket; the parent runs the Postfix
policy service. Postfix uses ``default_action = accept``: when a worker dies mid-conversation the
message is still delivered (without our field). The tests kill a worker while mail flows (every
message arrives, the parent logs and restarts the worker, later messages pass), reload the
parent (every worker reloads; every later message shows the new configuration) and check that
chain evidence works when the policy request is served by the parent and the milter
conversation by a worker.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
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
from support.mta import MtaTls, PostfixHarness, require_mta, send_message
from support.pki import TestPki
from support.ports import free_port
from support.smtp_tls_server import StartTlsServer

pytestmark = pytest.mark.e2e

AUTHSERV_ID = "mx.receiver.test"
RCPT = "someone@receiver.test"
PASS = "mtls=pass (evidence=mta; matched out.sender.test in client-mx) smtp.mailfrom=sender.test"


@dataclass
class Rig:
    mta: PostfixHarness
    daemon: MilterDaemon
    pki: TestPki
    config: dict[str, dict[str, Any]]
    chain_port: int

    def send(self, subject: str, leaf: str = "client", source: str | None = None) -> bool:
        """Send one message over its own SMTP session; True when Postfix accepted it."""
        issued = self.pki.leaves[leaf]
        message = (
            f"From: <a@sender.test>\r\nTo: <{RCPT}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{re.sub(r'[^a-z0-9]+', '.', subject.lower())}@sender.test>\r\n"
            "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"
        ).encode()
        outcome = send_message(
            self.mta.port,
            mail_from="a@sender.test",
            rcpt=RCPT,
            message=message,
            client_chain=issued.chain_path,
            client_key=issued.key_path,
            source_address=source,
        )
        return bool(outcome.accepted)

    def header(self, subject: str) -> str:
        """Our Authentication-Results field of the delivered message ``subject`` ("" if none)."""
        for raw in self.mta.sink.messages():
            if f"\r\nSubject: {subject}\r\n".encode() in raw:
                text = re.sub(r"\r\n[ \t]", " ", raw.decode(errors="replace"))
                found = re.search(r"^Authentication-Results: ([^\r\n]*mtls=[^\r\n]*)", text, re.M)
                return found.group(1) if found else ""
        raise AssertionError(f"{subject!r} not delivered\n{self.logs()}")

    def workers(self) -> list[int]:
        """The pids of the daemon's children (its workers), from /proc."""
        parent = self.daemon.pid
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    children.append(int(entry))
        return sorted(children)

    def logs(self) -> str:
        return (
            f"--- postfix ---\n{self.mta.log_text()[-3000:]}\n"
            f"--- mtls-milter ---\n{self.daemon.log_tail(5000)}"
        )


@pytest.fixture(scope="module")
def rig(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_mta("postfix")
    work = tmp_path_factory.mktemp("workers")
    policy_port, chain_port = free_port(), free_port()
    with TestDnsServer() as dns:
        dns.add("sender.test", 265, "10 out.sender.test.")
        config: dict[str, dict[str, Any]] = {
            "milter": {"authserv_id": AUTHSERV_ID, "transport": "asyncio", "workers": 2},
            "dns": {"nameservers": [dns.nameserver], "timeout": 1.0, "budget": 3.0},
            "tls": {"trust": [str(pki.root_path)]},
            "policy_service": {"socket": f"inet:{policy_port}@127.0.0.1"},
            "chain_fetch": {"allow_private": True, "port": chain_port, "timeout": 1.5},
        }
        mx = pki.leaves["mx-server"]
        tls = MtaTls(cert_path=mx.chain_path, key_path=mx.key_path, ca_path=pki.root_path)
        with MilterDaemon(work / "milter", config) as daemon:
            restrictions = (
                f"check_policy_service {{ inet:127.0.0.1:{policy_port}, default_action=DUNNO }}, "
                "permit_mynetworks, reject_unauth_destination"
            )
            mta = PostfixHarness(
                work / "mta",
                milter_socket=daemon.postfix_socket,
                tls=tls,
                extra_main_cf={"smtpd_recipient_restrictions": restrictions},
                milter_default_action="accept",
            )
            with mta:
                yield Rig(mta, daemon, pki, config, chain_port)


def test_the_parent_starts_two_workers_and_says_so(rig: Rig) -> None:
    workers = rig.workers()
    assert len(workers) == 2, rig.logs()
    started = [line for line in rig.daemon.log_text().splitlines() if "started: " in line][-1]
    assert " workers=2 " in started and "version=" in started, started
    assert f"pids={','.join(map(str, workers))} " in started, started
    for pid in workers:
        assert f"(pid {pid}): serving, rss=" in rig.daemon.log_text()


def test_a_killed_worker_is_restarted_and_mail_keeps_flowing(rig: Rig) -> None:
    start = len(rig.mta.sink.messages())
    before = [f"kill before {i}" for i in range(3)]
    for subject in before:
        assert rig.send(subject), rig.logs()
    workers = rig.workers()
    victim = workers[0]
    during: list[str] = []
    done = threading.Event()

    def keep_sending() -> None:
        while not done.is_set():
            subject = f"kill during {len(during)}"
            assert rig.send(subject)
            during.append(subject)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while len(rig.workers()) < 2 or victim in rig.workers():
            assert time.monotonic() < deadline, rig.logs()
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        done.set()
        sender.join(60)
    assert during, "no message was sent while the worker was killed"
    log = rig.daemon.log_text()
    assert re.search(
        rf"WARNING mtls_milter: worker \d \(pid {victim}\) killed by signal SIGKILL after "
        r"[0-9.]+ s; restarting it in [0-9.]+ s",
        log,
    ), rig.logs()
    (replacement,) = set(rig.workers()) - set(workers)
    deadline = time.monotonic() + 10  # forked is not yet serving: its line may come later
    while f"(pid {replacement}): serving, rss=" not in rig.daemon.log_text():
        assert time.monotonic() < deadline, rig.logs()
        time.sleep(0.05)
    after = [f"kill after {i}" for i in range(6)]  # over separate connections: both workers
    for subject in after:
        assert rig.send(subject), rig.logs()
    every = (*before, *during, *after)
    rig.mta.delivered(count=start + len(every))  # waits until all arrived
    assert len(rig.mta.sink.messages()) == start + len(every), rig.logs()
    headers = {subject: rig.header(subject) for subject in every}  # each one is there
    for subject in (*before, *after):
        assert headers[subject] == f"{AUTHSERV_ID}; {PASS}", rig.logs()


def test_a_reload_reaches_every_worker(rig: Rig) -> None:
    workers = rig.workers()
    new_id = "mx2.receiver.test"
    config = {name: dict(keys) for name, keys in rig.config.items()}
    config["milter"]["authserv_id"] = new_id
    start = len(rig.daemon.log_text())
    try:
        assert rig.daemon.reload(config), rig.logs()
        log = rig.daemon.log_text()[start:]
        # The parent's line comes once both workers confirmed, with each worker's memory.
        reloaded = [line for line in log.splitlines() if "reloaded: " in line]
        assert len(reloaded) == 1, log
        assert "reloaded: changed=milter.authserv_id " in reloaded[0], reloaded
        for pid in workers:
            assert f":pid={pid}:rss=" in reloaded[0], reloaded
            assert re.search(
                rf"worker \d \(pid {pid}\): rss=[0-9.]+MiB reload done: "
                r"changed=milter.authserv_id ",
                log,
            ), log
        subjects = [f"reload {i}" for i in range(8)]  # separate connections: both workers
        delivered = len(rig.mta.sink.messages())
        for subject in subjects:
            assert rig.send(subject), rig.logs()
        rig.mta.delivered(count=delivered + len(subjects))
        for subject in subjects:
            assert rig.header(subject) == f"{new_id}; {PASS}", rig.logs()
    finally:
        assert rig.daemon.reload(rig.config), rig.logs()


def test_chain_evidence_with_the_policy_request_in_the_parent(rig: Rig) -> None:
    """A serverAuth-only certificate: Postfix 3.7 does not trust it and gives the milter no
    certificate; the fingerprint comes from the policy request, which the parent records; the
    worker holding the milter conversation asks the parent, fetches the chain from the sender's
    host and passes on it."""
    address = "127.0.0.61"
    issued = rig.pki.leaves["server"]
    host = StartTlsServer(
        address,
        rig.chain_port,
        chain=issued.chain_path,
        key=issued.key_path,
        hostname="out.sender.test",
    )
    subject = "workers chain pass"
    delivered = len(rig.mta.sink.messages())
    with host:
        assert rig.send(subject, leaf="server", source=address), rig.logs()
    rig.mta.delivered(count=delivered + 1)
    assert rig.header(subject) == (
        f"{AUTHSERV_ID}; mtls=pass (evidence=chain; matched out.sender.test in client-mx) "
        "smtp.mailfrom=sender.test"
    ), rig.logs()
    assert host.sessions and host.sessions[0].tls
    assert rig.daemon.verdicts()[-1]["evidence"] == "chain"


def _sockets_on_port(port: int) -> set[str]:
    """The inodes of the IPv4 TCP sockets (listening or connected) with this local port."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] != "0":
            found.add(fields[9])
    return found


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets a process holds, from /proc/PID/fd."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                found.add(target[len("socket:[") : -1])
    return found


def test_workers_hold_none_of_the_policy_services_sockets(rig: Rig) -> None:
    """The policy listener and Postfix's policy connections are the parent's alone: a worker
    holding one would keep a connection the parent closes open for Postfix. A worker forked
    while a policy connection is open (a restart) holds none either."""
    assert rig.send("policy sockets 1"), rig.logs()  # Postfix keeps its policy connection
    victim = rig.workers()[0]
    serving = rig.daemon.log_text().count("): serving, rss=")
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while rig.daemon.log_text().count("): serving, rss=") == serving:  # the new worker is up
        assert time.monotonic() < deadline, rig.logs()
        time.sleep(0.05)
    policy_port = int(rig.config["policy_service"]["socket"].split(":")[1].split("@")[0])
    parent = rig.daemon.pid
    assert parent is not None
    policy = _sockets_on_port(policy_port) & _socket_inodes(parent)
    assert len(policy) >= 2, policy  # the listener and at least one connection from Postfix
    for pid in rig.workers():
        assert not policy & _socket_inodes(pid), (pid, policy)
    assert rig.send("policy sockets 2"), rig.logs()


def test_sigterm_stops_every_worker_then_the_parent(rig: Rig) -> None:
    workers = rig.workers()
    start = len(rig.daemon.log_text())
    assert rig.daemon.stop() == 0
    log = rig.daemon.log_text()[start:]
    assert "INFO mtls_milter: stopping on SIGTERM: 2 workers" in log, log
    for pid in workers:
        assert re.search(rf"worker \d \(pid {pid}\) exited with status 0", log), log
    assert log.rstrip().endswith("INFO mtls_milter: stopped"), log
    assert "Traceback" not in rig.daemon.log_text() and "ERROR" not in log, log


def test_systemd_hears_the_parent_only(
    pki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One READY=1 when both workers serve, RELOADING=1/READY=1 around a reload, STOPPING=1 on
    a stop: all from the parent (the workers' own notifications would double them)."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        notify.settimeout(0.2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        config: dict[str, dict[str, Any]] = {
            "milter": {"authserv_id": AUTHSERV_ID, "transport": "asyncio", "workers": 2},
            "tls": {"trust": [str(pki.root_path)]},
        }
        daemon = MilterDaemon(tmp_path / "milter", config)
        daemon.start()
        try:
            assert daemon.signal_reload(signum=signal.SIGUSR1), daemon.log_tail()
        finally:
            assert daemon.stop() == 0
        states = []
        with contextlib.suppress(TimeoutError):
            while True:
                states.append(notify.recv(100).decode())
    assert states == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], daemon.log_tail()
