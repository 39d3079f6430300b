"""The Sendmail example applied as examples/sendmail/README.md says, to a real Sendmail 8.17.

The lines of ``sendmail.mc`` go into the harness's mc file before its ``MAILER()`` lines, m4
builds sendmail.cf, and Sendmail calls ``mtls-milter serve`` (from ``examples/mtls-milter.toml``)
on the unix socket the example names. Replaced, as the README allows: the TLS file paths, the
socket's directory (``/run/mtls-milter``, the unit's RuntimeDirectory), the DNS server and trust
anchor. No ``confMILTER_MACROS_*`` is defined (Sendmail's defaults), as the example promises.
The daemon runs as the unit starts it: user ``nobody`` for ``mtls-milter``, no groups, no
capabilities, ``PR_SET_MDWE``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import toml_text
from support.dnsserver import TestDnsServer
from support.mta import MtaTls, SendmailHarness, missing_mta, send_message
from support.pki import TestPki

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SETPRIV = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--no-new-privs"]
SETPRIV += ["--inh-caps=-all", "--bounding-set=-all"]
UNIT_LIKE = (
    "import ctypes, sys; ctypes.CDLL(None).prctl(65, 1, 0, 0, 0); "
    "from mtls_milter.cli.main import main; sys.exit(main(sys.argv[1:]))"
)
MESSAGE = (
    b"From: <someone@sender.test>\r\nTo: <someone@receiver.test>\r\nSubject: examples\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <examples-sm@sender.test>\r\n"
    b"\r\nbody\r\n"
)


class ExampleSendmail(SendmailHarness):
    """The harness's Sendmail with Sendmail's default milter macro lists."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.milter_macros = {}


def _wait_unix(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(path))
                return
            except OSError:
                assert time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.05)


@pytest.fixture(scope="module")
def rig(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExampleSendmail]:
    reason = missing_mta("sendmail")
    if reason:
        pytest.skip(f"cannot run sendmail: {reason}")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing")
    work = tmp_path_factory.mktemp("examples-sendmail")
    base = Path(tempfile.mkdtemp(prefix="mtls-examples-sm-"))
    base.chmod(0o755)
    run_dir = base / "mtls-milter"  # stands for /run/mtls-milter (RuntimeDirectory, 0750)
    run_dir.mkdir(mode=0o750)
    shutil.chown(run_dir, "nobody", "nogroup")
    tls_dir = work / "mta" / "sendmail" / "tls"
    subst = {
        "/etc/mail/tls/cacerts": str(tls_dir / "cacerts"),
        "/etc/mail/tls/ca.pem": str(tls_dir / "ca.pem"),
        "/etc/mail/tls/mx.crt": str(tls_dir / "server.crt"),
        "/etc/mail/tls/mx.key": str(tls_dir / "server.key"),
        "/run/mtls-milter": str(run_dir),
    }
    mc = (EXAMPLES / "sendmail" / "sendmail.mc").read_text(encoding="utf-8")
    for old, new in subst.items():
        mc = mc.replace(old, new)
    with TestDnsServer() as dns:
        dns.add("sender.test", 265, "10 out.sender.test.")
        with (EXAMPLES / "mtls-milter.toml").open("rb") as f:
            config: dict[str, Any] = tomllib.load(f)
        config["milter"]["socket"] = f"unix:{run_dir}/milter.sock"
        config["dns"]["nameservers"] = [dns.nameserver]
        trust = base / "ca.pem"
        shutil.copyfile(pki.root_path, trust)
        trust.chmod(0o644)
        config["tls"]["trust"] = [str(trust)]
        config_path = base / "mtls-milter.toml"
        config_path.write_text(toml_text(config))
        config_path.chmod(0o644)
        log = work / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*SETPRIV, sys.executable, "-c", UNIT_LIKE, "serve", "--config", str(config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_unix(run_dir / "milter.sock", proc, log)
            mx = pki.leaves["mx-server"]
            tls = MtaTls(cert_path=mx.chain_path, key_path=mx.key_path, ca_path=pki.root_path)
            with ExampleSendmail(
                work / "mta", milter_socket="", tls=tls, extra_mc=mc.splitlines()
            ) as sendmail:
                yield sendmail
        finally:
            proc.terminate()
            proc.wait(10)
            shutil.rmtree(base, ignore_errors=True)


def test_the_example_lines_reach_sendmail_cf(rig: ExampleSendmail) -> None:
    cf = rig.cf_path.read_text(errors="replace")
    assert "Xmtls, S=unix:" in cf and "/mtls-milter/milter.sock" in cf
    assert "O CertFingerprintAlgorithm=sha256" in cf


def test_mail_with_a_client_certificate_gets_the_header(rig: ExampleSendmail, pki: TestPki) -> None:
    client = pki.leaves["client"]
    outcome = send_message(
        rig.port,
        mail_from="someone@sender.test",
        rcpt="someone@receiver.test",
        message=MESSAGE,
        client_chain=client.chain_path,
        client_key=client.key_path,
    )
    assert outcome.accepted, f"{outcome}\n{rig.log_text()[-3000:]}"
    delivered = rig.delivered(count=1)[0]
    assert delivered.startswith(
        b"Authentication-Results: mx.receiver.test; mtls=pass (evidence=mta; matched\r\n"
        b"\tout.sender.test in client-mx) smtp.mailfrom=sender.test\r\n"
    ), delivered[:400]
