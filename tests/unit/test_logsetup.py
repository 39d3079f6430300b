"""Journal priorities: ``<N>`` prefixes only when stderr is the stream JOURNAL_STREAM names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtls_milter.runtime.logsetup import stream_is_journal

CHILD = (
    "import logging\n"
    "from mtls_milter.runtime.logsetup import configure_logging\n"
    "configure_logging('debug')\n"
    "log = logging.getLogger('mtls_milter.test')\n"
    "log.debug('d'); log.info('i'); log.warning('w'); log.error('e\\nsecond line')\n"
)


def _run(tmp_path: Path, journal_stream: str | None) -> list[str]:
    out = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with out.open("w") as stderr:
        if journal_stream == "this":
            stat = os.fstat(stderr.fileno())
            journal_stream = f"{stat.st_dev}:{stat.st_ino}"
        if journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        subprocess.run([sys.executable, "-c", CHILD], stderr=stderr, env=env, check=True)
    return out.read_text().splitlines()


def test_priorities_when_stderr_is_the_journal(tmp_path: Path) -> None:
    assert _run(tmp_path, "this") == [
        "<7>DEBUG mtls_milter.test: d",
        "<6>INFO mtls_milter.test: i",
        "<4>WARNING mtls_milter.test: w",
        "<3>ERROR mtls_milter.test: e",
        "<3>second line",
    ]


@pytest.mark.parametrize("value", [None, "1:2", "garbage", ""])
def test_no_prefix_on_a_terminal_or_file(value: str | None, tmp_path: Path) -> None:
    assert _run(tmp_path, value)[:2] == [
        "DEBUG mtls_milter.test: d",
        "INFO mtls_milter.test: i",
    ]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_journal_stream_value_is_handled(value: str) -> None:
    assert stream_is_journal(sys.stderr, {"JOURNAL_STREAM": value}) in (True, False)
