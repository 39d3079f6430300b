"""The wheel and the sdist: the package with its LICENSE, without the test harness.

Builds both with ``python -m build`` (isolated: it fetches the build backend pyproject.toml
names) into a temporary directory.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build", reason="the build frontend (pip install build) is missing")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_wheel_has_the_package_and_license_only(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"mtls_milter", "mtls_milter-0.1.0.dist-info"}, tops
    assert "mtls_milter-0.1.0.dist-info/licenses/LICENSE" in names
    assert "mtls_milter/cli/main.py" in names
    assert not [n for n in names if "/support/" in n or "/tests/" in n or n.endswith("conftest.py")]


def test_sdist_has_license_docs_examples_man_and_no_tests(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    for wanted in (
        "LICENSE",
        "README.md",
        "docs/operations.md",
        "examples/systemd/mtls-milter.service",
        "man/mtls-milter.8",
        "man/mtls-milter.toml.5",
    ):
        assert wanted in names
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
