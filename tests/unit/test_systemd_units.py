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
NAMES = [
    "mtls-milter.service",
    "mtls-milter-policy-map.service",
    "mtls-milter-acme-respond.service",
]


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
    assert unit["Service"]["MemoryDenyWriteExecute"] == "yes"  # the chain fetch survives it
    assert unit["Service"]["SyslogFacility"] == "mail"
    assert unit["Service"]["User"] == "mtls-milter"


def test_the_milter_writes_its_socket_in_postfix_chroot() -> None:
    service = _unit("mtls-milter.service")["Service"]
    assert service["ReadWritePaths"] == "-/var/spool/postfix/mtls-milter"
    assert service["CapabilityBoundingSet"] == ""  # no setgroups: the directory sets the group


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


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="no systemd-sysusers/systemd-tmpfiles",
)
def test_sysusers_and_tmpfiles_make_the_socket_directory(tmp_path: Path) -> None:
    """Applied to a scratch root (never the host): the user, and the set-group-ID directory
    owned by it with group postfix."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (tmp_path / "postfix.conf").write_text("g postfix -\n")  # what the postfix package makes
    for command in (
        ["systemd-sysusers", f"--root={root}", str(tmp_path / "postfix.conf")],
        ["systemd-sysusers", f"--root={root}", str(UNITS / "mtls-milter.sysusers")],
        ["systemd-tmpfiles", f"--root={root}", "--create", str(UNITS / "mtls-milter.tmpfiles")],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stderr)
    users = dict(line.split(":")[:3:2] for line in (root / "etc/passwd").read_text().splitlines())
    groups = dict(line.split(":")[:3:2] for line in (root / "etc/group").read_text().splitlines())
    directory = (root / "var/spool/postfix/mtls-milter").stat()
    assert (directory.st_uid, directory.st_gid, oct(directory.st_mode & 0o7777)) == (
        int(users["mtls-milter"]),
        int(groups["postfix"]),
        "0o2750",
    )
