"""Real Postfix and Sendmail: the harness works, and what each MTA tells a milter is re-measured.

A probe milter (``tests/support/probe_milter.py``, a separate process) records every macro per
stage and adds ``X-Probe: 1``; the tests send mail in each TLS case and compare the macros with the
tables below (facts the product's evidence logic relies on, docs/evidence.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes
from pathlib import Path

import pytest
import support
from cryptography.hazmat.primitives.serialization import Encoding
from support.mta import (
    MtaError,
    MtaTls,
    PostfixHarness,
    SendmailHarness,
    SmtpOutcome,
    require_mta,
    send_message,
)
from support.pki import TestPki
from support.ports import free_port, wait_for_port

pytestmark = pytest.mark.e2e

MTAS = ("postfix", "sendmail")
ABSENT = None  # the macro was not sent (getsymval returned None)

SENDER = "someone@sender.test"
RCPT = "user@receiver.test"


def _message(subject: str) -> bytes:
    return (
        f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: {subject}\r\n"
        "Message-ID: <" + subject.replace(" ", ".") + "@sender.test>\r\n\r\nbody\r\n"
    ).encode()


class ProbeMilter:
    """The probe milter in its own process (libmilter is process-global)."""

    def __init__(self, directory: Path, *, symlist: bool = True) -> None:
        self.port = free_port()
        self.out = directory / f"probe-{self.port}.jsonl"
        args = [
            sys.executable,
            str(Path(support.__file__).parent / "probe_milter.py"),
            "--socket",
            f"inet:{self.port}@127.0.0.1",
            "--out",
            str(self.out),
        ]
        if not symlist:
            args.append("--no-symlist")
        self.proc = subprocess.Popen(args)
        wait_for_port(self.port)

    def socket_for(self, kind: str) -> str:
        return f"inet:127.0.0.1:{self.port}" if kind == "postfix" else f"inet:{self.port}@127.0.0.1"

    def record(self, seq: int, timeout: float = 5.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.out.read_text().splitlines():
                rec: dict[str, object] = json.loads(line)
                if rec["seq"] == seq:
                    return rec
            if time.monotonic() > deadline:
                raise AssertionError(f"probe record {seq} not found in {self.out}")
            time.sleep(0.02)

    def stop(self) -> None:
        # libmilter takes ~5 s to wind down on SIGTERM; records are already on disk
        self.proc.kill()
        self.proc.wait()


Harness = PostfixHarness | SendmailHarness


def _harness(
    kind: str,
    workdir: Path,
    milter_socket: str,
    tls: MtaTls | None,
    *,
    on_milter_failure: str = "accept",
) -> Harness:
    """``on_milter_failure``: accept, tempfail or reject (Postfix default_action, Sendmail F=)."""
    if kind == "postfix":
        return PostfixHarness(
            workdir, milter_socket=milter_socket, tls=tls, milter_default_action=on_milter_failure
        )
    flags = {"accept": "", "tempfail": "T", "reject": "R"}[on_milter_failure]
    return SendmailHarness(workdir, milter_socket=milter_socket, tls=tls, milter_flags=flags)


def _mta_tls(pki: TestPki) -> MtaTls:
    mx = pki.leaves["mx-server"]
    return MtaTls(cert_path=mx.chain_path, key_path=mx.key_path, ca_path=pki.root_path)


@dataclass
class Rig:
    kind: str
    mta: Harness
    probe: ProbeMilter
    pki: TestPki


@pytest.fixture(scope="module", params=MTAS)
def rig(
    request: pytest.FixtureRequest, pki: TestPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rig]:
    """One running MTA (per kind) with the probe milter, shared by the tests of this module."""
    kind: str = request.param
    require_mta(kind)
    work = tmp_path_factory.mktemp(kind)
    probe = ProbeMilter(work)
    try:
        with _harness(kind, work / "mta", probe.socket_for(kind), _mta_tls(pki)) as mta:
            yield Rig(kind, mta, probe, pki)
    finally:
        probe.stop()


def _send_case(
    rig: Rig, case: str, *, ehlo_after_starttls: bool = True
) -> tuple[SmtpOutcome, bytes, dict[str, object]]:
    """Send one message in TLS ``case``; return the outcome, delivered message, probe record."""
    before = len(rig.mta.sink.messages())
    kwargs: dict[str, object] = {}
    if case == "plain":
        kwargs["starttls"] = False
    elif case != "tls-nocert":
        leaf = rig.pki.leaves[case]
        kwargs.update(client_chain=leaf.chain_path, client_key=leaf.key_path)
    outcome = send_message(
        rig.mta.port,
        mail_from=SENDER,
        rcpt=RCPT,
        message=_message(f"case {case} {before}"),
        ehlo_after_starttls=ehlo_after_starttls,
        **kwargs,  # type: ignore[arg-type]
    )
    assert outcome.accepted, f"{rig.kind} {case}: {outcome}\n{rig.mta.log_text()[-3000:]}"
    delivered = rig.mta.delivered(count=before + 1)[before]
    msg = message_from_bytes(delivered)
    assert msg["X-Probe"] == "1", delivered
    record = rig.probe.record(int(msg["X-Probe-Seq"]))
    return outcome, delivered, record


def _stage(record: dict[str, object], stage: str) -> dict[str, str]:
    stages = record["stages"]
    assert isinstance(stages, dict)
    got = stages.get(stage, {})
    assert isinstance(got, dict)
    return got


def _fingerprint(pki: TestPki, case: str) -> str:
    der = pki.leaves[case].cert.public_bytes(Encoding.DER)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


# Postfix 3.7: {cert_subject}/{cert_issuer} are CNs and only for a chain Postfix
# trusted (clientAuth or no EKU); TLSv1.3 in every TLS case.
POSTFIX_EXPECTED: dict[str, dict[str, str | None]] = {
    "plain": {"{tls_version}": ABSENT, "{cert_subject}": ABSENT, "{cert_issuer}": ABSENT},
    "tls-nocert": {"{tls_version}": "TLSv1.3", "{cert_subject}": ABSENT, "{cert_issuer}": ABSENT},
    "client": {
        "{tls_version}": "TLSv1.3",
        "{cert_subject}": "out.sender.test",
        "{cert_issuer}": "Test Intermediate CA",
    },
    "san-only": {  # trusted, no CN: subject sent empty
        "{tls_version}": "TLSv1.3",
        "{cert_subject}": "",
        "{cert_issuer}": "Test Intermediate CA",
    },
    "server": {"{tls_version}": "TLSv1.3", "{cert_subject}": ABSENT, "{cert_issuer}": ABSENT},
    "unknown-ca": {"{tls_version}": "TLSv1.3", "{cert_subject}": ABSENT, "{cert_issuer}": ABSENT},
}

# Sendmail 8.17: values regardless of trust; DNs xtext-encoded (+20 = space).
SENDMAIL_EXPECTED: dict[str, dict[str, str | None]] = {
    "plain": {
        "{tls_version}": ABSENT,
        "{verify}": ABSENT,
        "{cn_subject}": ABSENT,
        "{cert_subject}": ABSENT,
        "{cert_fp}": ABSENT,
    },
    "tls-nocert": {
        "{tls_version}": "TLSv1.3",
        "{verify}": "NO",
        "{cn_subject}": "",
        "{cert_subject}": "",
        "{cert_issuer}": "",
        "{cert_fp}": "",  # measured: sent empty
    },
    "client": {
        "{tls_version}": "TLSv1.3",
        "{verify}": "OK",
        "{cn_subject}": "out.sender.test",
        "{cert_subject}": "/CN=out.sender.test",
        "{cert_issuer}": "/CN=Test+20Intermediate+20CA",
        "{cn_issuer}": "Test+20Intermediate+20CA",
    },
    "san-only": {
        "{tls_version}": "TLSv1.3",
        "{verify}": "OK",
        "{cn_subject}": "BadCertificateUnknown",
        "{cert_subject}": "/O=Sender",
    },
    "server": {
        "{tls_version}": "TLSv1.3",
        "{verify}": "FAIL",
        "{cn_subject}": "out.sender.test",
        "{cert_subject}": "/CN=out.sender.test",
    },
    "unknown-ca": {
        "{tls_version}": "TLSv1.3",
        "{verify}": "FAIL",
        "{cn_subject}": "out.sender.test",
        "{cert_subject}": "/CN=out.sender.test",
        "{cert_issuer}": "/CN=Other+20Root+20CA",
    },
}

CASES = ("plain", "tls-nocert", "client", "server", "unknown-ca", "san-only")
MEASURED: dict[str, dict[str, dict[str, dict[str, str]]]] = {}


def _check(rig: Rig, case: str, got: dict[str, str], where: str) -> None:
    expected = (POSTFIX_EXPECTED if rig.kind == "postfix" else SENDMAIL_EXPECTED)[case]
    diffs = {
        name: (want, got.get(name)) for name, want in expected.items() if got.get(name) != want
    }
    assert not diffs, f"{rig.kind} {case} at {where}: (expected, got) {diffs}; all: {got}"


@pytest.mark.parametrize("case", CASES)
def test_tls_case_macros(rig: Rig, case: str) -> None:
    outcome, delivered, record = _send_case(rig, case)
    assert outcome.tls_version == (None if case == "plain" else "TLSv1.3")
    assert delivered.count(b"\nX-Probe: 1\r\n") == 1
    envfrom = _stage(record, "envfrom")
    MEASURED.setdefault(rig.kind, {})[case] = {s: _stage(record, s) for s in ("helo", "envfrom")}
    _check(rig, case, envfrom, "MAIL")
    _check(rig, case, _stage(record, "helo"), "HELO")
    # the values are still readable at end-of-message (libmilter keeps them)
    _check(rig, case, _stage(record, "eom"), "EOM")
    assert envfrom["{client_addr}"] == "127.0.0.1"
    assert envfrom["{client_port}"].isdigit()
    assert envfrom["j"] == "mx.receiver.test"
    if rig.kind == "sendmail":
        if case in ("client", "server", "unknown-ca", "san-only"):
            assert envfrom["{cert_fp}"] == _fingerprint(rig.pki, case)
        # confCERT_FINGERPRINT_ALGORITHM sha256 replaces {cert_md5} by {cert_fp}
        assert "{cert_md5}" not in envfrom
    else:
        # Postfix has no fingerprint or verify macro
        assert not {"{cert_fp}", "{cert_md5}", "{verify}"} & envfrom.keys()
    dump = os.environ.get("MTLS_MACRO_DUMP")
    if dump:  # re-measurement aid: MTLS_MACRO_DUMP=/path pytest ... writes the raw records
        with open(dump, "a") as fh:
            fh.write(json.dumps({"mta": rig.kind, "case": case, "record": record}) + "\n")


def test_no_second_ehlo_requested_macros_arrive_at_mail(rig: Rig) -> None:
    """A client that skips EHLO after STARTTLS: a milter that requested the macros for MAIL
    (setsymlist, as the probe and the product do) still gets them there."""
    _, _, record = _send_case(rig, "client", ehlo_after_starttls=False)
    envfrom = _stage(record, "envfrom")
    assert _stage(record, "helo") == {} or "{tls_version}" not in _stage(record, "helo")
    _check(rig, "client", envfrom, "MAIL without second EHLO")


@pytest.mark.parametrize("kind", MTAS)
def test_default_macro_lists_without_second_ehlo(kind: str, pki: TestPki, tmp_path: Path) -> None:
    """Without setsymlist the MTA's configured lists apply. Postfix (defaults) lists the TLS macros
    only for HELO: a client that skips the second EHLO leaves the milter without them.
    The Sendmail harness lists them for MAIL too (confMILTER_MACROS_ENVFROM)."""
    require_mta(kind)
    probe = ProbeMilter(tmp_path, symlist=False)
    try:
        with _harness(kind, tmp_path / "mta", probe.socket_for(kind), _mta_tls(pki)) as mta:
            rig = Rig(kind, mta, probe, pki)
            _, _, skipped = _send_case(rig, "client", ehlo_after_starttls=False)
            _, _, normal = _send_case(rig, "client")
    finally:
        probe.stop()
    if kind == "postfix":
        assert "{cert_issuer}" not in _stage(skipped, "eom")
        assert "{tls_version}" not in _stage(skipped, "eom")
        assert _stage(normal, "helo")["{cert_issuer}"] == "Test Intermediate CA"
        assert "{cert_issuer}" not in _stage(normal, "connect")
    else:
        assert _stage(skipped, "envfrom")["{verify}"] == "OK"
        assert _stage(normal, "helo")["{verify}"] == "OK"


@pytest.mark.parametrize("kind", MTAS)
def test_milter_down_accept_still_delivers(kind: str, pki: TestPki, tmp_path: Path) -> None:
    """Milter not running + default_action=accept (Postfix) / no F= flag (Sendmail)."""
    require_mta(kind)
    dead = free_port()
    sock = f"inet:127.0.0.1:{dead}" if kind == "postfix" else f"inet:{dead}@127.0.0.1"
    with _harness(kind, tmp_path / "mta", sock, _mta_tls(pki), on_milter_failure="accept") as mta:
        leaf = pki.leaves["client"]
        outcome = send_message(
            mta.port,
            mail_from=SENDER,
            rcpt=RCPT,
            message=_message("milter down"),
            client_chain=leaf.chain_path,
            client_key=leaf.key_path,
        )
        assert outcome.accepted, f"{outcome}\n{mta.log_text()[-3000:]}"
        (delivered,) = mta.delivered()
        assert b"X-Probe" not in delivered
        assert b"Subject: milter down" in delivered


@pytest.mark.parametrize("kind", MTAS)
def test_milter_down_tempfail(kind: str, pki: TestPki, tmp_path: Path) -> None:
    """Milter not running + default_action=tempfail (Postfix) / F=T (Sendmail): 4xx, nothing
    delivered."""
    require_mta(kind)
    dead = free_port()
    sock = f"inet:127.0.0.1:{dead}" if kind == "postfix" else f"inet:{dead}@127.0.0.1"
    with _harness(kind, tmp_path / "mta", sock, _mta_tls(pki), on_milter_failure="tempfail") as mta:
        outcome = send_message(
            mta.port, mail_from=SENDER, rcpt=RCPT, message=_message("milter down tempfail")
        )
        assert not outcome.accepted
        assert 400 <= outcome.final.code < 500, outcome
        with pytest.raises(TimeoutError):
            mta.delivered(timeout=0.5)


def test_concurrent_instances_and_cleanup(pki: TestPki, tmp_path: Path) -> None:
    """Two Postfix and two Sendmail instances side by side; stop() leaves no process behind."""
    for kind in MTAS:
        require_mta(kind)
    probe = ProbeMilter(tmp_path)
    harnesses: list[Harness] = [
        _harness(kind, tmp_path / f"{kind}{i}", probe.socket_for(kind), _mta_tls(pki))
        for kind in MTAS
        for i in range(2)
    ]
    try:
        for h in harnesses:
            h.start()
        for i, h in enumerate(harnesses):
            outcome = send_message(
                h.port, mail_from=SENDER, rcpt=RCPT, message=_message(f"concurrent {i}")
            )
            assert outcome.accepted, outcome
        for i, h in enumerate(harnesses):
            (delivered,) = h.delivered()
            assert f"Subject: concurrent {i}".encode() in delivered
            assert b"X-Probe: 1" in delivered
    finally:
        for h in harnesses:
            h.stop()
        probe.stop()
    leftovers = _processes_mentioning(str(tmp_path))
    assert not leftovers, leftovers


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.parametrize("kind", MTAS)
def test_milter_reject_is_reported(kind: str, pki: TestPki, tmp_path: Path) -> None:
    """send_message reports a 5xx from the MTA (here: Postfix/Sendmail reject a milter that
    misbehaves with default_action=reject / F=R when it is down)."""
    require_mta(kind)
    dead = free_port()
    sock = f"inet:127.0.0.1:{dead}" if kind == "postfix" else f"inet:{dead}@127.0.0.1"
    with _harness(kind, tmp_path / "mta", sock, _mta_tls(pki), on_milter_failure="reject") as mta:
        outcome = send_message(
            mta.port, mail_from=SENDER, rcpt=RCPT, message=_message("reject"), starttls=False
        )
        assert not outcome.accepted
        assert 500 <= outcome.final.code < 600, outcome


def test_postfix_reload_ask_ccert_no(pki: TestPki, tmp_path: Path) -> None:
    """reload() applies a changed main.cf; with smtpd_tls_ask_ccert=no no certificate is asked
    for, so no certificate macro is sent (docs/evidence.md)."""
    require_mta("postfix")
    probe = ProbeMilter(tmp_path)
    try:
        mta = PostfixHarness(
            tmp_path / "mta", milter_socket=probe.socket_for("postfix"), tls=_mta_tls(pki)
        )
        with mta:
            rig = Rig("postfix", mta, probe, pki)
            _, _, asked = _send_case(rig, "client")
            mta.extra_main_cf["smtpd_tls_ask_ccert"] = "no"
            mta.reload()
            time.sleep(0.2)  # master restarts smtpd with the new settings
            _, _, not_asked = _send_case(rig, "client")
    finally:
        probe.stop()
    assert _stage(asked, "envfrom")["{cert_issuer}"] == "Test Intermediate CA"
    envfrom = _stage(not_asked, "envfrom")
    assert envfrom["{tls_version}"] == "TLSv1.3"
    assert "{cert_subject}" not in envfrom
    assert "{cert_issuer}" not in envfrom


@pytest.mark.parametrize("kind", MTAS)
def test_without_tls_no_starttls(kind: str, pki: TestPki, tmp_path: Path) -> None:
    """tls=None: STARTTLS is not offered; plain mail is delivered through the milter; reload()
    keeps the instance usable."""
    require_mta(kind)
    probe = ProbeMilter(tmp_path)
    try:
        with _harness(kind, tmp_path / "mta", probe.socket_for(kind), None) as mta:
            with pytest.raises(MtaError, match="STARTTLS not offered"):
                send_message(mta.port, mail_from=SENDER, rcpt=RCPT, message=_message("tls"))
            mta.reload()
            outcome = send_message(
                mta.port, mail_from=SENDER, rcpt=RCPT, message=_message("plain"), starttls=False
            )
            assert outcome.accepted, outcome
            (delivered,) = mta.delivered()
            assert b"X-Probe: 1" in delivered
            assert mta.log_text()  # both MTAs' logs are captured
    finally:
        probe.stop()
