"""Idle connections and file-descriptor exhaustion against the real daemons.

- ``serve`` (milter): 1,000 idle connections (connected only, after OPTNEG, in the middle of a
  conversation, in the middle of a packet) do not stop a normal message from being served, and
  every descriptor comes back when they close.
- ``policy-map``, the policy listener of ``serve`` and ``acme respond``, each run with
  RLIMIT_NOFILE = 64 and offered more connections than that: ``accept()`` fails with EMFILE;
  the service logs ONE line (not one per retry or per connection), does not spin, and serves
  again once the connections are closed.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from support.daemon import MilterDaemon, toml_text
from support.dnsserver import TestDnsServer
from support.milter_client import MilterClient, full_conversation
from support.policy_map import socketmap_query
from support.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

LOW_NOFILE = 64
EMFILE_LINE = "cannot accept connections: Too many open files; retrying every 1 s"


@pytest.fixture(scope="module")
def dns() -> Iterator[TestDnsServer]:
    with TestDnsServer() as server:
        yield server


def _status(pid: int) -> dict[str, int]:
    """Descriptors, threads, resident memory (KiB) and CPU ticks of a process."""
    proc = Path(f"/proc/{pid}")
    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
    return {
        "fds": len(os.listdir(proc / "fd")),
        "threads": len(os.listdir(proc / "task")),
        "rss_kib": int(status["VmRSS"].split()[0]),
        "cpu_ticks": int(fields[11]) + int(fields[12]),
    }


@contextlib.contextmanager
def _nofile(wanted: int) -> Iterator[None]:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it); restore it afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _assert_served(port: int) -> None:
    result = full_conversation(("127.0.0.1", port), sender="<alice@sender.test>", timeout=5.0)
    values = [" ".join(v.split()) for v in result.header_values("Authentication-Results")]
    assert len(values) == 1 and values[0].startswith("mx.test; mtls=none "), result


def _idle_milter_connections(port: int) -> list[socket.socket]:
    """1,000 connections that then say nothing: 400 just connected, 400 after OPTNEG, 100 after
    HELO (inside a conversation), 100 inside a packet (2 of the 4 length bytes)."""
    opened: list[socket.socket] = []
    for index in range(1000):
        client = MilterClient.connect(("127.0.0.1", port), timeout=5.0)
        if 400 <= index < 900:
            client.optneg()
        if 800 <= index < 900:
            client.connect_info()
            client.helo("idle.example")
        if index >= 900:
            client.send_raw(b"\0\0")
        opened.append(client.sock)
    return opened


def test_milter_serves_next_to_1000_idle_connections(
    dns: TestDnsServer, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    config: dict[str, dict[str, Any]] = {
        "milter": {"authserv_id": "mx.test"},
        "dns": {"nameservers": [dns.nameserver]},
    }
    with _nofile(4096), MilterDaemon(tmp_path, config) as daemon:
        assert daemon.pid is not None
        _assert_served(daemon.port)
        before = _status(daemon.pid)
        idle = _idle_milter_connections(daemon.port)
        try:
            time.sleep(0.5)
            during = _status(daemon.pid)
            _assert_served(daemon.port)
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 10
        while _status(daemon.pid)["fds"] > before["fds"] + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        after = _status(daemon.pid)
        _assert_served(daemon.port)
    record_property("milter_1000_idle", {"before": before, "during": during, "after": after})
    assert during["fds"] >= 1000  # the idle ones really were open
    assert after["fds"] <= before["fds"] + 2  # and every descriptor came back (give or take a
    # transient one, e.g. a DNS query)


# -- EMFILE: asyncio services started with RLIMIT_NOFILE = 64 ---------------------------------


def _low_nofile() -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_NOFILE, LOW_NOFILE))


@contextlib.contextmanager
def _spawn(args: Sequence[str], log_path: Path, ready: str) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m mtls_milter ARGS`` with RLIMIT_NOFILE = 64; waits for ``ready`` in its log."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mtls_milter", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_low_nofile,
        )
    try:
        deadline = time.monotonic() + 20
        while ready not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _exhaust(pid: int, port: int, source: str = "127.0.0.1", count: int = 100) -> int:
    """Hold ``count`` connections (more than the process has descriptors) for 3.5 s — enough
    for several of asyncio's one-second accept retries; return the CPU ticks spent meanwhile."""
    opened = [
        socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        for _ in range(count)
    ]
    try:
        time.sleep(0.5)
        start = _status(pid)["cpu_ticks"]
        time.sleep(3.0)
        return _status(pid)["cpu_ticks"] - start
    finally:
        for sock in opened:
            sock.close()


