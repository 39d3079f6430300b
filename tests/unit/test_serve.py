"""The daemon's reload and signal plumbing, without starting libmilter.

The signal behaviour of the running daemon is tested end to end in
tests/e2e/test_daemon_signals.py and tests/e2e/test_milter_e2e.py; here: which reloads keep the
DNS resolver (and its cache), the SA_NODEFER flag on a handler, and the mask a thread inherits.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import toml_text
from support.pki import TestPki

from mtls_milter.inbound import daemon as serve
from mtls_milter.inbound import daemon_common
from mtls_milter.inbound.daemon import Daemon, signals_blocked
from mtls_milter.inbound.daemon_common import build_engine


@pytest.fixture
def resolv_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 192.0.2.53\n")
    monkeypatch.setattr(daemon_common, "RESOLV_CONF", path)
    return path


class Files:
    def __init__(self, tmp_path: Path, pki: TestPki) -> None:
        self.path = tmp_path / "mtls-milter.toml"
        self.pki = pki

    def write(self, **dns: Any) -> str:
        config: dict[str, dict[str, Any]] = {
            "milter": {"socket": "inet:8898@127.0.0.1", "authserv_id": "mx.receiver.test"},
            "tls": {"trust": [str(self.pki.root_path)]},
            "dns": {"timeout": 1.0, **dns},
        }
        self.path.write_text(toml_text(config))
        return str(self.path)


@pytest.fixture
def daemon(tmp_path: Path, pki: TestPki, resolv_conf: Path) -> Iterator[tuple[Daemon, Files]]:
    files = Files(tmp_path, pki)
    path = files.write()
    running = Daemon(path, build_engine(path))
    yield running, files
    running._executor.shutdown(wait=False)
    running._fetcher.shutdown()


def test_reload_keeps_the_resolver_while_dns_settings_stay(
    daemon: tuple[Daemon, Files], resolv_conf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running, files = daemon
    caplog.set_level(logging.INFO, logger="mtls_milter")
    first = running._holder.engine
    files.write()  # the same [dns] (other sections could change)
    running.reload("SIGUSR1")
    assert running._holder.engine is not first
    assert running._holder.engine.resolver is first.resolver  # its cache goes on
    assert caplog.records[-1].getMessage().endswith("dns=kept (cached answers stay) signal=SIGUSR1")

    files.write(timeout=1.5)  # [dns] changed
    running.reload()
    second = running._holder.engine.resolver
    assert second is not first.resolver
    assert caplog.records[-1].getMessage().endswith("dns=new resolver (empty cache)")

    resolv_conf.write_text("nameserver 192.0.2.54\n")  # the system's resolvers changed
    running.reload()
    assert running._holder.engine.resolver is not second


def test_reload_with_configured_name_servers_ignores_resolv_conf(
    daemon: tuple[Daemon, Files], resolv_conf: Path
) -> None:
    running, files = daemon
    files.write(nameservers=["192.0.2.1"])
    running.reload()
    resolver = running._holder.engine.resolver
    resolv_conf.write_text("nameserver 192.0.2.54\n")
    running.reload()
    assert running._holder.engine.resolver is resolver


def test_refused_reload_keeps_everything(
    daemon: tuple[Daemon, Files], caplog: pytest.LogCaptureFixture
) -> None:
    running, files = daemon
    engine = running._holder.engine
    files.path.write_text('[policy]\non_fail = "explode"\n')
    running.reload()
    assert running._holder.engine is engine
    assert "reload refused, keeping the running configuration" in caplog.text


class _SigAction(ctypes.Structure):
    _fields_ = serve._SigAction._fields_


def test_no_defer_sets_the_flag_on_a_python_handler() -> None:
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    try:
        serve._no_defer((signal.SIGUSR2,))
        action = _SigAction()
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.sigaction(signal.SIGUSR2, None, ctypes.byref(action)) == 0
        assert action.sa_flags & serve.SA_NODEFER
        hits: list[int] = []
        signal.signal(signal.SIGUSR2, lambda signum, frame: hits.append(signum))
        serve._no_defer((signal.SIGUSR2,))
        signal.raise_signal(signal.SIGUSR2)  # the Python handler still runs
        assert hits == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_thread_started_with_signals_blocked_inherits_the_mask() -> None:
    seen: list[set[int]] = []

    def record() -> None:
        seen.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with signals_blocked():
        thread = threading.Thread(target=record)
        thread.start()
    thread.join()
    assert set(serve.DAEMON_SIGNALS) <= seen[0]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # restored here


@pytest.mark.parametrize("transport", ["pymilter", "asyncio"])
def test_a_socket_that_cannot_be_opened_is_named_with_the_os_reason(
    tmp_path: Path, transport: str
) -> None:
    """libmilter itself only says "cannot opensocket"; the operator needs the OS's reason."""
    config = tmp_path / "mtls-milter.toml"
    missing = tmp_path / "no-such-dir" / "milter.sock"
    config.write_text(f'[milter]\nsocket = "unix:{missing}"\ntransport = "{transport}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "mtls_milter", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert f"cannot listen on unix:{missing}: [Errno 2] No such file or directory" in done.stderr
