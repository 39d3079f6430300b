"""A real Prometheus server for end-to-end tests, run privately on loopback.

The binaries come from Debian's ``prometheus`` package unpacked (never installed) by
``tests/e2e/install_prometheus.sh`` into ``$MTLS_PROMETHEUS_ROOT`` (default
``/opt/mtls-test/prometheus``); one on ``PATH`` is used otherwise. Each server gets its own
configuration file and storage directory under the test's temporary directory and scrapes the
given targets every second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from support.lifecycle import Running
from support.ports import free_port, wait_for_port

PROMETHEUS_ROOT = Path(os.environ.get("MTLS_PROMETHEUS_ROOT", "/opt/mtls-test/prometheus"))
INSTALL_HINT = "run tests/e2e/install_prometheus.sh (unpacks Debian's prometheus package)"


def binary(name: str = "prometheus") -> Path | None:
    """The ``prometheus`` or ``promtool`` binary: the private unpacked one, else on PATH."""
    private = PROMETHEUS_ROOT / "usr" / "bin" / name
    if private.is_file() and os.access(private, os.X_OK):
        return private
    found = shutil.which(name)
    return Path(found) if found else None


def require(name: str = "prometheus") -> Path:
    """The binary, or skip loudly; under CI (``CI=true``) fail instead: there it must run."""
    path = binary(name)
    if path is not None:
        return path
    reason = f"{name} not found under {PROMETHEUS_ROOT} nor on PATH: {INSTALL_HINT}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class PrometheusServer(Running):
    """``prometheus`` scraping ``targets`` (HOST:PORT) every second; a context manager."""

    def __init__(self, workdir: Path, targets: list[str], *, job: str = "mtls-milter") -> None:
        self.binary = require("prometheus")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._targets = targets
        self._job = job
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "prometheus.log"

    def start(self) -> PrometheusServer:
        """Write the scrape config, start Prometheus and wait until it is ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        targets = ", ".join(json.dumps(t) for t in self._targets)
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: {json.dumps(self._job)}\n"
            f"    static_configs:\n      - targets: [{targets}]\n"
        )
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    str(self.binary),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        try:
            wait_for_port(self.port, timeout=30)
            self._wait_ready()
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` (``/api/v1/query``): [{"metric": {...}, "value": ...}]."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single sample of ``expr``, or None when the vector is empty."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for_value(self, expr: str, expected: float, timeout: float = 20.0) -> float | None:
        """Poll ``expr`` until it equals ``expected`` (or time runs out); the last value."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.value(expr)
            if got == expected or time.monotonic() > deadline:
                return got
            time.sleep(0.25)