def _assert_one_emfile_line(log_text: str) -> None:
    lines = [line for line in log_text.splitlines() if "cannot accept" in line]
    assert len(lines) == 1, log_text[-3000:]
    assert lines[0].startswith("WARNING ") and lines[0].endswith(EMFILE_LINE)
    assert "Traceback" not in log_text


def test_policy_map_survives_running_out_of_descriptors(dns: TestDnsServer, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "policy-map.toml"
    config.write_text(
        toml_text(
            {
                "policy_map": {"socket": f"inet:{port}@127.0.0.1"},
                "dns": {"nameservers": [dns.nameserver]},
            }
        )
    )
    log_path = tmp_path / "policy-map.log"
    with _spawn(["policy-map", "--config", str(config)], log_path, "started:") as proc:
        cpu = _exhaust(proc.pid, port)
        replies = socketmap_query(("127.0.0.1", port), [b"mtls sender.test"], 1)
        assert replies == ["NOTFOUND "]
        _assert_one_emfile_line(log_path.read_text())
    assert cpu < 100, f"{cpu} CPU ticks in 3 s: a busy loop"


def test_policy_listener_survives_running_out_of_descriptors(
    dns: TestDnsServer, tmp_path: Path
) -> None:
    policy_port = free_port()
    config: dict[str, dict[str, Any]] = {
        "milter": {"authserv_id": "mx.test"},
        "dns": {"nameservers": [dns.nameserver]},
        "policy_service": {"socket": f"inet:{policy_port}@127.0.0.1"},
    }
    with MilterDaemon(tmp_path, config) as daemon:
        assert daemon.pid is not None
        # libmilter has taken every milter connection so far (the start-up probe included):
        # one still waiting in its backlog at EMFILE would make libmilter spin, not us.
        _assert_served(daemon.port)
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (LOW_NOFILE, LOW_NOFILE))
        cpu = _exhaust(daemon.pid, policy_port)
        request = b"request=smtpd_access_policy\nclient_address=192.0.2.1\nclient_port=1\n\n"
        with socket.create_connection(("127.0.0.1", policy_port), timeout=10) as sock:
            sock.sendall(request)
            assert sock.recv(100) == b"action=DUNNO\n\n"
        _assert_served(daemon.port)
        _assert_one_emfile_line(daemon.log_text())
    assert cpu < 100, f"{cpu} CPU ticks in 3 s: a busy loop"


def _http_status(port: int, source: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(b"GET /.well-known/acme-challenge/tok_en HTTP/1.1\r\nHost: mx\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_acme_responder_caps_idle_connections_and_survives_running_out_of_descriptors(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "tok_en").write_text("tok_en.thumbprint\n")
    port = free_port()
    log_path = tmp_path / "respond.log"
    args = ["acme", "respond", "--dir", str(tokens), "--listen", f"127.0.0.1:{port}"]
    with _spawn(args, log_path, "listening on") as proc:
        # Idle connections beyond the per-address cap (32) get a 503 at once...
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
        time.sleep(0.3)
        for sock in idle[32:]:
            assert sock.recv(100).startswith(b"HTTP/1.1 503 ")
        # ... while a client from another address is served.
        assert _http_status(port, "127.0.0.2") == b"HTTP/1.1 200 OK"
        cpu = _exhaust(proc.pid, port, source="127.0.0.3", count=60)
        for sock in idle:
            sock.close()
        time.sleep(1.5)  # the next accept retry takes the backlog
        assert _http_status(port, "127.0.0.1") == b"HTTP/1.1 200 OK"
        text = log_path.read_text()
    _assert_one_emfile_line(text)
    refusals = [line for line in text.splitlines() if "refusing new ones" in line]
    assert refusals == [
        "WARNING mtls_milter.acme.respond: 32 connections open from 127.0.0.1: refusing new ones"
    ]
    assert cpu < 100, f"{cpu} CPU ticks in 3 s: a busy loop"
