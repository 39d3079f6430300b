"""Pre-forked workers without an MTA: restart backoff, ``[milter] workers``, the policy lookup
channel (a failure is "unavailable", never "no record"), the supervisor's life cycle in a
subprocess, and the refusal of workers on the pymilter transport. With real Postfix:
tests/e2e/test_workers.py."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.dnsserver import TestDnsServer
from support.pki import TestPki

from mtls_milter import __version__
from mtls_milter.config import Config, ConfigError, config_from_mapping
from mtls_milter.engine import Engine
from mtls_milter.inbound.daemon_common import (
    config_changes,
    config_summary,
    warn_restart_only,
)
from mtls_milter.inbound.policy_service import PolicyFacts, PolicyTableUnavailable, SessionTable
from mtls_milter.inbound.session import EngineHolder, MilterSession
from mtls_milter.inbound.shared_sessions import RemoteSessionTable, answer_lookup, decode_facts
from mtls_milter.runtime.prefork import RestartBackoff, describe_status
from mtls_milter.runtime.worker_link import ID, MAX_MESSAGE, WorkerLink

FACTS = PolicyFacts(fingerprint="AB:" * 31 + "AB", protocol="TLSv1.3", helo="out.sender.test")


# -- restart backoff ----------------------------------------------------------------------------


def test_a_worker_dying_young_waits_longer_each_time_up_to_the_cap() -> None:
    backoff = RestartBackoff(stable_after=10.0, first=0.5, top=30.0)
    delays = [backoff.delay(0, lived=0.1) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_worker_that_lived_long_is_restarted_quickly_and_resets_its_slot() -> None:
    backoff = RestartBackoff(stable_after=10.0, first=0.5, top=30.0)
    backoff.delay(1, lived=0.1)
    backoff.delay(1, lived=0.1)
    assert backoff.delay(1, lived=60.0) == 0.1
    assert backoff.delay(1, lived=0.1) == 0.5  # counting starts over
    assert backoff.delay(2, lived=0.1) == 0.5  # slots are independent


def test_wait_status_in_words() -> None:
    assert describe_status(signal.SIGKILL) == "killed by signal SIGKILL"
    assert describe_status(3 << 8) == "exited with status 3"


# -- [milter] workers ---------------------------------------------------------------------------


def test_workers_default_to_one() -> None:
    assert Config().milter.workers == 1


@pytest.mark.parametrize("value", [1, 2, 64])
def test_workers_take_an_integer_from_1_to_64(value: int) -> None:
    assert config_from_mapping({"milter": {"workers": value}}).milter.workers == value


def test_workers_auto_is_one_per_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert config_from_mapping({"milter": {"workers": "auto"}}).milter.workers == 6
    monkeypatch.setattr(os, "cpu_count", lambda: 512)
    assert config_from_mapping({"milter": {"workers": "auto"}}).milter.workers == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert config_from_mapping({"milter": {"workers": "auto"}}).milter.workers == 1


@pytest.mark.parametrize("value", [0, -1, 65, "two", "AUTO", True, 1.5, [2]])
def test_other_workers_values_are_refused(value: object) -> None:
    with pytest.raises(ConfigError, match=r'\[milter\] workers = .*integer from 1 to 64 or "auto"'):
        config_from_mapping({"milter": {"workers": value}})


def test_config_changes_name_each_changed_key() -> None:
    old = Config()
    assert config_changes(old, old) == "none"
    new = replace(
        old,
        policy=replace(old.policy, on_fail=type(old.policy.on_fail)("reject")),
        dns=replace(old.dns, budget=9.0),
        source="elsewhere",  # where it came from is not a change of configuration
    )
    assert config_changes(old, new) == "dns.budget,policy.on_fail"


def test_a_reload_warns_that_a_new_worker_count_needs_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = Config()
    with caplog.at_level(logging.WARNING, "mtls_milter"):
        warn_restart_only(old, old)
        assert caplog.text == ""
        warn_restart_only(old, replace(old, milter=replace(old.milter, workers=4)))
    assert "[milter] socket, transport or workers changed; takes effect only after a restart" in (
        caplog.text
    )


def test_the_start_line_summarizes_the_configuration() -> None:
    config = config_from_mapping(
        {
            "milter": {"workers": 3},
            "dns": {"nameservers": ["192.0.2.53"], "budget": 4},
            "policy": {"on_fail": "reject"},
            "dmarc": {"enabled": True},
            "chain_fetch": {"enabled": False},
        },
        source="/etc/mtls-milter/mtls-milter.toml",
    )
    assert config_summary(config) == (
        f"version={__version__} socket=inet:8898@127.0.0.1 transport=asyncio workers=3 "
        "policy_service=off dns=192.0.2.53 dns_budget=4s on_fail=reject on_temperror=annotate "
        "dmarc=annotate chain_fetch=off metrics=off config=/etc/mtls-milter/mtls-milter.toml"
    )


# -- the policy lookup channel ------------------------------------------------------------------


class Parent:
    """The parent's end of a channel, answering from a SessionTable in a thread (or not)."""

    def __init__(self, table: SessionTable, *, answer: bool = True, reply: bytes = b"") -> None:
        self.sock, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.link = WorkerLink(worker_end, 0)
        self.table, self.answer, self.reply = table, answer, reply
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while message := self.sock.recv(MAX_MESSAGE):
            if not self.answer:
                continue
            ident, request = message[1 : 1 + ID.size], message[1 + ID.size :]
            self.sock.send(ident + (self.reply or answer_lookup(self.table, request)))


