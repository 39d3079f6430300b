"""The example systemd units: restarted promptly after any crash, enough descriptors, reload by
SIGUSR1 — and valid for ``systemd-analyze verify`` where it is installed."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "examples" / "systemd"
NAMES = ["mtls-milter.service", "mtls-milter-policy-map.service"]


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


@pytest.mark.parametrize("name", NAMES)
def test_restarts_promptly_forever_with_enough_descriptors(name: str) -> None:
    unit = _unit(name)
    assert unit["Service"]["Restart"] == "always"  # SIGSEGV, and libmilter returning status 0
    assert unit["Service"]["RestartSec"] == "1s"
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"  # never give up after 5 quick crashes
    assert int(unit["Service"]["LimitNOFILE"]) >= 65536
    assert unit["Service"]["MemoryDenyWriteExecute"] == "yes"


def test_the_milter_reloads_by_sigusr1() -> None:
    assert _unit("mtls-milter.service")["Service"]["ExecReload"] == "/bin/kill -USR1 $MAINPID"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("name", NAMES)
def test_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    executable = Path(sys.executable).parent / "mtls-milter"
    if not executable.exists():
        pytest.skip("mtls-milter is not installed in this environment")
    text = (UNITS / name).read_text().replace("/opt/mtls-milter/bin/mtls-milter", str(executable))
    (tmp_path / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
