"""The committed man pages equal the ones generated from the argparse definitions and the
configuration dataclasses (``python -m mtls_milter.cli.manpages man examples/mtls-milter.toml``
regenerates them), and groff renders them without a warning."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from mtls_milter.cli.manpages import command_page, config_page, roff
from mtls_milter.config import Config

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man"
REGENERATE = "python -m mtls_milter.cli.manpages man examples/mtls-milter.toml"


def test_committed_pages_are_the_generated_ones() -> None:
    assert (MAN / "mtls-milter.8").read_text(encoding="utf-8") == command_page(), REGENERATE
    generated = config_page(ROOT / "examples" / "mtls-milter.toml")
    assert (MAN / "mtls-milter.toml.5").read_text(encoding="utf-8") == generated, REGENERATE


def test_every_command_and_key_is_documented() -> None:
    page = command_page()
    for command in ("check", "config-test", "record", "serve", "policy-map", "probe"):
        assert f'.SS "{command}"' in page
    assert '.SS "acme respond"' in page
    config = config_page()
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        if dataclasses.is_dataclass(value):
            for key in dataclasses.fields(value):
                assert f"\\fB{roff(key.name)}\\fR = " in config


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("name", ["mtls-milter.8", "mtls-milter.toml.5"])
def test_groff_renders_without_warnings(name: str) -> None:
    done = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(MAN / name)], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_roff_escapes() -> None:
    assert roff(".start\n'quote\nback\\slash - and … ``lit``") == (
        "\\&.start\n\\&'quote\nback\\eslash \\- and \\[u2026] lit"
    )
