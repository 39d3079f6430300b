"""A SENDING Postfix for end-to-end tests of the outbound policy (``smtp_tls_policy_maps``).

The hard part is DNS: Postfix's SMTP client resolves MX and A records with the libc resolver,
which reads ``/etc/resolv.conf`` and always uses port 53. The harness therefore

* runs the ``smtp`` service **chrooted** (master.cf chroot column ``y``) into the instance's own
  queue directory, whose ``etc/resolv.conf`` names a loopback address such as ``127.53.0.53``
  (glibc re-reads resolv.conf when the file it sees changes, so the chroot copy is the one used);
* serves DNS on that address, port 53, with :class:`LoopbackDnsServer` (the in-process test DNS
  server bound to a chosen address, plus per-type SERVFAIL).

Nothing of the host's ``/etc`` is touched. Needs root (port 53, chroot, Postfix's daemons).
Receiving MX hosts are :class:`~support.smtp_tls_server.StartTlsServer` instances on
127.0.0.x; they all listen on one port, which the client uses through ``smtp_tcp_port``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import Self

import dns.message

from support.dnsserver import TestDnsServer
from support.lifecycle import Running
from support.mta import POSTFIX_MASTER_CF, MtaError, missing_mta, run_postfix
from support.ports import free_port, wait_for_port

__all__ = ["LoopbackDnsServer", "PostfixSender", "missing_sender_support"]


def missing_sender_support() -> str | None:
    """Why the sending-Postfix tests cannot run here, or None."""
    reason = missing_mta("postfix")
    if reason:
        return reason
    return None


class LoopbackDnsServer(TestDnsServer):
    """:class:`TestDnsServer` bound to ``address`` (port 53 by default), with per-type SERVFAIL."""

    __test__ = False

    def __init__(self, address: str = "127.53.0.53", port: int = 53) -> None:
        super().__init__()
        self.bind_address = (address, port)
        self._type_failures: set[tuple[str, int]] = set()
        self._failure_lock = threading.Lock()

    def servfail_type(self, name: str, rdtype: int) -> None:
        """Answer SERVFAIL for ``name`` and this type only."""
        with self._failure_lock:
            self._type_failures.add((name.lower().rstrip("."), int(rdtype)))

    def start(self) -> LoopbackDnsServer:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            udp.bind(self.bind_address)
            tcp.bind(self.bind_address)
        except OSError:
            udp.close()
            tcp.close()
            raise
        tcp.listen(16)
        self._udp, self._tcp = udp, tcp
        self.address = udp.getsockname()
        thread = threading.Thread(target=self._serve, name="loopback-dns", daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def _answer(self, query: dns.message.Message, tcp: bool, kind: str) -> bytes:
        question = query.question[0]
        key = (question.name.to_text(omit_final_dot=True).lower(), int(question.rdtype))
        with self._failure_lock:
            if key in self._type_failures:
                kind = "servfail"
        return super()._answer(query, tcp, kind)


class PostfixSender(Running):
    """An isolated sending Postfix (``postfix -c workdir/etc``).

    Mail injected with :meth:`send` (SMTP to ``127.0.0.1:inject_port``) is delivered by the
    chrooted ``smtp`` client through DNS at ``dns_address`` to MX hosts on ``smtp_port``, with
    ``smtp_tls_policy_maps = policy_map`` (a Postfix table, e.g. ``socketmap:inet:…:mtls``) and
    ``smtp_tls_CAfile = ca_path``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        policy_map: str,
        ca_path: Path,
        dns_address: str,
        smtp_port: int,
        extra_main_cf: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.policy_map = policy_map
        self.ca_path = ca_path
        self.dns_address = dns_address
        self.smtp_port = smtp_port
        self.extra_main_cf = dict(extra_main_cf or {})
        self.config_dir = workdir / "etc"
        self.queue_dir = workdir / "spool"
        self.data_dir = workdir / "data"
        self.log_path = workdir / "postfix.log"
        self.inject_port = 0
        self._started = False

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters written (after ``extra_main_cf``)."""
        cf = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.workdir),
            "myhostname": "out.sender.test",
            "mydomain": "sender.test",
            "myorigin": "$mydomain",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": "",
            "default_transport": "smtp",
            "relay_transport": "relay",
            "smtp_tcp_port": str(self.smtp_port),
            "smtp_host_lookup": "dns",
            "smtp_dns_support_level": "enabled",
            "smtp_tls_security_level": "may",
            "smtp_tls_policy_maps": self.policy_map,
            "smtp_tls_CAfile": str(self.config_dir / "ca.pem"),
            "smtp_tls_loglevel": "1",
            "smtp_connect_timeout": "5s",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "maximal_queue_lifetime": "1h",
            "bounce_queue_lifetime": "1h",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "import_environment": "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C",
        }
        cf.update(self.extra_main_cf)
        return cf

    def _write_config(self) -> None:
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.ca_path, self.config_dir / "ca.pem")
        lines = [f"{k} = {v}" for k, v in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(
            POSTFIX_MASTER_CF.format(listen=f"127.0.0.1:{self.inject_port}", smtp_chroot="y")
        )
        # The chroot's /etc: only what the SMTP client's resolver needs, pointing at our DNS.
        etc = self.queue_dir / "etc"
        etc.mkdir(exist_ok=True)
        (etc / "resolv.conf").write_text(
            f"nameserver {self.dns_address}\noptions timeout:2 attempts:2\n"
        )
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        (etc / "nsswitch.conf").write_text("hosts: files dns\nservices: files\n")
        for name in ("services", "localtime", "host.conf"):
            source = Path("/etc") / name
            if source.exists():
                shutil.copyfile(source, etc / name)
        shutil.chown(self.data_dir, "postfix", "postfix")

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_postfix(self.config_dir, *args, check=check, log_text=self.log_text)

    def start(self) -> Self:
        """Write the configuration and start Postfix; MtaError with its log on failure."""
        reason = missing_sender_support()
        if reason:
            raise MtaError(reason)
        self.inject_port = free_port()
        self._write_config()
        try:
            self._postfix("start")
            self._started = True
            wait_for_port(self.inject_port, timeout=20)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop Postfix (and wait for its master to exit)."""
        if not self._started:
            return
        self._postfix("stop", check=False)
        pidfile = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, 0)
            except (OSError, ValueError):
                break
            time.sleep(0.05)
        self._started = False

    def send(self, rcpt: str, *, mail_from: str = "alice@sender.test", subject: str = "t") -> None:
        """Inject one message for ``rcpt`` (Postfix queues it and delivers it by MX)."""
        message = EmailMessage()
        message["From"] = mail_from
        message["To"] = rcpt
        message["Subject"] = subject
        message.set_content("outbound policy test\n")
        with smtplib.SMTP("127.0.0.1", self.inject_port, timeout=10) as smtp:
            smtp.send_message(message, mail_from, [rcpt])

    def log_text(self) -> str:
        """Postfix's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_status(self, rcpt: str, timeout: float = 20.0) -> str:
        """Wait for the first delivery status line for ``rcpt``; return that line."""
        pattern = re.compile(rf"^.*to=<{re.escape(rcpt)}>.*status=\w+.*$", re.MULTILINE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.log_text())
            if match:
                return match.group(0)
            time.sleep(0.1)
        raise TimeoutError(f"no delivery status for {rcpt} after {timeout}s:\n{self.log_text()}")

    def lines_for(self, rcpt_or_text: str) -> list[str]:
        """Log lines containing ``rcpt_or_text``."""
        return [line for line in self.log_text().splitlines() if rcpt_or_text in line]


def unused_loopback(candidates: tuple[str, ...] = ("127.53.0.53", "127.53.1.53")) -> str:
    """The first candidate address on which UDP and TCP port 53 are both free."""
    for address in candidates:
        with contextlib.ExitStack() as stack:
            try:
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    s = stack.enter_context(socket.socket(socket.AF_INET, kind))
                    s.bind((address, 53))
            except OSError:
                continue
            return address
    raise OSError(f"port 53 is taken on all of {', '.join(candidates)}")
