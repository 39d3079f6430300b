"""The Postfix examples applied as examples/postfix/README.md says, to a real Postfix 3.7.

``main.cf.inbound``, ``main.cf.policy`` and ``main.cf.outbound`` go into a private Postfix
instance (``MAIL_CONFIG``) with the README's ``postconf -e`` loop and the prepend command in
``main.cf.policy``; the daemon runs from ``examples/mtls-milter.toml`` on the unix socket it
names, in a directory made by the recipe in ``main.cf.inbound``. Only what the README says differs
is replaced: TLS file paths, the two TCP ports, ``/var/spool/postfix`` by the instance's queue
directory (its smtpd runs chrooted there, as on Debian, so ``smtpd_milters`` stays exactly as
written), the DNS server and trust anchor, and the account: the daemons run as ``nobody``
instead of ``mtls-milter``, started the way the shipped systemd unit starts them (``User=``,
no supplementary groups, no capabilities, ``MemoryDenyWriteExecute=yes`` as
``prctl(PR_SET_MDWE)`` where the kernel has it). The socket gets group postfix from the
set-group-ID directory alone.

Trailing ``# comments`` in a value pass ``postfix check`` but stop smtpd at start-up: here they
would show as no SMTP greeting or no header.
"""

from __future__ import annotations

import os
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
from support.mta import MtaTls, PostfixHarness, missing_mta, send_message
from support.pki import TestPki
from support.ports import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
POSTCONF = "/usr/sbin/postconf"
ACCOUNT = "nobody"  # stands for mtls-milter
# What systemd does for the unit: User=, no supplementary groups, NoNewPrivileges=yes,
# CapabilityBoundingSet= (setpriv), then MemoryDenyWriteExecute=yes (PR_SET_MDWE before anything
# is imported; Linux >= 6.3, else the daemon runs without it), then the command line's main().
SETPRIV = [
    "setpriv",
    f"--reuid={ACCOUNT}",
    "--regid=nogroup",
    "--clear-groups",
    "--no-new-privs",
    "--inh-caps=-all",
    "--bounding-set=-all",
]
UNIT_LIKE = (
    "import ctypes, sys; ctypes.CDLL(None).prctl(65, 1, 0, 0, 0); "
    "from mtls_milter.cli.main import main; sys.exit(main(sys.argv[1:]))"
)
OPERATOR_RESTRICTIONS = "permit_mynetworks, reject_unauth_destination"
MESSAGE = (
    b"From: <someone@sender.test>\r\nTo: <someone@receiver.test>\r\nSubject: examples\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <examples@sender.test>\r\n"
    b"\r\nbody\r\n"
)


def _line_with(path: Path, needle: str) -> str:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if needle in line]
    assert len(lines) == 1, (path, needle, lines)
    return lines[0].strip().removeprefix("#").strip()


def apply_command() -> str:
    """The README's loop that runs ``postconf -e`` for every setting line of a file."""
    return _line_with(EXAMPLES / "postfix" / "README.md", 'do postconf -e "$line"; done')


def prepend_command() -> str:
    """The command in main.cf.policy that prepends the policy check."""
    return _line_with(EXAMPLES / "postfix" / "main.cf.policy", "$(postconf -h smtpd_recipient_")


