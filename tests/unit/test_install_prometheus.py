"""tests/e2e/install_prometheus.sh (run by ``make test`` as root) only downloads Debian's
prometheus package and unpacks it into a private directory: no package is installed, no service
started. It runs here with apt-get and id replaced by fakes on $PATH; the fake apt-get "downloads"
a small .deb built by the test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tests" / "e2e" / "install_prometheus.sh"


@pytest.fixture
def fake_deb(tmp_path: Path) -> Path:
    """prometheus_test_amd64.deb holding usr/bin/prometheus (a script printing a version)."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: prometheus\nVersion: 0.0-test\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: fake\n"
    )
    binary = tree / "usr" / "bin" / "prometheus"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\necho 'prometheus, version 0.0-test'\n")
    binary.chmod(0o755)
    deb = tmp_path / "prometheus_test_all.deb"
    subprocess.run(["dpkg-deb", "-b", str(tree), str(deb)], check=True, capture_output=True)
    return deb


def _run(tmp_path: Path, deb: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    scripts = {
        "id": "echo 0\n",
        "apt-get": f'echo "apt-get $*" >> "{log}"\n'
        f'case " $* " in *" download "*) cp "{deb}" . ;; esac\n',
        "chown": "exit 0\n",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MTLS_PROMETHEUS_ROOT": str(tmp_path / "root"),
    }
    done = subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return done, calls


def test_unpacks_into_its_own_directory_and_installs_nothing(
    tmp_path: Path, fake_deb: Path
) -> None:
    done, calls = _run(tmp_path, fake_deb)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "root" / "usr" / "bin" / "prometheus").is_file()
    assert (tmp_path / "root" / ".unpacked").exists()
    assert calls == ["apt-get download -qq prometheus"]  # no install, no update needed
    assert "no package is installed" in done.stdout


def test_a_second_run_does_nothing(tmp_path: Path, fake_deb: Path) -> None:
    _run(tmp_path, fake_deb)
    (tmp_path / "calls.log").unlink()
    done, calls = _run(tmp_path, fake_deb)
    assert done.returncode == 0 and done.stdout == ""
    assert calls == []
