"""``mtls-milter explain`` on the in-process DNS server: steps, exit codes, JSON, hostile lines."""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support.dnsserver import TestDnsServer
from support.pki import TestPki

from mtls_milter.cli.explain import search
from mtls_milter.cli.explain_line import LoggedVerdict, parse_verdict_line
from mtls_milter.cli.main import main
from mtls_milter.config import ChainFetchConfig, Config, DnsConfig, TlsConfig
from mtls_milter.engine import Engine
from mtls_milter.errors import InputError
from mtls_milter.inbound.session import EngineHolder, MilterSession
from mtls_milter.runtime.logsetup import LOG_FORMAT, JsonFormatter

SYSLOG_PREFIX = "Nov 29 23:00:01 mx mtls-milter[4242]: INFO mtls_milter: "


def verdict_line(prefix: str = SYSLOG_PREFIX, **fields: Any) -> str:
    """A verdict line as the daemon writes it (session.py), behind a log writer's prefix."""
    record: dict[str, Any] = {
        "queue_id": "4XyZ1",
        "client": "192.0.2.7",
        "helo": "out.sender.test",
        "domain": "sender.test",
        "result": "pass",
        "reason": "certificate name out.sender.test matches client-mx host out.sender.test",
        "evidence": "chain",
        "names": ["out.sender.test"],
        "matched": "out.sender.test",
        "chain": "",
        "action": "accept",
        "dry_run": False,
        "elapsed_ms": 1.5,
    }
    record.update(fields)
    return prefix + "verdict " + json.dumps(record, separators=(",", ":"))


MISMATCH: dict[str, Any] = {
    "result": "fail",
    "reason": "no certificate name matches Client MX",
    "names": ["bad.sender.test", "*.sender.test"],
    "matched": "",
    "action": "reject",
}


@pytest.fixture
def sender_dns(dns_server: TestDnsServer) -> TestDnsServer:
    dns_server.add("sender.test", 265, "10 out.sender.test.", ttl=600)
    return dns_server


