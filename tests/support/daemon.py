"""Run the real ``mtls-milter serve`` daemon as a subprocess, for end-to-end tests.

:class:`MilterDaemon` writes a TOML configuration from a mapping, starts
``python -m mtls_milter serve --config FILE`` and waits until the daemon logged ``started:``
and its TCP socket accepts. It can stop (SIGTERM), kill (SIGKILL), restart on the same socket,
and reload a changed configuration with SIGHUP or SIGUSR1 (waiting for the ``reloaded:`` or
``reload refused`` log line). Everything the daemon writes to stderr goes to one log file that
survives restarts, so :meth:`MilterDaemon.log_text` shows the whole history.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from support.lifecycle import Running
from support.ports import free_port

__all__ = ["DaemonError", "MilterDaemon", "toml_text"]

ConfigMapping = Mapping[str, Mapping[str, Any]]

_STARTED = "started: "
_RELOADED = "reloaded: "
_REFUSED = "reload refused"


# Runs the daemon with serve.set_nodelay_on_listeners replaced by a no-op (libmilter's stock
# TCP behaviour: Nagle on), to measure what TCP_NODELAY buys (docs/performance.md).
_NO_NODELAY = (
    "import sys\n"
    "from mtls_milter.cli import main as cli\nfrom mtls_milter.inbound import daemon as serve\n"
    "serve.set_nodelay_on_listeners = lambda: 0\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)


class DaemonError(RuntimeError):
    """The daemon did not start, stop or reload as expected; the message carries its log."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_text(config: ConfigMapping) -> str:
    """TOML for a two-level mapping ``{"section": {"key": value}}`` of scalars and lists."""
    lines: list[str] = []
    for section, keys in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
        lines.append("")
    return "\n".join(lines)


class MilterDaemon(Running):
    """``mtls-milter serve`` in a subprocess on ``inet:PORT@127.0.0.1``.

    ``config`` is the TOML content as a mapping; ``[milter] socket`` is set by the daemon
    (``port`` 0 picks a free port, kept across restarts). Use as a context manager or call
    :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        workdir: Path,
        config: ConfigMapping,
        *,
        port: int = 0,
        start_timeout: float = 20.0,
        log_level: str = "info",
        nodelay: bool = True,
    ) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.config_path = self.workdir / "mtls-milter.toml"
        self.log_path = self.workdir / "mtls-milter.log"
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.nodelay = nodelay
        self.config: dict[str, dict[str, Any]] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._set_config(config)

    # -- addresses ------------------------------------------------------------------------------

    @property
    def socket(self) -> str:
        """The milter socket in libmilter syntax (Sendmail's ``S=``): ``inet:PORT@127.0.0.1``."""
        return f"inet:{self.port}@127.0.0.1"

    @property
    def postfix_socket(self) -> str:
        """The same socket as Postfix writes it in ``smtpd_milters``: ``inet:127.0.0.1:PORT``."""
        return f"inet:127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- configuration --------------------------------------------------------------------------

    def _set_config(self, config: ConfigMapping) -> None:
        merged = {section: dict(keys) for section, keys in config.items()}
        merged.setdefault("milter", {})["socket"] = self.socket
        # MTLS_MILTER_TEST_TRANSPORT=asyncio runs every daemon that does not choose a transport
        # on that one (how the whole end-to-end suite is checked on each transport).
        default_transport = os.environ.get("MTLS_MILTER_TEST_TRANSPORT")
        if default_transport:
            merged["milter"].setdefault("transport", default_transport)
        self.config = merged
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(toml_text(merged))
        tmp.replace(self.config_path)

    def write_config(self, config: ConfigMapping) -> None:
        """Replace the configuration file (``[milter] socket`` set as usual); no signal."""
        self._set_config(config)

    def write_raw_config(self, text: str) -> None:
        """Replace the configuration file with ``text`` as is (e.g. a broken one)."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    # -- life cycle -----------------------------------------------------------------------------

    def command(self) -> list[str]:
        """``python -m mtls_milter serve ...``; with ``nodelay=False`` a wrapper that runs the
        same daemon with its TCP_NODELAY set-up patched out (a measurement aid)."""
        args = ["serve", "--config", str(self.config_path), "--log-level", self.log_level]
        if self.nodelay:
            return [sys.executable, "-m", "mtls_milter", *args]
        return [sys.executable, "-c", _NO_NODELAY, *args]

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the daemon and wait until it serves; raises :class:`DaemonError` otherwise."""
        if self.running():
            return
        started_before = self.log_text().count(_STARTED)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + self.start_timeout
        while self.log_text().count(_STARTED) <= started_before:
            if self._proc.poll() is not None:
                self._proc = None
                raise DaemonError(f"mtls-milter exited during start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise DaemonError(f"mtls-milter not started after {self.start_timeout}s")
            time.sleep(0.02)
        self._wait_accepting(deadline)

    def _wait_accepting(self, deadline: float) -> None:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise DaemonError(f"mtls-milter does not accept on {self.socket}") from None
                time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; return the exit status."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the daemon (a crash as the MTA sees it) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)

    def restart(self) -> None:
        """Stop (if running) and start again on the same socket with the current config file."""
        self.stop()
        self.start()

    def reload(self, config: ConfigMapping | None = None, timeout: float = 10.0) -> bool:
        """Rewrite the configuration (when given), send SIGHUP and wait for the outcome.

        Returns True when the daemon logged ``reloaded:``, False for ``reload refused``.
        """
        if config is not None:
            self._set_config(config)
        return self.signal_reload(timeout)

    def signal_reload(self, timeout: float = 10.0, signum: int = signal.SIGHUP) -> bool:
        """Signal the daemon to reload (config file as it is; SIGHUP unless ``signum`` says
        otherwise) and wait for ``reloaded:``/``refused``."""
        if self._proc is None or self._proc.poll() is not None:
            raise DaemonError("mtls-milter is not running")
        text = self.log_text()
        before = (text.count(_RELOADED), text.count(_REFUSED))
        self._proc.send_signal(signum)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if text.count(_RELOADED) > before[0]:
                return True
            if text.count(_REFUSED) > before[1]:
                return False
            if self._proc.poll() is not None:
                name = signal.Signals(signum).name
                raise DaemonError(f"mtls-milter exited on {name}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DaemonError(f"no reload outcome after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)

    # -- logs -----------------------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything the daemon wrote (stderr and stdout), across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def verdicts(self) -> list[dict[str, Any]]:
        """The JSON records of the ``verdict {...}`` log lines, oldest first."""
        records: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            _, sep, payload = line.partition(" mtls_milter: verdict ")
            if sep:
                with contextlib.suppress(ValueError):
                    records.append(json.loads(payload))
        return records
