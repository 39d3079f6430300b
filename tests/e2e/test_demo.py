"""``make demo`` runs the README's ``check`` examples as written and each shows ``pass``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_make_demo_target_runs_the_demo() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True)
    assert ".venv/bin/python tests/demo.py" in done.stdout


def test_readme_check_examples_pass() -> None:
    if not (ROOT / ".venv" / "bin" / "mtls-milter").exists():
        pytest.skip("the README's commands use .venv/bin/mtls-milter: run make setup first")
    if not Path("/usr/sbin/dnsmasq").exists():
        pytest.skip("!!! /usr/sbin/dnsmasq is missing: install dnsmasq-base (make setup) !!!")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "demo.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("$ .venv/bin/mtls-milter check ") == 2
    assert '"result": "pass"' in done.stdout and "result:    pass" in done.stdout
    assert done.stdout.endswith("demo: 2 of 2 checks passed\n")
