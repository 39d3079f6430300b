"""The MTA examples: the milter on a unix socket only the MTA can reach, and main.cf snippets
Postfix can read (no trailing comments: Postfix makes them part of the value)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mtls_milter.config import load_config

ROOT = Path(__file__).resolve().parents[2]
POSTFIX = ROOT / "examples" / "postfix"
MAIN_CF_EXAMPLES = sorted(POSTFIX.glob("main.cf.*"))
POSTCONF = shutil.which("postconf") or (
    "/usr/sbin/postconf" if Path("/usr/sbin/postconf").exists() else None
)


def _readme_main_cf_snippet() -> str:
    """The indented main.cf block of the README's "Short version for Postfix"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("Short version for Postfix (`main.cf`):", 1)[1].split("\n\n")[1]
    return "\n".join(line[4:] for line in block.splitlines())


def _value_lines(text: str) -> list[str]:
    """Parameter and continuation lines (everything but comments and blank lines)."""
    return [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


@pytest.mark.parametrize(
    "text",
    [p.read_text(encoding="utf-8") for p in MAIN_CF_EXAMPLES] + [_readme_main_cf_snippet()],
    ids=[p.name for p in MAIN_CF_EXAMPLES] + ["README.md"],
)
def test_main_cf_snippets_have_no_trailing_comments(text: str) -> None:
    assert _value_lines(text)
    for line in _value_lines(text):
        assert "#" not in line, f"a trailing comment becomes part of the value: {line!r}"


def test_postfix_reaches_the_milter_on_the_unix_socket_of_the_example_config() -> None:
    config = load_config(ROOT / "examples" / "mtls-milter.toml")
    assert config.milter.socket == "unix:/var/spool/postfix/mtls-milter/milter.sock"
    assert config.milter.socket_mode == "0660"
    main_cf = (POSTFIX / "main.cf.inbound").read_text(encoding="utf-8")
    # smtpd runs chrooted in /var/spool/postfix: the same socket, seen from inside the chroot
    assert "\nsmtpd_milters = { unix:/mtls-milter/milter.sock, default_action=accept }\n" in main_cf
    assert "install -d -o mtls-milter -g postfix -m 2750 /var/spool/postfix/mtls-milter" in main_cf
    assert "smtpd_milters = { unix:/mtls-milter/milter.sock, default_action=accept }" in (
        _readme_main_cf_snippet()
    )


def test_sendmail_reaches_the_milter_on_a_unix_socket() -> None:
    mc = (ROOT / "examples" / "sendmail" / "sendmail.mc").read_text(encoding="utf-8")
    filters = re.findall(r"^INPUT_MAIL_FILTER\(`mtls', `S=([^,]+),", mc, re.MULTILINE)
    assert filters == ["unix:/run/mtls-milter/milter.sock"]
    unit = (ROOT / "examples" / "systemd" / "mtls-milter.service").read_text(encoding="utf-8")
    assert "\nRuntimeDirectory=mtls-milter\n" in unit  # /run/mtls-milter exists


@pytest.mark.skipif(POSTCONF is None, reason="Postfix is not installed")
@pytest.mark.parametrize("path", MAIN_CF_EXAMPLES, ids=[p.name for p in MAIN_CF_EXAMPLES])
def test_postconf_reads_the_examples(path: Path, tmp_path: Path) -> None:
    """Every parameter reads back from Postfix exactly as written (nothing swallowed)."""
    assert POSTCONF is not None
    (tmp_path / "main.cf").write_text(path.read_text(encoding="utf-8"))
    (tmp_path / "master.cf").write_text("")
    done = subprocess.run(
        [POSTCONF, "-c", str(tmp_path), "-n"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    got = dict(line.split(" = ", 1) for line in done.stdout.splitlines() if " = " in line)
    names = [
        line.split("=", 1)[0].strip()
        for line in _value_lines(path.read_text(encoding="utf-8"))
        if not line[0].isspace()
    ]
    assert names and all(name in got for name in names), (names, got)
