"""Journal priorities: ``<N>`` prefixes only when stderr is the stream JOURNAL_STREAM names."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.dnsserver import TestDnsServer
from support.milter_client import MilterClient
from support.pki import TestPki

from mtls_milter.runtime.logsetup import LOG_FORMAT, JsonFormatter, stream_is_journal

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


POSTFIX_TRUSTED = {
    "{tls_version}": "TLSv1.3",
    "{cert_subject}": "out.sender.test",
    "{cert_issuer}": "Test Intermediate CA",
}


def test_serve_with_log_format_json_writes_one_json_object_per_line(
    tmp_path: Path, dns_server: TestDnsServer, pki: TestPki
) -> None:
    """Every line is a JSON object; the verdict's fields are members, not a string inside."""
    dns_server.add("sender.test", 265, "10 out.sender.test.")
    sock = tmp_path / "m.sock"
    config = tmp_path / "c.toml"
    config.write_text(
        f'[milter]\nsocket = "unix:{sock}"\nauthserv_id = "mx.receiver.test"\n'
        f'[dns]\nnameservers = ["{dns_server.nameserver}"]\n'
        f'[tls]\ntrust = ["{pki.root_path}"]\n'
    )
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "mtls_milter", "serve", "--config", str(config)]
    with log_path.open("wb") as sink:
        daemon = subprocess.Popen([*command, "--log-format", "json"], stderr=sink)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline and daemon.poll() is None:
            time.sleep(0.02)
        with MilterClient.connect(str(sock)) as client:
            client.optneg()
            client.connect_info("out.sender.test", "192.0.2.25")
            client.macro(b"M", POSTFIX_TRUSTED)
            client.mail("<a@sender.test>")
            client.data()
            client.header("Subject", "hi")
            client.eoh()
            client.eom()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    assert records[0]["message"].startswith("started: ")
    [verdict] = [r for r in records if r["message"] == "verdict"]
    assert (verdict["level"], verdict["logger"]) == ("INFO", "mtls_milter")
    assert verdict["result"] == "pass"
    assert verdict["hosts"] == ["out.sender.test"]
    assert set(verdict["timings_ms"]) == {"dns", "chain", "total"}


def test_text_format_keeps_the_verdict_as_one_json_text() -> None:
    record = logging.LogRecord("mtls_milter", logging.INFO, "", 0, "verdict %s", ("{}",), None)
    record.fields = {"result": "pass"}
    assert logging.Formatter(LOG_FORMAT).format(record) == "INFO mtls_milter: verdict {}"
    assert json.loads(JsonFormatter().format(record)) == {
        "level": "INFO",
        "logger": "mtls_milter",
        "message": "verdict {}",
        "result": "pass",
    }