@pytest.fixture
def table() -> SessionTable:
    table = SessionTable()
    table.record("192.0.2.7", "40000", FACTS)
    return table


def test_a_worker_reads_the_parents_record(table: SessionTable) -> None:
    remote = RemoteSessionTable(Parent(table).link)
    facts = remote.get("192.0.2.7", "40000", since=remote.now() - 5)
    assert facts is not None and replace(facts, recorded=0.0) == FACTS
    assert remote.get("192.0.2.7", "40001") is None  # another session: none


def test_a_record_older_than_the_workers_session_is_not_its_own(table: SessionTable) -> None:
    """``since`` is the worker's monotonic clock, compared with the parent's record time."""
    remote = RemoteSessionTable(Parent(table).link)
    assert remote.get("192.0.2.7", "40000", since=remote.now()) is None


@pytest.mark.parametrize(
    "parent",
    ["silent", "gone", "garbage", "wrong-shape"],
)
def test_a_failed_lookup_is_unavailable_not_no_record_and_is_logged_once(
    parent: str, table: SessionTable, caplog: pytest.LogCaptureFixture
) -> None:
    if parent == "gone":
        link = Parent(table, answer=False).link
        link.sock.shutdown(socket.SHUT_RDWR)
    else:
        reply = {"garbage": b"\xff{", "wrong-shape": b'{"fingerprint": 1}'}.get(parent, b"")
        link = Parent(table, answer=parent != "silent", reply=reply).link
    remote = RemoteSessionTable(link, timeout=0.05)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "mtls_milter.policy_service"):
        for _ in range(2):
            with pytest.raises(PolicyTableUnavailable):
                remote.get("192.0.2.7", "40000")
    assert time.monotonic() - started < 1.0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].endswith("; policy table unavailable"), lines


def test_a_lookup_waiting_behind_a_stuck_one_gives_up_within_its_timeout(
    table: SessionTable,
) -> None:
    """The parent is stuck (it does not answer): a second thread's lookup, which waits for the
    first one's turn on the channel, still returns within its own timeout in all."""
    link = Parent(table, answer=False).link
    stuck = threading.Thread(target=link.request, args=(b"[]", 2.0))
    stuck.start()
    time.sleep(0.05)
    started = time.monotonic()
    assert link.request(b"[]", 0.1) is None
    assert time.monotonic() - started < 0.5
    stuck.join()


def test_a_late_reply_is_not_taken_for_the_next_requests(table: SessionTable) -> None:
    parent = Parent(table, answer=False)
    remote = RemoteSessionTable(parent.link, timeout=0.05)
    with pytest.raises(PolicyTableUnavailable):  # timed out; its answer comes late:
        remote.get("192.0.2.7", "40000")
    parent.sock.send(ID.pack(1) + json.dumps(asdict(FACTS)).encode())
    parent.answer = True
    assert remote.get("192.0.2.7", "40001") is None  # the late answer was skipped