class ExamplePostfix(PostfixHarness):
    """The harness's instance, then the example files applied to it with the README's commands."""

    def __init__(self, workdir: Path, subst: dict[str, str], **kwargs: Any) -> None:
        super().__init__(workdir, milter_socket="", **kwargs)
        self.subst = subst

    def _run(self, command: str, cwd: Path) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/bin", "MAIL_CONFIG": str(self.config_dir)}
        done = subprocess.run(
            ["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and not done.stderr, (command, done.stderr)

    def _write_config(self) -> None:
        super()._write_config()
        # smtpd chrooted in the queue directory, as on Debian (master.cf chroot column "y")
        master = self.config_dir / "master.cf"
        stat = master.stat()
        text = master.read_text()
        listen = text.splitlines()[1]
        assert listen.endswith("inet  n       -       n       -       -       smtpd"), listen
        master.write_text(
            text.replace(
                listen,
                listen[: -len("n       -       -       smtpd")] + "y       -       -       smtpd",
            )
        )
        os.utime(master, (stat.st_atime, stat.st_mtime))
        copies = self.workdir / "examples"
        copies.mkdir(exist_ok=True)
        for name in ("main.cf.inbound", "main.cf.policy", "main.cf.outbound"):
            text = (EXAMPLES / "postfix" / name).read_text(encoding="utf-8")
            for old, new in self.subst.items():
                text = text.replace(old, new)
            (copies / name).write_text(text)
            self._run(apply_command().replace("main.cf.inbound", name), copies)
        self._run(self.substituted(prepend_command()), copies)

    def substituted(self, text: str) -> str:
        for old, new in self.subst.items():
            text = text.replace(old, new)
        return text

    def postconf(self, name: str) -> str:
        done = subprocess.run(
            [POSTCONF, "-c", str(self.config_dir), "-h", name],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()


def _wait_unix(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(path))
                return
            except OSError:
                time.sleep(0.05)
    raise AssertionError(f"no listener on {path}:\n{log.read_text(errors='replace')}")


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"no listener on port {port}:\n{log.read_text(errors='replace')}")


def _daemon_config(sock_dir: Path, dns: TestDnsServer, trust: Path, ports: dict[str, int]) -> str:
    with (EXAMPLES / "mtls-milter.toml").open("rb") as f:
        config: dict[str, Any] = tomllib.load(f)
    milter = config["milter"]
    milter["socket"] = milter["socket"].replace("/var/spool/postfix/mtls-milter", str(sock_dir))
    milter["user"] = ""
    config["dns"]["nameservers"] = [dns.nameserver]
    config["tls"]["trust"] = [str(trust)]
    config["policy_service"]["socket"] = f"inet:{ports['policy']}@127.0.0.1"
    config["policy_map"]["socket"] = f"inet:{ports['map']}@127.0.0.1"
    return toml_text(config)


@pytest.fixture(scope="module")
def rig(
    pki: TestPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ExamplePostfix, Path]]:
    reason = missing_mta("postfix")
    if reason:
        pytest.skip(f"cannot run postfix: {reason}")
    work = tmp_path_factory.mktemp("examples")
    # Postfix's smtpd (user postfix) must reach the socket: not under pytest's 0700 tree
    base = Path(tempfile.mkdtemp(prefix="mtls-examples-"))
    base.chmod(0o755)
    # the instance's queue directory stands for /var/spool/postfix, smtpd's chroot
    sock_dir = base / "mta" / "postfix" / "spool" / "mtls-milter"
    recipe = _line_with(EXAMPLES / "postfix" / "main.cf.inbound", "install -d -o mtls-milter")
    recipe = recipe.replace("-o mtls-milter", f"-o {ACCOUNT}").replace(
        "/var/spool/postfix/mtls-milter", str(sock_dir)
    )
    subprocess.run(recipe.split(), check=True)
    ports = {"policy": free_port(), "map": free_port()}
    mx = pki.leaves["mx-server"]
    tls_dir = base / "mta" / "postfix" / "tls"
    subst = {
        "/etc/postfix/tls/mx.key": str(tls_dir / "server.key"),
        "/etc/postfix/tls/mx.crt": str(tls_dir / "server.crt"),
        "/etc/ssl/certs/ca-certificates.crt": str(tls_dir / "ca.pem"),
        "127.0.0.1:8897": f"127.0.0.1:{ports['policy']}",
        "127.0.0.1:8899": f"127.0.0.1:{ports['map']}",
    }
    procs: list[subprocess.Popen[bytes]] = []
    with TestDnsServer() as dns:
        dns.add("sender.test", 265, "10 out.sender.test.")
        trust = base / "ca.pem"  # the daemon's user must read what it needs
        shutil.copyfile(pki.root_path, trust)
        config = base / "mtls-milter.toml"
        config.write_text(_daemon_config(sock_dir, dns, trust, ports))
        trust.chmod(0o644)
        config.chmod(0o644)
        try:
            python = [sys.executable, "-c", UNIT_LIKE]
            for command, log in (("serve", work / "serve.log"), ("policy-map", work / "map.log")):
                with log.open("wb") as out:
                    procs.append(
                        subprocess.Popen(
                            [*SETPRIV, *python, command, "--config", str(config)],
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        )
                    )
            _wait_unix(sock_dir / "milter.sock", procs[0], work / "serve.log")
            _wait_tcp(ports["map"], procs[1], work / "map.log")
            tls = MtaTls(cert_path=mx.chain_path, key_path=mx.key_path, ca_path=pki.root_path)
            postfix = ExamplePostfix(
                base / "mta",
                subst,
                tls=tls,
                extra_main_cf={"smtpd_recipient_restrictions": OPERATOR_RESTRICTIONS},
            )
            with postfix:
                yield postfix, work
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
            shutil.rmtree(base, ignore_errors=True)


def test_the_socket_belongs_to_group_postfix(rig: tuple[ExamplePostfix, Path]) -> None:
    postfix, _ = rig
    path = postfix.queue_dir / "mtls-milter" / "milter.sock"
    st = path.stat()
    assert (path.owner(), path.group(), oct(st.st_mode & 0o777)) == (ACCOUNT, "postfix", "0o660")


def test_policy_check_is_prepended_to_the_operators_restrictions(
    rig: tuple[ExamplePostfix, Path],
) -> None:
    postfix, _ = rig
    policy = postfix.substituted("inet:127.0.0.1:8897")
    assert postfix.postconf("smtpd_recipient_restrictions") == (
        f"check_policy_service {{ {policy}, default_action=DUNNO }}, {OPERATOR_RESTRICTIONS}"
    )


def test_mail_with_a_client_certificate_gets_the_header(
    rig: tuple[ExamplePostfix, Path], pki: TestPki
) -> None:
    postfix, work = rig
    client = pki.leaves["client"]
    outcome = send_message(
        postfix.port,
        mail_from="someone@sender.test",
        rcpt="someone@receiver.test",
        message=MESSAGE,
        client_chain=client.chain_path,
        client_key=client.key_path,
    )
    assert outcome.accepted, f"{outcome}\n{postfix.log_text()[-3000:]}"
    delivered = postfix.delivered(count=1)[0]
    assert delivered.startswith(
        b"Authentication-Results: mx.receiver.test; mtls=pass (evidence=mta; matched\r\n"
        b"\tout.sender.test in client-mx) smtp.mailfrom=sender.test\r\n"
    ), delivered[:400]
    # smtpd talked to the milter and the policy listener, smtp to the policy map, without a
    # problem (the harness's own qmgr warning about queue lifetimes is not ours)
    warnings = [line for line in postfix.log_text().splitlines() if "warning:" in line]
    assert not [line for line in warnings if "/qmgr[" not in line], warnings
    map_log = (work / "map.log").read_text(errors="replace")
    assert "error" not in map_log.lower(), map_log
