"""tests/e2e/install_mtas.sh (run by ``make test`` as root) decides what to install from dpkg's
status and never installs an MTA that conflicts with the host's one. The script runs here with
dpkg-query, apt-get and id replaced by fakes on $PATH: nothing is installed or removed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tests" / "e2e" / "install_mtas.sh"
CLIENTS = [
    "m4",
    "swaks",
    "libnet-ssleay-perl",
    "miltertest",
    "libdb5.3",
    "libldap-2.5-0",
    "liblockfile1",
    "libnsl2",
    "libsasl2-2",
    "libssl3",
    "libwrap0",
]


def _status(*rows: tuple[str, str]) -> str:
    """dpkg-query rows "package<TAB>status<TAB>provides" for installed packages."""
    return "".join(f"{name}\tinstall ok installed\t{provides}\n" for name, provides in rows)


def _fake_bin(tmp_path: Path, dpkg_rows: str, simulation: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "dpkg.txt").write_text(dpkg_rows)
    (tmp_path / "sim.txt").write_text(simulation)
    log = tmp_path / "calls.log"
    scripts = {
        "dpkg-query": f'cat "{tmp_path}/dpkg.txt"\n',
        "id": "echo 0\n",
        "apt-get": f'echo "apt-get $*" >> "{log}"\n'
        f'case " $* " in *" -s "*) cat "{tmp_path}/sim.txt" ;; esac\n',
        "apt-cache": f'echo "apt-cache $*" >> "{log}"\n',
        "debconf-set-selections": f'echo "debconf $*" >> "{log}"\n',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    return bin_dir


def _run(tmp_path: Path, dpkg_rows: str, *args: str, simulation: str = "") -> tuple[int, str]:
    bin_dir = _fake_bin(tmp_path, dpkg_rows, simulation)
    sendmail = tmp_path / "sendmail"
    binary = sendmail / "usr/libexec/sendmail/sendmail"
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    binary.chmod(0o755)
    (sendmail / ".unpacked").write_text("")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "MTLS_SENDMAIL_ROOT": str(sendmail),
        "HOME": os.environ.get("HOME", "/"),
    }
    done = subprocess.run(
        ["sh", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60
    )
    return done.returncode, done.stdout + done.stderr


def _calls(tmp_path: Path) -> str:
    log = tmp_path / "calls.log"
    return log.read_text() if log.exists() else ""


def test_ci_host_without_mta_installs_postfix(tmp_path: Path) -> None:
    rc, out = _run(tmp_path, _status(("coreutils", "")), "--plan")
    assert rc == 0
    assert "install: postfix (no mail transport agent on this host)" in out
    assert f"install: postfix {' '.join(CLIENTS)}" in out


def test_postfix_host_uses_the_installed_package(tmp_path: Path) -> None:
    rows = _status(("postfix", "mail-transport-agent"), *((c, "") for c in CLIENTS))
    rc, out = _run(tmp_path, rows, "--plan")
    assert rc == 0
    assert out.splitlines() == [
        "use: postfix (installed on this host; the tests run private instances)"
    ]


@pytest.mark.parametrize(
    "mta", ["sendmail-bin", "exim4-daemon-light", "opensmtpd"], ids=lambda m: m
)
def test_host_with_another_mta_never_gets_postfix(mta: str, tmp_path: Path) -> None:
    rows = _status((mta, "mail-transport-agent, mail-transport-agent (= 1)"))
    rows += _status(*((c, "") for c in CLIENTS))
    rc, out = _run(tmp_path, rows)
    assert rc == 0
    assert out.strip() == (
        f"install_mtas: skip: postfix: not installed, and this host's mail transport agent "
        f"({mta}) conflicts with it; installing it would remove {mta}, so the Postfix "
        "end-to-end tests will be skipped"
    )
    assert _calls(tmp_path) == ""  # not even apt-get update


def test_refuses_when_apt_would_remove_a_package(tmp_path: Path) -> None:
    rows = _status(("coreutils", ""))  # no MTA: postfix and the clients are planned
    simulation = "Remv exim4-base [4.96]\nInst postfix (3.7.11 Debian [amd64])\n"
    rc, out = _run(tmp_path, rows, simulation=simulation)
    assert rc == 1
    assert "install_mtas: refusing to install postfix m4" in out
    assert out.rstrip().endswith("apt would remove exim4-base")
    calls = _calls(tmp_path)
    assert "install -s " in calls
    assert "install -y" not in calls and "debconf" not in calls  # nothing installed or set


def test_nothing_to_do_touches_nothing(tmp_path: Path) -> None:
    rows = _status(("postfix", "mail-transport-agent"), *((c, "") for c in CLIENTS))
    rc, out = _run(tmp_path, rows)
    assert (rc, out, _calls(tmp_path)) == (0, "", "")