TLS_WITHOUT_TRUST = {"{tls_version}": "TLSv1.3", "{cipher}": "TLS_AES_256_GCM_SHA384"}
TRUSTED = {**TLS_WITHOUT_TRUST, "{cert_subject}": "out.sender.test", "{cert_issuer}": "CA"}


def _header_after_lookup(
    zone: TestDnsServer, pki: TestPki, table: SessionTable, macros: dict[str, str], answer: bool
) -> str:
    """One message through a worker's session whose parent answers policy lookups or not."""
    raw = {
        "milter": {"authserv_id": "mx.receiver.test"},
        "dns": {"nameservers": [zone.nameserver], "timeout": 1.0, "budget": 2.0},
        "tls": {"trust": [str(pki.root_path)]},
        "policy_service": {"socket": "inet:10040@127.0.0.1"},
    }
    holder = EngineHolder(Engine.from_config(config_from_mapping(raw)))
    remote = RemoteSessionTable(Parent(table, answer=answer).link, timeout=0.05)
    with ThreadPoolExecutor(2) as pool:
        session = MilterSession(holder, pool, sessions=remote)
        session.connect("192.0.2.7", "40000")
        session.helo("out.sender.test", macros)
        session.mail("<a@sender.test>", {})
        session.data()
        outcome = session.eom({"i": "Q1"})
    return outcome.headers[-1].value.replace("\n\t", " ")


def test_a_policy_table_that_cannot_be_asked_gives_temperror_not_fail(
    dns_server: TestDnsServer, pki: TestPki
) -> None:
    """An untrusted certificate: the verdict needs the fingerprint from the policy table. The
    table answering "no record" gives fail; the table not answering is an internal failure,
    temperror, never fail. A pass that needs no fingerprint stays a pass."""
    dns_server.add("sender.test", 265, "10 out.sender.test.")
    empty = SessionTable()
    assert "mtls=fail" in _header_after_lookup(dns_server, pki, empty, TLS_WITHOUT_TRUST, True)
    header = _header_after_lookup(dns_server, pki, empty, TLS_WITHOUT_TRUST, False)
    assert "mtls=temperror" in header and "policy table unavailable" in header, header
    assert "mtls=pass" in _header_after_lookup(dns_server, pki, empty, TRUSTED, False)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_request_gets_a_reply_that_decodes(request: bytes) -> None:
    table = SessionTable()
    table.record("192.0.2.7", "40000", FACTS)
    facts = decode_facts(answer_lookup(table, request))  # never raises
    assert facts is None or replace(facts, recorded=0.0) == FACTS


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_reply_decodes_to_facts_or_a_value_error(reply: bytes) -> None:
    try:
        facts = decode_facts(reply)
    except (ValueError, TypeError):
        return
    assert facts is None or isinstance(facts, PolicyFacts)


# -- the supervisor, in a subprocess ------------------------------------------------------------

SUPERVISOR = textwrap.dedent(
    """
    import logging, os, resource, signal, sys, time
    from mtls_milter.runtime import prefork
    from mtls_milter.runtime.prefork import Supervisor, SupervisorHooks
    from mtls_milter.runtime.worker_link import RELOADED, UP
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
    mode = sys.argv[1]

    def worker(slot, link):
        if mode == "crash":
            return 3
        if mode == "exit-none":
            sys.exit()
        hups = []
        signal.signal(signal.SIGHUP, lambda signum, frame: hups.append(signum))
        link.tell(UP)
        if mode == "late-reload":  # confirms the first reload 1.5 s late, no later one
            while not hups:
                time.sleep(0.01)
            time.sleep(1.5)
            link.tell(RELOADED)
        if mode == "slow-reload" and slot == 0:  # lookups, one every 10 ms, for 2.5 s
            waits, lost = [], 0
            for _ in range(250):
                started = time.monotonic()
                lost += link.request(b"x", 0.25) != b"x"
                waits.append(time.monotonic() - started)
                time.sleep(0.01)
            print(f"LOOKUPS lost={lost} slowest={max(waits):.3f}", flush=True)
        time.sleep(3600)
        return 0

    def reload(trigger):
        if mode == "bad-reload":
            raise RuntimeError("reload bug")
        if mode == "slow-reload":  # a big trust store: 1 s of CPU
            until = time.monotonic() + 1.0
            while time.monotonic() < until:
                pass
        return "ok"

    def broken(*args):
        raise RuntimeError("hook")

    if mode == "late-reload":
        prefork.RELOAD_TIMEOUT = 1.0
    if mode == "high-fds":  # the workers' channels get descriptor numbers over 1023
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, 2048))
        spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1030)]
    hooks = SupervisorHooks(broken, broken, broken) if mode == "broken-hooks" else None
    ready = lambda pids: print("READY", *pids, flush=True)
    sys.exit(Supervisor(2, worker, answer=lambda r: r, reload=reload, on_ready=ready,
                        hooks=hooks, stop_grace=2).run())
    """
)


