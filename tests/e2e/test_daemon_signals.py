"""The real ``mtls-milter serve`` daemon and its signals, read from /proc (Linux).

libmilter runs a signal thread of its own that waits (sigwait) for SIGHUP, SIGINT and SIGTERM
and takes any of them as "stop". These tests check what the daemon does about it: only the main
thread can take those three signals, SIGUSR1 is taken by the daemon's own sigwait thread, and a
stop of libmilter that the daemon did not ask for ends the process with status 1 and an error
line, so a service manager restarts it. Mail is driven through the daemon with Debian's
``miltertest`` (``bench/lua/conversation.lua``) so that the worker threads exist when the masks
are read.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.daemon import MilterDaemon
from support.dnsserver import TestDnsServer
from support.milter_client import MilterClient
from support.pki import TestPki
from support.ports import free_port

pytestmark = pytest.mark.e2e

CONVERSATION = Path(__file__).resolve().parents[2] / "bench" / "lua" / "conversation.lua"
MAIN_THREAD_SIGNALS = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT})
DAEMON_SIGNALS = MAIN_THREAD_SIGNALS | {signal.SIGUSR1}
STOPPED_BY_ITSELF = "libmilter's main loop returned without a stop request"


@dataclass(frozen=True)
class Task:
    """One thread of the daemon as /proc shows it."""

    tid: int
    name: str
    wchan: str
    blocked: frozenset[signal.Signals]

    @property
    def in_sigwait(self) -> bool:
        return self.wchan.startswith("do_sigtimedwait")


def _tasks(pid: int) -> list[Task]:
    tasks: list[Task] = []
    for entry in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda p: int(p.name)):
        status = dict(
            line.split(":\t", 1)
            for line in (entry / "status").read_text().splitlines()
            if ":\t" in line
        )
        mask = int(status["SigBlk"], 16)
        blocked = frozenset(s for s in DAEMON_SIGNALS if mask >> (s - 1) & 1)
        wchan = (entry / "wchan").read_text()
        tasks.append(Task(int(entry.name), status["Name"].strip(), wchan, blocked))
    return tasks


def _running(tmp_path: Path, pki: TestPki, transport: str) -> Iterator[MilterDaemon]:
    with TestDnsServer() as dns:
        dns.add("sender.test", 265, "10 out.sender.test.")
        config: dict[str, dict[str, Any]] = {
            "milter": {"authserv_id": "mx.receiver.test", "transport": transport},
            "dns": {"nameservers": [dns.nameserver], "timeout": 1.0, "budget": 2.0},
            "tls": {"trust": [str(pki.root_path)]},
            "policy_service": {"socket": f"inet:{free_port()}@127.0.0.1"},
        }
        with MilterDaemon(tmp_path / "milter", config) as running:
            yield running


@pytest.fixture
def daemon(tmp_path: Path, pki: TestPki) -> Iterator[MilterDaemon]:
    """The daemon on the pymilter transport (libmilter's threads and signals)."""
    yield from _running(tmp_path, pki, "pymilter")


@pytest.fixture(params=["pymilter", "asyncio"])
def any_daemon(
    request: pytest.FixtureRequest, tmp_path: Path, pki: TestPki
) -> Iterator[MilterDaemon]:
    """The daemon on each transport."""
    yield from _running(tmp_path, pki, request.param)


def _conversations(daemon: MilterDaemon, count: int) -> None:
    """``count`` full milter conversations through the daemon (skips without miltertest)."""
    miltertest = shutil.which("miltertest")
    if miltertest is None:
        pytest.skip("miltertest is not installed")
    header = "Authentication-Results"
    command = [miltertest, "-D", f"sock={daemon.socket}", "-D", f"count={count}"]
    command += ["-D", f"deadline={int(time.time()) + 60}", "-D", f"header={header}"]
    done = subprocess.run([*command, "-s", str(CONVERSATION)], capture_output=True, text=True)
    assert f"DONE {count}" in done.stdout, done.stdout + done.stderr


def test_only_the_main_thread_takes_hup_term_and_int(daemon: MilterDaemon) -> None:
    _conversations(daemon, 5)  # worker and lookup threads exist now
    pid = daemon.pid
    assert pid is not None
    _libmilter_signal_thread(pid)
    tasks = _tasks(pid)
    main, others = tasks[0], tasks[1:]
    assert main.tid == pid
    assert not main.blocked & MAIN_THREAD_SIGNALS, main
    assert signal.SIGUSR1 in main.blocked, main  # only the daemon's own sigwait thread takes it
    waiting = [t for t in others if t.in_sigwait]
    # /proc shows a thread in sigwait with the signals it waits for unblocked.
    assert sorted(DAEMON_SIGNALS - t.blocked for t in waiting) == sorted(
        [frozenset({signal.SIGUSR1}), MAIN_THREAD_SIGNALS]
    ), waiting  # the daemon's SIGUSR1 thread and libmilter's signal thread
    for task in others:
        if not task.in_sigwait:
            assert task.blocked == DAEMON_SIGNALS, task
    assert len(others) >= 5, tasks  # libmilter, its signal thread, policy listener, workers


def _libmilter_signal_thread(pid: int) -> Task:
    """libmilter's signal thread (waiting for SIGHUP), once libmilter has started it."""
    deadline = time.monotonic() + 10
    while True:
        tasks = _tasks(pid)
        found = [t for t in tasks[1:] if t.in_sigwait and signal.SIGHUP not in t.blocked]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, tasks
            return found[0]
        time.sleep(0.05)


def test_libmilter_stopping_by_itself_exits_with_status_1(daemon: MilterDaemon) -> None:
    """libmilter's signal thread takes a SIGHUP (sent to that thread alone, as the kernel would
    route a process's SIGHUP the main thread could not take): libmilter stops, and the daemon
    must not pass that off as a clean stop."""
    pid = daemon.pid
    assert pid is not None
    waiter = _libmilter_signal_thread(pid)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.tgkill(pid, waiter.tid, signal.SIGHUP) == 0
    deadline = time.monotonic() + 15
    while daemon.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not daemon.running(), "libmilter did not stop on its signal thread's SIGHUP"
    assert daemon.stop() == 1
    log = daemon.log_text()
    assert f"ERROR mtls_milter: {STOPPED_BY_ITSELF}; exiting with status 1" in log, log


def test_sigterm_stops_with_status_0(any_daemon: MilterDaemon) -> None:
    daemon = any_daemon
    _conversations(daemon, 2)
    assert daemon.stop() == 0
    log = daemon.log_text()
    assert "INFO mtls_milter: stopping on SIGTERM" in log
    assert log.rstrip().endswith("INFO mtls_milter: stopped"), log
    assert "ERROR" not in log and "Traceback" not in log, log


def test_sigusr1_and_sighup_both_reload(any_daemon: MilterDaemon) -> None:
    daemon = any_daemon
    assert daemon.signal_reload(signum=signal.SIGUSR1)
    assert daemon.signal_reload(signum=signal.SIGHUP)
    reloads = [line for line in daemon.log_text().splitlines() if "reloaded: " in line]
    assert reloads[-2].endswith("dns=kept (cached answers stay) signal=SIGUSR1"), reloads
    assert reloads[-1].endswith("dns=kept (cached answers stay) signal=SIGHUP"), reloads
    _conversations(daemon, 2)
    assert daemon.running()


def test_sigterm_on_asyncio_lets_the_message_in_flight_finish(tmp_path: Path, pki: TestPki) -> None:
    """A stop waits (up to its grace period) for a message between MAIL FROM and end of message;
    new connections are refused at once."""
    for daemon in _running(tmp_path, pki, "asyncio"):
        with MilterClient.connect(("127.0.0.1", daemon.port)) as client:
            client.optneg()
            client.connect_info()
            client.helo("client.example")
            client.mail("<alice@sender.test>")
            client.data()
            client.header("Subject", "in flight")
            assert daemon.pid is not None
            os.kill(daemon.pid, signal.SIGTERM)
            time.sleep(0.5)
            assert daemon.running()
            with pytest.raises(OSError):
                MilterClient.connect(("127.0.0.1", daemon.port), timeout=1.0).optneg()
            client.eoh()
            result = client.eom()
        assert result.final.command == b"a"
        assert [v for v in result.header_values("Authentication-Results") if "mtls=" in v]
        assert daemon.stop() == 0
        assert "INFO mtls_milter: stopping on SIGTERM" in daemon.log_text()