def explain(
    capsys: pytest.CaptureFixture[str],
    dns: TestDnsServer,
    *args: str,
    stdin: str | None = None,
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> tuple[int, str, str]:
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main(["explain", *args, "--dns", dns.nameserver])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_a_name_mismatch_shows_each_comparison_and_agrees(
    capsys: pytest.CaptureFixture[str], sender_dns: TestDnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = verdict_line(**MISMATCH)
    status, out, _ = explain(capsys, sender_dns, "-", stdin=line + "\n", monkeypatch=monkeypatch)
    assert status == 0, out
    assert "1. Logged at Nov 29 23:00:01, queue id 4XyZ1:" in out
    assert "client 192.0.2.7, HELO out.sender.test, domain sender.test" in out
    assert "mtls=fail: no certificate name matches Client MX [name_mismatch]" in out
    assert "action reject" in out
    assert "2. Client MX of sender.test now: ok" in out
    assert "hosts now:    out.sender.test" in out
    assert "bad.sender.test vs out.sender.test: no, a different name" in out
    assert (
        "*.sender.test vs out.sender.test: no, a wildcard name, and [tls] allow_wildcards is "
        "off: it matches nothing"
    ) in out
    assert "5. Verdict now: mtls=fail: no certificate name matches Client MX [name_mismatch]" in out
    assert "   agrees with the log" in out
    assert "what to do: the partner must publish the certificate's name in Client MX" in out
    assert "mtls-milter check --mail-from postmaster@sender.test --chain PARTNER-CHAIN.pem" in out


def test_a_name_in_another_spelling_is_compared_normalized(
    capsys: pytest.CaptureFixture[str], sender_dns: TestDnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The milter logs normalized names; a hand-edited line shows how the core reads one."""
    line = verdict_line(**{**MISMATCH, "names": ["OUT.Sender.test."]})
    status, out, _ = explain(capsys, sender_dns, "-", stdin=line, monkeypatch=monkeypatch)
    assert status == 1
    assert (
        "OUT.Sender.test. vs out.sender.test: MATCH, read as out.sender.test (lower case, "
        "A-labels, no final dot); the same name"
    ) in out


def test_wildcards_allowed_now_make_the_logged_fail_a_pass(
    capsys: pytest.CaptureFixture[str],
    sender_dns: TestDnsServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    config = tmp_path / "mtls-milter.toml"
    config.write_text("[tls]\nallow_wildcards = true\n")
    line = verdict_line(**{**MISMATCH, "names": ["*.sender.test"]})
    sender_dns.add("sender.test", 265, "10 out.sender.test.", "20 a.b.sender.test.")
    status, out, _ = explain(
        capsys, sender_dns, "-", "--config", str(config), stdin=line, monkeypatch=monkeypatch
    )
    assert status == 1, out
    assert (
        "*.sender.test vs out.sender.test: MATCH, the wildcard stands for the one label "
        "before sender.test"
    ) in out
    assert "*.sender.test vs a.b.sender.test: no, a wildcard stands for exactly one label" in out
    assert "CHANGED: result fail (name_mismatch) then, pass (ok) now" in out


def test_a_pass_whose_record_changed_since_exits_1_and_says_what_changed(
    capsys: pytest.CaptureFixture[str], dns_server: TestDnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns_server.add("sender.test", 265, "10 new.sender.test.")
    line = verdict_line(hosts=["out.sender.test"], ttl=3600)
    status, out, _ = explain(capsys, dns_server, "-", stdin=line, monkeypatch=monkeypatch)
    assert status == 1, out
    assert "hosts then:   out.sender.test, TTL 3600 s (DIFFERENT)" in out
    assert "CHANGED: published hosts changed: added new.sender.test; removed out.sender.test" in out
    assert (
        "CHANGED: result pass (ok) then, fail (name_mismatch) now: "
        "no certificate name matches Client MX"
    ) in out
    assert "out.sender.test vs new.sender.test: no, a different name" in out
    assert "action under the current policy: accept" in out  # on_fail = annotate by default


def test_json_shape(
    capsys: pytest.CaptureFixture[str], dns_server: TestDnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns_server.add("sender.test", 265, "10 new.sender.test.")
    line = verdict_line(hosts=["out.sender.test"], timings_ms={"dns": 1.25})
    status, out, _ = explain(capsys, dns_server, "-", "--json", stdin=line, monkeypatch=monkeypatch)
    assert status == 1
    report = json.loads(out)
    assert set(report) == {
        "logged", "client_mx", "comparison", "certificate", "now", "action_now", "agrees",
        "changes", "hint", "hint_now",
    }  # fmt: skip
    assert report["logged"]["queue_id"] == "4XyZ1"
    assert report["logged"]["reason_class"] == "ok"
    assert report["logged"]["timings_ms"] == {"dns": 1.25}
    assert report["client_mx"]["status"] == "ok"
    assert report["client_mx"]["hosts"] == ["new.sender.test"]
    assert report["client_mx"]["logged_hosts"] == ["out.sender.test"]
    assert report["comparison"]["checks"] == [
        {"name": "out.sender.test", "host": "new.sender.test", "matches": False,
         "why": "a different name"},
    ]  # fmt: skip
    assert report["now"]["result"] == "fail"
    assert report["now"]["reason_class"] == "name_mismatch"
    assert report["action_now"] == "accept"
    assert report["agrees"] is False
    assert report["certificate"]["rechecked"] is False
    assert report["hint_now"].startswith("the partner must publish")


def test_queue_id_found_in_a_syslog_file_and_not_found(
    capsys: pytest.CaptureFixture[str], sender_dns: TestDnsServer, tmp_path: Path
) -> None:
    log = tmp_path / "mail.log"
    other = verdict_line(queue_id="OTHER1", domain="other.test", result="none")
    log.write_text(
        "Nov 29 23:00:00 mx postfix/smtpd[9]: 4XyZ1: client=out.sender.test[192.0.2.7]\n"
        f"{other}\n{verdict_line(action='accept')}\n"
        "Nov 29 23:00:02 mx postfix/qmgr[8]: 4XyZ1: removed\n"
    )
    status, out, err = explain(capsys, sender_dns, "4XyZ1", "--log", str(log))
    assert status == 0, err
    assert "queue id 4XyZ1" in out
    assert "agrees with the log" in out
    status, out, err = explain(capsys, sender_dns, "NOPE42", "--log", str(log))
    assert status == 3
    assert out == ""
    assert err == f"mtls-milter: no verdict line for queue id NOPE42 in {log}\n"


def test_a_gzipped_rotated_log_and_an_iso_time(
    capsys: pytest.CaptureFixture[str], sender_dns: TestDnsServer, tmp_path: Path
) -> None:
    log = tmp_path / "mail.log.1.gz"
    prefix = "2026-11-29T23:00:01+0000 mx mtls-milter[4242]: INFO mtls_milter: "
    log.write_bytes(gzip.compress((verdict_line(prefix) + "\n").encode()))
    status, out, _ = explain(capsys, sender_dns, "4XyZ1", "--log", str(log))
    assert status == 0
    assert "1. Logged at 2026-11-29T23:00:01+0000, queue id 4XyZ1:" in out


def test_a_dns_failure_then_and_a_record_now_cannot_be_decided(
    capsys: pytest.CaptureFixture[str], sender_dns: TestDnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = verdict_line(
        result="temperror",
        reason="Client MX lookup failed: SERVFAIL from 192.0.2.53:53",
        evidence="none",
        names=[],
        matched="",
    )
    status, out, _ = explain(capsys, sender_dns, "-", stdin=line, monkeypatch=monkeypatch)
    assert status == 1
    assert "5. Verdict now: cannot tell: the log holds no certificate facts for it" in out
    assert "CHANGED: the evaluation now needs the certificate" in out


def test_not_opted_in_then_and_now_agrees(
    capsys: pytest.CaptureFixture[str], dns_server: TestDnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = verdict_line(
        result="none", reason="sender.test does not publish Client MX; no TLS", evidence="none",
        names=[], matched="",
    )  # fmt: skip
    status, out, _ = explain(capsys, dns_server, "-", stdin=line, monkeypatch=monkeypatch)
    assert status == 0, out
    assert "2. Client MX of sender.test now: not-found (" in out
    assert "NXDOMAIN" in out
    assert "mtls=none: sender.test does not publish Client MX; no TLS [not_opted_in]" in out


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ("hello world\n", "no verdict line on stdin"),
        ('x verdict {"result":"pass"', "the verdict's JSON is broken or cut off"),
        (verdict_line(result="maybe"), "'result' is not an mtls result: 'maybe'"),
        (verdict_line(names="out.sender.test"), "the verdict's 'names' is not a list of strings"),
        (verdict_line(domain="bad domain!"), "the verdict's domain 'bad domain!' is unusable"),
        (verdict_line() + " trailing", "text after the verdict's JSON: 'trailing'"),
        (verdict_line(ttl=10**400), "the verdict's 'ttl' is not a number"),
        (verdict_line(timings_ms={"dns": 10**400}), "'timings_ms' holds a value that is not"),
    ],
)
def test_garbage_on_stdin_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
    dns_server: TestDnsServer,
    monkeypatch: pytest.MonkeyPatch,
    stdin: str,
    message: str,
) -> None:
    status, out, err = explain(capsys, dns_server, "-", stdin=stdin, monkeypatch=monkeypatch)
    assert status == 2
    assert out == ""
    assert err.startswith("mtls-milter: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_garbage_on_stdin_as_a_subprocess_has_no_traceback(dns_server: TestDnsServer) -> None:
    command = [sys.executable, "-m", "mtls_milter", "explain", "-", "--dns", dns_server.nameserver]
    done = subprocess.run(
        command, input="\x00\xff verdict {{{", capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("mtls-milter: error: the verdict's JSON is broken or cut off")
    assert "Traceback" not in done.stderr


def test_an_unreadable_line_for_the_queue_id_is_an_input_error(tmp_path: Path) -> None:
    lines = [SYSLOG_PREFIX + 'verdict {"queue_id":"4XyZ1","resu']
    with pytest.raises(InputError, match="the verdict line for 4XyZ1 is unreadable"):
        search(lines, "4XyZ1")
    assert search([*lines, verdict_line()], "4XyZ1") is not None  # a readable one wins


def test_a_bad_queue_id_and_a_missing_log_are_usage_errors(
    capsys: pytest.CaptureFixture[str], dns_server: TestDnsServer, tmp_path: Path
) -> None:
    status, _, err = explain(capsys, dns_server, "a b", "--log", str(tmp_path / "x"))
    assert (status, err.count("\n")) == (2, 1)
    assert "is not a queue id" in err
    status, _, err = explain(capsys, dns_server, "4XyZ1", "--log", str(tmp_path / "missing.log"))
    assert status == 2
    assert "missing.log: No such file or directory" in err


# --- the line parser: hostile text never raises anything but InputError --------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
FIELDS = ["domain", "result", "reason", "evidence", "names", "hosts", "ttl", "timings_ms",
          "dry_run", "queue_id", "dmarc"]  # fmt: skip
records = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values)


def parse_or_input_error(line: str) -> LoggedVerdict | None:
    try:
        return parse_verdict_line(line)
    except InputError as exc:
        assert "\n" not in str(exc)
        return None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
@example("verdict {")
@example('verdict {"result":"pass","domain":"a.test","reason":"x"}')
@example("verdict " + "[" * 5000)
@example('verdict {"result":"pass","domain":"a.test","reason":"x","ttl":NaN}')
def test_arbitrary_text_lines_never_raise(line: str) -> None:
    parse_or_input_error(line)
    parse_or_input_error(SYSLOG_PREFIX + "verdict " + line)


@settings(max_examples=200, deadline=None)
@given(records)
def test_arbitrary_json_records_never_raise(record: dict[str, Any]) -> None:
    logged = parse_or_input_error(SYSLOG_PREFIX + "verdict " + json.dumps(record))
    if logged is not None:
        json.dumps(logged.as_dict(), allow_nan=False)  # what --json prints stays JSON


def test_a_json_format_line_and_unchanged_hosts(
    capsys: pytest.CaptureFixture[str], sender_dns: TestDnsServer, tmp_path: Path
) -> None:
    """``serve --log-format json`` writes the fields as members of one object per line."""
    record = json.loads(verdict_line(prefix="").removeprefix("verdict "))
    line = json.dumps({"level": "INFO", "logger": "mtls_milter", "message": "verdict", **record})
    log = tmp_path / "mtls-milter.log"
    log.write_text(f"<6>{line}\n".replace("}", ',"hosts":["out.sender.test"]}', 1))
    status, out, err = explain(capsys, sender_dns, "4XyZ1", "--log", str(log))
    assert status == 0, err
    assert "hosts then:   out.sender.test (same)" in out
    assert "out.sender.test vs out.sender.test: MATCH, the same name" in out


def test_hostile_values_are_printed_clipped_and_escaped(
    capsys: pytest.CaptureFixture[str], sender_dns: TestDnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = verdict_line(
        **{**MISMATCH, "names": ["\x1b[2Jevil" + "x" * 500], "helo": "h\r\nX-Injected: 1"}
    )
    status, out, _ = explain(capsys, sender_dns, "-", stdin=line, monkeypatch=monkeypatch)
    assert status == 0
    assert "\x1b" not in out
    assert "\\x1b[2Jevil" in out
    assert "HELO h\\r\\nX-Injected: 1," in out
    assert all(len(row) < 700 for row in out.splitlines())


def test_the_example_in_the_troubleshooting_guide_is_true(
    capsys: pytest.CaptureFixture[str], dns_server: TestDnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/troubleshooting.md shows a command and its output; the demo DNS publishes this."""
    guide = (Path(__file__).parents[2] / "docs" / "troubleshooting.md").read_text()
    pattern = r"^echo '(.*)' \| \.venv/bin/mtls-milter explain - --dns 127\.0\.0\.1:5399$"
    command = re.search(pattern, guide, re.M)
    assert command is not None
    shown = re.search(r"\n```\n\n```\n(1\. Logged.*?)```\n", guide[command.end() :], re.S)
    assert shown is not None
    dns_server.add("sender.example", 265, "10 out.sender.example.")  # what `make demo` serves
    status, out, _ = explain(capsys, dns_server, "-", stdin=command[1], monkeypatch=monkeypatch)
    assert status == 0
    # A resolver that reports the answer's TTL adds it to step 2; the guide shows none.
    assert re.sub(r"(now: ok), TTL \d+ s", r"\1", out) == shown[1]


def test_the_action_under_the_given_policy_and_a_dry_run(
    capsys: pytest.CaptureFixture[str],
    sender_dns: TestDnsServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    config = tmp_path / "mtls-milter.toml"
    config.write_text('[policy]\non_fail = "reject"\ndry_run = true\n')
    line = verdict_line(**{**MISMATCH, "dry_run": True})
    status, out, _ = explain(
        capsys, sender_dns, "-", "--config", str(config), stdin=line, monkeypatch=monkeypatch
    )
    assert status == 0
    assert "   action reject (dry run)\n" in out
    assert "action under the current policy: accept (dry run; would reject)\n" in out
    assert "[policy] differs" not in out
    config.write_text('[policy]\non_fail = "annotate"\n')
    monkeypatch.setattr(sys, "stdin", io.StringIO(line))
    assert main(["explain", "-", "--config", str(config), "--dns", sender_dns.nameserver]) == 0
    out = capsys.readouterr().out
    assert "(logged action reject: the daemon's [policy] differs; --config?)" in out


def test_without_log_the_journal_then_the_mail_logs_are_searched(
    capsys: pytest.CaptureFixture[str],
    sender_dns: TestDnsServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    journalctl = bin_dir / "journalctl"
    prefix = "2026-11-29T23:00:01+0000 mx mtls-milter[4242]: "
    journal_line = verdict_line(prefix + "INFO mtls_milter: ", queue_id="JRNL1")
    journalctl.write_text(
        f"#!/bin/sh\necho \"$*\" > {tmp_path}/args\ncat <<'EOF'\n{journal_line}\nEOF\n"
    )
    journalctl.chmod(0o755)
    mail_log = tmp_path / "mail.log"
    mail_log.write_text(verdict_line(queue_id="FILE1") + "\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr(
        "mtls_milter.cli.explain.DEFAULT_LOG_FILES", (str(mail_log), "/nonexistent")
    )
    status, out, _ = explain(capsys, sender_dns, "JRNL1")
    assert status == 0
    assert "1. Logged at 2026-11-29T23:00:01+0000, queue id JRNL1:" in out
    assert (tmp_path / "args").read_text().split() == [
        "-u", "mtls-milter", "-o", "short-iso", "--no-pager", "-q",
    ]  # fmt: skip
    status, out, _ = explain(capsys, sender_dns, "FILE1")
    assert status == 0
    assert "queue id FILE1" in out
    status, _, err = explain(capsys, sender_dns, "GONE1")
    assert status == 3
    assert err == (
        "mtls-milter: no verdict line for queue id GONE1 in the journal of "
        f"mtls-milter.service, {mail_log}\n"
    )
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("mtls_milter.cli.explain.DEFAULT_LOG_FILES", ("/nonexistent",))
    status, _, err = explain(capsys, sender_dns, "GONE1")
    assert status == 2
    assert "no log to search" in err


FULL_FIELDS: dict[str, Any] = {  # inbound/verdict_log.py writes these besides the basic ones
    "hosts": ["out.sender.test"],
    "hosts_count": 1,
    "ttl": 600,
    "fingerprint_source": "policy_service",
    "timings_ms": {"dns": 1.2, "chain": 0.0, "total": 3.4},
}


def test_a_line_with_hosts_ttl_fingerprint_source_and_timings(
    capsys: pytest.CaptureFixture[str], sender_dns: TestDnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = verdict_line(**FULL_FIELDS)
    status, out, _ = explain(capsys, sender_dns, "-", stdin=line, monkeypatch=monkeypatch)
    assert status == 0, out
    assert "   timings: dns 1.2 ms, chain 0 ms, total 3.4 ms\n" in out
    assert "   hosts then:   out.sender.test, TTL 600 s (same)\n" in out
    assert (
        "4. Certificate and chain, as logged: evidence chain; certificate fingerprint: from the "
        "Postfix policy service\n"
    ) in out


def test_a_line_that_lists_only_the_first_hosts(
    capsys: pytest.CaptureFixture[str], dns_server: TestDnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The milter logs ten hosts at most: the ones it left out are not "added" since."""
    dns_server.add("sender.test", 265, "10 out.sender.test.", "20 a.sender.test.")
    line = verdict_line(**{**FULL_FIELDS, "hosts_count": 2})
    status, out, _ = explain(capsys, dns_server, "-", stdin=line, monkeypatch=monkeypatch)
    assert status == 0, out
    assert (
        "hosts then:   out.sender.test (the first 1 of 2), TTL 600 s (the listed ones remain)"
        in out
    )
    line = verdict_line(**{**FULL_FIELDS, "hosts": ["gone.sender.test"], "hosts_count": 2})
    status, out, _ = explain(capsys, dns_server, "-", stdin=line, monkeypatch=monkeypatch)
    assert status == 1, out
    assert "CHANGED: published hosts changed: added (none); removed gone.sender.test" in out


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_line_the_milter_itself_wrote_is_explained(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    sender_dns: TestDnsServer,
    monkeypatch: pytest.MonkeyPatch,
    pki: TestPki,
    log_format: str,
) -> None:
    """A real MilterSession's verdict line, in either log format, read back by explain."""
    config = Config(
        dns=DnsConfig(nameservers=(sender_dns.nameserver,)),
        tls=TlsConfig(trust=(str(pki.root_path),)),
        chain_fetch=ChainFetchConfig(enabled=False),
    )
    macros = {
        "{tls_version}": "TLSv1.3",
        "{cert_subject}": "bad.sender.test",
        "{cert_issuer}": "CA",
    }
    with ThreadPoolExecutor(2) as executor, caplog.at_level(logging.INFO, logger="mtls_milter"):
        session = MilterSession(EngineHolder(Engine.from_config(config)), executor)
        session.connect("192.0.2.7", "41000")
        session.helo("out.sender.test", macros)
        session.mail("<a@sender.test>", macros)
        session.data()
        session.eom({"i": "4XyZ1"})
    record = next(r for r in caplog.records if r.getMessage().startswith("verdict "))
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(LOG_FORMAT)
    line = "Nov 29 23:00:01 mx mtls-milter[4242]: " + formatter.format(record)
    status, out, _ = explain(capsys, sender_dns, "-", stdin=line, monkeypatch=monkeypatch)
    assert status == 0, out
    assert "mtls=fail: no certificate name matches Client MX [name_mismatch]" in out
    assert re.search(r"hosts then:   out\.sender\.test, TTL \d+ s \(same\)", out), out
    assert "bad.sender.test vs out.sender.test: no, a different name" in out
    assert "5. Verdict now: mtls=fail: no certificate name matches Client MX" in out


def line_of(record: dict[str, Any]) -> str:
    """A verdict line with ``record``'s fields over the usual ones."""
    return verdict_line(SYSLOG_PREFIX, **{k: v for k, v in record.items() if k != "prefix"})


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=120) | records.map(line_of), max_size=6))
def test_searching_arbitrary_logs_never_raises(lines: list[str]) -> None:
    try:
        found = search(lines, "4XyZ1")
    except InputError:
        return
    assert found is None or found.queue_id == "4XyZ1"


def test_with_the_server_mx_fallback_the_names_meet_the_mx_hosts(
    capsys: pytest.CaptureFixture[str],
    dns_server: TestDnsServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    config = tmp_path / "mtls-milter.toml"
    config.write_text("[policy]\nserver_mx_fallback = true\n")
    dns_server.add("sender.test", "MX", "10 mx.sender.test.")
    line = verdict_line(
        reason="certificate name mx.sender.test matches server-mx host mx.sender.test",
        names=["mx.sender.test"], matched="mx.sender.test", hosts=["mx.sender.test"],
    )  # fmt: skip
    status, out, _ = explain(
        capsys, dns_server, "-", "--config", str(config), stdin=line, monkeypatch=monkeypatch
    )
    assert status == 0, out
    assert "   MX hosts now: mx.sender.test ([policy] server_mx_fallback)\n" in out
    assert "3. Certificate names from the log vs the MX hosts now" in out
    assert "mx.sender.test vs mx.sender.test: MATCH, the same name" in out
    assert "hosts then:   mx.sender.test (same)" in out


def test_a_line_with_many_names_compares_the_first_fifty(
    capsys: pytest.CaptureFixture[str], sender_dns: TestDnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"n{i}.sender.test" for i in range(80)]
    line = verdict_line(**{**MISMATCH, "names": names})
    status, out, _ = explain(capsys, sender_dns, "-", stdin=line, monkeypatch=monkeypatch)
    assert status == 0
    assert out.count(" vs out.sender.test: no, a different name") == 50
    assert "   (compared: the first 50 of 80 names and 1 of 1 hosts)\n" in out


def test_an_invalid_chain_is_taken_as_logged(
    capsys: pytest.CaptureFixture[str], sender_dns: TestDnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = verdict_line(
        result="fail", reason="chain invalid: certificate expired at 2026-05-01T00:00:00Z",
        matched="", action="accept", chain="fetched from 192.0.2.7:25",
    )  # fmt: skip
    status, out, _ = explain(capsys, sender_dns, "-", stdin=line, monkeypatch=monkeypatch)
    assert status == 0, out
    assert "out.sender.test vs out.sender.test: MATCH, the same name" in out
    assert (
        "   the milter validated the chain itself: invalid: certificate expired at "
        "2026-05-01T00:00:00Z\n   (so a name that matches above does not make it pass)\n"
    ) in out
    assert "5. Verdict now: mtls=fail: chain invalid: certificate expired at 2026" in out
    assert "what to do: the chain does not validate" in out