@pytest.fixture
def supervisor(request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, request.param],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


@pytest.mark.parametrize("supervisor", ["crash"], indirect=True)
def test_a_worker_crashing_at_start_is_restarted_with_growing_delays(
    supervisor: subprocess.Popen[str],
) -> None:
    time.sleep(2.2)  # 0.5 + 1.0 s of delays: each slot restarted twice, not hundreds of times
    supervisor.send_signal(signal.SIGTERM)
    out, _ = supervisor.communicate(timeout=10)
    assert supervisor.returncode == 0, out
    exits = [line for line in out.splitlines() if "exited with status 3" in line]
    assert 4 <= len(exits) <= 6, out
    assert sum("restarting it in 0.5 s" in line for line in exits) == 2, out
    assert sum("restarting it in 1 s" in line for line in exits) == 2, out
    assert "READY" not in out


@pytest.mark.parametrize("supervisor", ["serve"], indirect=True)
def test_the_supervisor_restarts_a_killed_worker_and_stops_all_on_sigterm(
    supervisor: subprocess.Popen[str],
) -> None:
    assert supervisor.stdout is not None
    ready = supervisor.stdout.readline().split()
    assert ready[0] == "READY" and len(ready) == 3, ready
    victim = int(ready[1])
    os.kill(victim, signal.SIGKILL)
    line = supervisor.stdout.readline()
    assert f"(pid {victim}) killed by signal SIGKILL" in line and "restarting it in" in line
    time.sleep(1.0)
    supervisor.send_signal(signal.SIGUSR2)
    report = supervisor.stdout.readline()
    worker = r"\d:pid=\d+:rss=[0-9.]+MiB"
    assert re.fullmatch(rf"INFO workers: {worker} {worker}\n", report), report
    assert f"pid={victim}:" not in report
    supervisor.send_signal(signal.SIGTERM)
    out, _ = supervisor.communicate(timeout=10)
    assert supervisor.returncode == 0, out
    assert "stopping on SIGTERM: 2 workers" in out
    assert out.count("killed by signal SIGTERM") == 2, out  # these workers take SIGTERM's default


def _stop(supervisor: subprocess.Popen[str]) -> str:
    supervisor.send_signal(signal.SIGTERM)
    out, _ = supervisor.communicate(timeout=10)
    assert supervisor.returncode == 0, out
    return out


@pytest.mark.parametrize("supervisor", ["slow-reload"], indirect=True)
def test_lookups_are_answered_while_a_reload_is_checked(
    supervisor: subprocess.Popen[str],
) -> None:
    """The reload check takes 1 s of CPU; a worker's lookups meanwhile are still answered
    within their 0.25 s (the check runs in a thread, the answers on the supervisor's loop)."""
    assert supervisor.stdout is not None
    assert supervisor.stdout.readline().startswith("READY"), "no READY"
    time.sleep(0.3)
    supervisor.send_signal(signal.SIGHUP)
    line = supervisor.stdout.readline()
    while not line.startswith("LOOKUPS"):
        assert line, "no LOOKUPS line"
        line = supervisor.stdout.readline()
    _stop(supervisor)
    lost, slowest = re.findall(r"lost=(\d+) slowest=([0-9.]+)", line)[0]
    assert lost == "0" and float(slowest) < 0.2, line


@pytest.mark.parametrize("supervisor", ["late-reload"], indirect=True)
def test_a_late_confirmation_does_not_count_for_the_next_reload(
    supervisor: subprocess.Popen[str],
) -> None:
    """The workers confirm the first reload after its 1 s timeout and never the second: the
    second reload's line says so instead of taking the late confirmations for its own."""
    assert supervisor.stdout is not None
    pids = supervisor.stdout.readline().split()[1:]
    supervisor.send_signal(signal.SIGHUP)
    first = supervisor.stdout.readline()
    assert "reloaded: ok" in first and "no confirmation from pid" in first, first
    supervisor.send_signal(signal.SIGHUP)  # before the late confirmations of the first come
    second = supervisor.stdout.readline()
    _stop(supervisor)
    late = re.findall(r"reloaded: ok .*\(no confirmation from pid ([0-9,]+)\)", second)
    assert late and sorted(late[0].split(",")) == sorted(pids), second


@pytest.mark.parametrize("supervisor", ["bad-reload"], indirect=True)
def test_a_reload_check_that_raises_keeps_the_supervisor_and_its_workers(
    supervisor: subprocess.Popen[str],
) -> None:
    assert supervisor.stdout is not None
    pids = supervisor.stdout.readline().split()[1:]
    supervisor.send_signal(signal.SIGHUP)
    line = supervisor.stdout.readline()
    assert "reload check failed; keeping the running configuration" in line, line
    time.sleep(0.3)
    for pid in pids:
        os.kill(int(pid), 0)  # still running
    out = _stop(supervisor)
    assert out.count("killed by signal SIGTERM") == 2, out


@pytest.mark.parametrize("supervisor", ["high-fds"], indirect=True)
def test_channels_over_descriptor_1023_are_served(supervisor: subprocess.Popen[str]) -> None:
    """select.select() refuses a descriptor number over 1023 (ValueError): the supervisor
    would die at once and leave its workers running."""
    time.sleep(1.0)
    assert supervisor.poll() is None, "the supervisor died"
    out = _stop(supervisor)
    assert out.startswith("READY ") and out.count("killed by signal SIGTERM") == 2, out


@pytest.mark.parametrize("supervisor", ["exit-none"], indirect=True)
def test_a_worker_calling_sys_exit_without_a_status_exits_with_0(
    supervisor: subprocess.Popen[str],
) -> None:
    time.sleep(0.3)
    out = _stop(supervisor)
    assert "worker 0 (pid " in out and ") exited with status 0 after" in out, out
    assert "exited with status 1" not in out, out


@pytest.mark.parametrize("supervisor", ["broken-hooks"], indirect=True)
def test_failing_hooks_are_logged_and_change_nothing(supervisor: subprocess.Popen[str]) -> None:
    time.sleep(1.0)
    supervisor.send_signal(signal.SIGTERM)
    out, _ = supervisor.communicate(timeout=10)
    assert supervisor.returncode == 0, out
    ready = [line for line in out.splitlines() if line.startswith("READY ")]
    assert len(ready) == 1 and len(ready[0].split()) == 3, out
    assert out.count("supervisor hook broken failed") == 6, out  # 2 forks, 2 starts, 2 exits


# -- the pymilter transport -------------------------------------------------------------------


def test_serve_refuses_workers_on_the_pymilter_transport(tmp_path: Path) -> None:
    config = tmp_path / "mtls-milter.toml"
    config.write_text(
        '[milter]\nsocket = "inet:8898@127.0.0.1"\ntransport = "pymilter"\nworkers = 2\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "mtls_milter", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert f'cannot start: {config}: [milter] workers = 2 needs transport = "asyncio"' in (
        done.stderr
    )
    assert "libmilter" in done.stderr
    # config-test finds the same problem before a restart does.
    checked = subprocess.run(
        [sys.executable, "-m", "mtls_milter", "config-test", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 1
    assert '[milter] workers = 2 needs transport = "asyncio"' in checked.stdout + checked.stderr
