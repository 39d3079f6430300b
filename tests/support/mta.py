"""Harnesses that run real MTAs (Postfix, Sendmail) with TLS and a milter for end-to-end tests.

Both harnesses:

* run an isolated instance under ``workdir`` (own configuration, queue, pid files, logs), listening
  on ``127.0.0.1:port``, so several instances can run at once and the system MTA is untouched;
* offer STARTTLS with the given server certificate, ask for a client certificate and trust
  ``tls.ca_path`` for it;
* call the milter at ``milter_socket``;
* relay every accepted message to an in-process SMTP sink (:class:`MailSink`) which stores each
  message as ``workdir/mail/NNNNNN.eml`` (plus ``NNNNNN.json`` with the envelope), so a test reads
  back exactly what the MTA delivered, with the headers the milter added;
* must run as root (the MTAs' daemons need it): :func:`require_root` tells a test to skip.

The installer is ``tests/e2e/install_mtas.sh``: Postfix from the Debian package, Sendmail unpacked
from its Debian packages into :data:`SENDMAIL_ROOT` (the two packages conflict).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import smtplib
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.lifecycle import Running
from support.ports import free_port

__all__ = [
    "POSTFIX_BIN",
    "SENDMAIL_ROOT",
    "MailSink",
    "MtaError",
    "MtaTls",
    "PostfixHarness",
    "SendmailHarness",
    "SmtpOutcome",
    "SmtpReply",
    "missing_mta",
    "send_message",
]

#: Where ``install_mtas.sh`` unpacks the Sendmail packages (override with $MTLS_SENDMAIL_ROOT).
SENDMAIL_ROOT = Path(os.environ.get("MTLS_SENDMAIL_ROOT", "/opt/mtls-test/sendmail"))
#: The Postfix control program (from the Debian package).
POSTFIX_BIN = Path("/usr/sbin/postfix")

_HOSTNAME = "mx.receiver.test"
_SINK_NAME = "sink.invalid"


class MtaError(RuntimeError):
    """An MTA could not be configured or started; the message carries its log."""


@dataclass(frozen=True)
class MtaTls:
    """Server certificate (chain) and key of the MTA, and the CA file it trusts for clients."""

    cert_path: Path
    key_path: Path
    ca_path: Path


# --------------------------------------------------------------------------------------------
# helpers


def _wait_for_banner(port: int, timeout: float, alive: Iterator[bool] | None = None) -> None:
    """Wait until an SMTP server on 127.0.0.1:port sends its 220 greeting."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
                s.settimeout(max(0.5, deadline - time.monotonic()))
                banner = s.recv(512)
                # any SMTP greeting means the daemon is up (a milter that is down with
                # "tempfail"/"reject" makes Sendmail greet with 421/554)
                if banner[:3].isdigit():
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                    return
                last = MtaError(f"unexpected greeting {banner!r}")
        except OSError as exc:
            last = exc
        if alive is not None and not next(alive):
            raise MtaError("the MTA exited during start-up")
        time.sleep(0.02)
    raise TimeoutError(f"no SMTP greeting on 127.0.0.1:{port} after {timeout}s: {last}")


def missing_mta(kind: str) -> str | None:
    """Why the named MTA (``"postfix"`` or ``"sendmail"``) cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return f"{kind} end-to-end tests need root (the MTA daemons must start as root)"
    if kind == "postfix":
        if not POSTFIX_BIN.exists():
            return f"{POSTFIX_BIN} missing: run tests/e2e/install_mtas.sh (Debian package postfix)"
        return None
    if kind == "sendmail":
        if not _sendmail_binary().exists():
            return (
                f"sendmail binary missing under {SENDMAIL_ROOT}: run tests/e2e/install_mtas.sh "
                "(unpacks sendmail-bin, sendmail-base, sendmail-cf)"
            )
        if shutil.which("m4") is None:
            return "m4 missing (Debian package m4): needed to build sendmail.cf"
        return None
    raise ValueError(kind)


def require_mta(kind: str) -> None:
    """Skip the calling test, saying why, when the named MTA cannot run here."""
    reason = missing_mta(kind)
    if reason:
        pytest.skip(f"cannot run {kind}: {reason}")


def _copy_private(src: Path, dst: Path, mode: int) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)
    return dst


# --------------------------------------------------------------------------------------------
# the sink every harness delivers to


class _SinkHandler(socketserver.StreamRequestHandler):
    server: _SinkServer

    def _reply(self, line: str) -> None:
        self.wfile.write(line.encode("ascii") + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        self._reply(f"220 {_SINK_NAME} ESMTP test sink")
        mail_from = ""
        rcpts: list[str] = []
        while True:
            raw = self.rfile.readline(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = line[:4].upper()
            if verb in ("EHLO", "LHLO"):
                self.wfile.write(f"250-{_SINK_NAME}\r\n250-8BITMIME\r\n".encode())
                self._reply("250 SMTPUTF8")
            elif verb == "HELO":
                self._reply(f"250 {_SINK_NAME}")
            elif verb == "MAIL":
                mail_from, rcpts = line[10:].strip(), []
                self._reply("250 2.1.0 ok")
            elif verb == "RCPT":
                rcpts.append(line[8:].strip())
                self._reply("250 2.1.5 ok")
            elif verb == "DATA":
                self._reply("354 go ahead")
                chunks: list[bytes] = []
                while True:
                    data = self.rfile.readline(1 << 20)
                    if not data or data in (b".\r\n", b".\n"):
                        break
                    chunks.append(data[1:] if data.startswith(b".") else data)
                self.server.sink.store(b"".join(chunks), mail_from, rcpts)
                self._reply("250 2.0.0 stored")
            elif verb == "QUIT":
                self._reply("221 2.0.0 bye")
                return
            elif verb in ("RSET", "NOOP"):
                self._reply("250 2.0.0 ok")
            else:
                self._reply("502 5.5.2 not implemented")


class _SinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, sink: MailSink) -> None:
        self.sink = sink
        super().__init__(("127.0.0.1", 0), _SinkHandler)


class MailSink:
    """A minimal SMTP server on 127.0.0.1 that stores every message it receives in ``directory``.

    Messages are written atomically as ``NNNNNN.eml`` (the raw message, CRLF line ends as
    received) with ``NNNNNN.json`` (``{"mail_from": ..., "rcpts": [...]}``) beside them.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._count = 0
        self._server: _SinkServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise MtaError("the mail sink is not running")
        port: int = self._server.server_address[1]
        return port

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count = len(list(self.directory.glob("*.eml")))
        self._server = _SinkServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="mail-sink", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def store(self, message: bytes, mail_from: str, rcpts: Sequence[str]) -> Path:
        with self._lock:
            self._count += 1
            stem = f"{self._count:06d}"
            (self.directory / f"{stem}.json").write_text(
                json.dumps({"mail_from": mail_from, "rcpts": list(rcpts)})
            )
            tmp = self.directory / f".{stem}.tmp"
            tmp.write_bytes(message)
            path = self.directory / f"{stem}.eml"
            tmp.rename(path)
            return path

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.directory.glob("*.eml"))]

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            paths = sorted(self.directory.glob("*.eml"))
            if len(paths) >= count:
                return [p.read_bytes() for p in paths]
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(paths)} message(s) delivered to {self.directory}, "
                    f"expected {count} within {timeout}s"
                )
            time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# common harness behaviour


class _Harness(Running):
    kind = "mta"

    def __init__(self, workdir: Path, *, milter_socket: str, tls: MtaTls | None, port: int) -> None:
        self.workdir = Path(workdir).resolve()
        self.milter_socket = milter_socket
        self.tls = tls
        self.port = port or free_port()
        self.sink = MailSink(self.workdir / "mail")
        self._started = False
        #: seconds the last start() took
        self.start_seconds = 0.0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def log_text(self) -> str:
        raise NotImplementedError

    def delivered(self, timeout: float = 10.0, count: int = 1) -> list[bytes]:
        """Raw messages delivered so far (oldest first); waits until at least ``count`` exist."""
        try:
            return self.sink.wait(count, timeout)
        except TimeoutError as exc:
            raise TimeoutError(
                f"{exc}\n--- {self.kind} log ---\n{self.log_text()[-6000:]}"
            ) from None

    def clear_delivered(self) -> None:
        """Forget the messages delivered so far (delete the files)."""
        for p in self.sink.directory.glob("*"):
            p.unlink()


# --------------------------------------------------------------------------------------------
# Postfix

# {listen}: the smtpd address; {smtp_chroot}: "y" runs the SMTP client chrooted in the queue
# directory (postfix_sender.py gives it a private etc/resolv.conf there), "n" otherwise.
POSTFIX_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       {smtp_chroot}       -       -       smtp
relay     unix  -       -       {smtp_chroot}       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def run_postfix(
    config_dir: Path, *args: str, check: bool, log_text: Callable[[], str]
) -> subprocess.CompletedProcess[str]:
    """Run ``postfix -c CONFIG_DIR ARGS``; MtaError with output and log tail on failure."""
    proc = subprocess.run(
        [str(POSTFIX_BIN), "-c", str(config_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MAIL_CONFIG": str(config_dir)},
    )
    if check and proc.returncode != 0:
        raise MtaError(
            f"postfix {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            f"\n--- log ---\n{log_text()[-4000:]}"
        )
    return proc


class PostfixHarness(_Harness):
    """An isolated Postfix instance (``postfix -c workdir/postfix/etc``) on ``127.0.0.1:port``.

    Every recipient in ``receiver.test`` (and any other domain) is accepted and relayed to the
    harness's :class:`MailSink`. ``extra_main_cf`` overrides or adds main.cf parameters, e.g.
    ``{"milter_mail_macros": "..."}`` or ``{"smtpd_tls_ask_ccert": "no"}``.
    """

    kind = "postfix"

    def __init__(
        self,
        workdir: Path,
        *,
        milter_socket: str,
        tls: MtaTls | None,
        port: int = 0,
        extra_main_cf: Mapping[str, str] | None = None,
        milter_default_action: str = "accept",
    ) -> None:
        super().__init__(workdir, milter_socket=milter_socket, tls=tls, port=port)
        self.extra_main_cf = dict(extra_main_cf or {})
        self.milter_default_action = milter_default_action
        self.config_dir = self.workdir / "postfix" / "etc"
        self.queue_dir = self.workdir / "postfix" / "spool"
        # data_directory is opened by master *after* it drops to the postfix user, and workdirs
        # are often under a 0700 tree (pytest's /tmp/pytest-of-root): keep it in a private
        # directory directly under the system temp dir, made on start and removed on stop.
        self.data_dir = self.workdir / "postfix" / "data"
        self.log_path = self.workdir / "postfix.log"

    # -- configuration

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters the harness writes (after ``extra_main_cf``)."""
        milter = self.milter_socket
        if milter.startswith("inet:") and "@" in milter:  # accept libmilter form inet:PORT@HOST
            port, host = milter[5:].split("@", 1)
            milter = f"inet:{host}:{port}"
        cf: dict[str, str] = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.workdir),  # default allows only /var, /dev/stdout
            "myhostname": _HOSTNAME,
            "mydomain": "receiver.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "receiver.test",
            "mynetworks": "127.0.0.0/8",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "relayhost": "",
            "default_transport": f"smtp:[127.0.0.1]:{self.sink.port}",
            "relay_transport": f"smtp:[127.0.0.1]:{self.sink.port}",
            "smtp_tls_security_level": "none",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "smtpd_milters": (
                f"{{ {milter}, default_action={self.milter_default_action} }}"
                if self.milter_socket
                else ""
            ),
            "milter_protocol": "6",
            "milter_default_action": self.milter_default_action,
            "smtpd_tls_received_header": "yes",
            "smtpd_tls_loglevel": "1",
            "smtpd_delay_reject": "yes",
            "maximal_queue_lifetime": "1h",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "import_environment": "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C",
        }
        if self.tls is None:
            cf["smtpd_tls_security_level"] = "none"
        else:
            tls_dir = self.workdir / "postfix" / "tls"
            cf.update(
                {
                    "smtpd_tls_security_level": "may",
                    "smtpd_tls_ask_ccert": "yes",
                    "smtpd_tls_chain_files": (
                        f"{tls_dir / 'server.key'}, {tls_dir / 'server.crt'}"
                    ),
                    "smtpd_tls_CAfile": str(tls_dir / "ca.pem"),
                }
            )
        cf.update(self.extra_main_cf)
        return cf

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        if not self.data_dir.is_dir() or self.data_dir.is_relative_to(self.workdir):
            self.data_dir = Path(tempfile.mkdtemp(prefix="mtls-postfix-data-"))
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        if self.tls is not None:
            tls_dir = self.workdir / "postfix" / "tls"
            _copy_private(self.tls.key_path, tls_dir / "server.key", 0o600)
            _copy_private(self.tls.cert_path, tls_dir / "server.crt", 0o644)
            _copy_private(self.tls.ca_path, tls_dir / "ca.pem", 0o644)
        lines = [f"{k} = {v}" for k, v in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(
            POSTFIX_MASTER_CF.format(listen=f"127.0.0.1:{self.port}", smtp_chroot="n")
        )
        shutil.chown(self.data_dir, "postfix", "postfix")
        # Postfix re-reads a config file whose mtime is too recent (an editor may still be
        # writing it) until it is ~2 s old: backdate the files, start-up drops from ~2.3 s.
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_postfix(self.config_dir, *args, check=check, log_text=self.log_text)

    # -- life cycle

    def start(self) -> None:
        if self._started:
            return
        reason = missing_mta("postfix")
        if reason:
            raise MtaError(reason)
        t0 = time.monotonic()
        self.sink.start()
        try:
            self._write_config()
            self._postfix("start")
            self._started = True
            _wait_for_banner(self.port, timeout=20.0)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def reload(self) -> None:
        """Rewrite main.cf/master.cf (e.g. after changing ``extra_main_cf``) and reload."""
        self._write_config()
        self._postfix("reload")

    def stop(self) -> None:
        """Stop master and every Postfix process (they share master's session/process group).

        ``postfix stop`` polls with 1 s sleeps; signalling master directly is faster.
        """
        try:
            pid = self._master_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10.0
                while _process_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
                # master setsid()s: its pid is the process group of all its children
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        finally:
            self._started = False
            self.sink.stop()
            if not self.data_dir.is_relative_to(self.workdir):
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def _master_pid(self) -> int | None:
        pidfile = self.queue_dir / "pid" / "master.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _process_alive(pid) else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# --------------------------------------------------------------------------------------------
# Sendmail


def _sendmail_binary() -> Path:
    for candidate in (
        SENDMAIL_ROOT / "usr/libexec/sendmail/sendmail",
        Path("/usr/libexec/sendmail/sendmail"),
    ):
        if candidate.exists():
            return candidate
    return SENDMAIL_ROOT / "usr/libexec/sendmail/sendmail"


def _sendmail_cf_dir() -> Path:
    for candidate in (SENDMAIL_ROOT / "usr/share/sendmail/cf", Path("/usr/share/sendmail/cf")):
        if (candidate / "m4" / "cf.m4").exists():
            return candidate
    return SENDMAIL_ROOT / "usr/share/sendmail/cf"


#: Macros the harness lists in sendmail.cf per stage (a milter may still request its own).
SENDMAIL_MILTER_MACROS: dict[str, str] = {
    "CONNECT": "j, _, {daemon_name}, {if_name}, {if_addr}, {client_addr}, {client_port}",
    "HELO": (
        "{tls_version}, {cipher}, {cipher_bits}, {cert_subject}, {cert_issuer}, {verify}, "
        "{cn_subject}, {cn_issuer}, {cert_fp}, {cert_md5}"
    ),
    "ENVFROM": (
        "i, {auth_type}, {auth_authen}, {auth_ssf}, {auth_author}, {mail_mailer}, {mail_host}, "
        "{mail_addr}, {tls_version}, {verify}, {cn_subject}, {cn_issuer}, {cert_subject}, "
        "{cert_issuer}, {cert_fp}, {cert_md5}, {client_addr}, {client_port}, j"
    ),
    "ENVRCPT": "{rcpt_mailer}, {rcpt_host}, {rcpt_addr}",
    "EOM": "{msg_id}",
}


#: Runs inside ``unshare --uts --mount``: $1 = harness dir, $2 = host name, then the command.
#: A private /etc/hosts and host name (no 60 s "unqualified host name" sleep, nothing changed on
#: the machine), and a private /dev whose ``log`` points at the harness's syslog socket (sendmail
#: logs only through syslog(3); containers often have no /dev/log). The /dev part is best-effort.
_SENDMAIL_NS_SCRIPT = r"""
set -e
dir=$1; name=$2; shift 2
mount --bind "$dir/hosts" /etc/hosts
hostname "$name"
(
  set -e
  mkdir -p "$dir/dev"
  mount -t tmpfs -o mode=755,size=64k mtls-dev "$dir/dev"
  for n in null zero full random urandom tty; do
    [ -e "/dev/$n" ] || continue
    : > "$dir/dev/$n"
    mount --bind "/dev/$n" "$dir/dev/$n"
  done
  ln -s /proc/self/fd "$dir/dev/fd"
  ln -s "$dir/syslog.sock" "$dir/dev/log"
  mount --move "$dir/dev" /dev
) || echo "mtls harness: no private /dev/log, sendmail logs are lost" >&2
exec "$@"
"""


class _SyslogSink:
    """Receives syslog datagrams on a unix socket and appends the messages to a file."""

    def __init__(self, socket_path: Path, log_path: Path) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o666)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="syslog-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        with self.log_path.open("ab", buffering=0) as fh:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                # "<PRI>Mmm dd hh:mm:ss tag[pid]: msg" -> drop the priority
                if data.startswith(b"<") and b">" in data[:5]:
                    data = data[data.index(b">") + 1 :]
                fh.write(data.rstrip(b"\0\n") + b"\n")

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    log: Path
    pgid: int = field(default=0)


class SendmailHarness(_Harness):
    """A Sendmail daemon (``sendmail -bD -C workdir/sendmail/sendmail.cf``) on ``127.0.0.1:port``.

    ``milter_socket`` uses libmilter's form, ``inet:PORT@127.0.0.1``; ``milter_flags`` is the
    ``F=`` value of ``INPUT_MAIL_FILTER`` (``"T"``: tempfail when the milter is unavailable,
    ``"R"``: reject, ``""``: continue without it). ``extra_mc`` lines are appended to the mc file
    before the mailers. Sendmail runs in its own UTS and mount namespace (``unshare``) with the
    host name ``mx.receiver.test`` and a private ``/etc/hosts`` naming it, so an unqualified
    machine host name cannot make it sleep 60 s at start-up and the machine is not modified.
    Sendmail logs only to syslog; :meth:`log_text` returns its stdout/stderr and the SMTP
    traffic log (``-X``).
    """

    kind = "sendmail"

    def __init__(
        self,
        workdir: Path,
        *,
        milter_socket: str,
        tls: MtaTls | None,
        port: int = 0,
        milter_flags: str = "T",
        milter_timeouts: str = "C:10s;S:10s;R:10s;E:30s",
        milter_macros: Mapping[str, str] | None = None,
        extra_mc: Sequence[str] = (),
        milter_default_action: str | None = None,
    ) -> None:
        super().__init__(workdir, milter_socket=milter_socket, tls=tls, port=port)
        if milter_default_action is not None:  # Postfix-style spelling, for symmetric tests
            milter_flags = {"accept": "", "tempfail": "T", "reject": "R"}[milter_default_action]
        self.milter_flags = milter_flags
        self.milter_timeouts = milter_timeouts
        self.milter_macros = dict(SENDMAIL_MILTER_MACROS)
        self.milter_macros.update(milter_macros or {})
        self.extra_mc = list(extra_mc)
        self.base_dir = self.workdir / "sendmail"
        self.cf_path = self.base_dir / "sendmail.cf"
        self.queue_dir = self.base_dir / "mqueue"
        self.pid_path = self.base_dir / "sendmail.pid"
        self.out_path = self.base_dir / "sendmail.out"
        self.traffic_path = self.base_dir / "traffic.log"
        self.log_path = self.base_dir / "sendmail.log"
        self._syslog = _SyslogSink(self.base_dir / "syslog.sock", self.log_path)
        self._proc: _Process | None = None

    def mc_text(self) -> str:
        b = self.base_dir
        milter_spec = [f"S={self.milter_socket}"]
        if self.milter_flags:
            milter_spec.append(f"F={self.milter_flags}")
        if self.milter_timeouts:
            milter_spec.append(f"T={self.milter_timeouts}")
        lines = [
            "divert(-1)",
            "divert(0)dnl",
            "VERSIONID(`mtls-milter test harness')dnl",
            "OSTYPE(`linux')dnl",
            f"define(`confDOMAIN_NAME', `{_HOSTNAME}')dnl",
            "define(`confDONT_PROBE_INTERFACES', `True')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{b / 'service.switch'}')dnl",
            f"define(`confHOSTS_FILE', `{b / 'hosts'}')dnl",
            f"define(`QUEUE_DIR', `{self.queue_dir}')dnl",
            f"define(`confPID_FILE', `{self.pid_path}')dnl",
            f"define(`STATUS_FILE', `{b / 'statistics'}')dnl",
            f"define(`HELP_FILE', `{b / 'helpfile'}')dnl",
            f"define(`ALIAS_FILE', `{b / 'aliases'}')dnl",
            "define(`confLOG_LEVEL', `14')dnl",
            "define(`confTO_IDENT', `0')dnl",
            "define(`confTO_CONNECT', `5s')dnl",
            "define(`confTO_ICONNECT', `5s')dnl",
            "define(`confDELIVERY_MODE', `background')dnl",
            "define(`confMAX_DAEMON_CHILDREN', `40')dnl",
            "define(`confREFUSE_LA', `1000')dnl",
            "define(`confQUEUE_LA', `1000')dnl",
            "define(`confDELAY_LA', `1000')dnl",
            "define(`confPRIVACY_FLAGS', `authwarnings')dnl",
            "define(`SMART_HOST', `relay:[127.0.0.1]')dnl",
            f"define(`RELAY_MAILER_ARGS', `TCP $h {self.sink.port}')dnl",
            f"define(`ESMTP_MAILER_ARGS', `TCP $h {self.sink.port}')dnl",
            "define(`confCERT_FINGERPRINT_ALGORITHM', `sha256')dnl",
            # workdirs live under /tmp (mode 1777): without this, the safe-file checks reject
            # the TLS files and STARTTLS is silently not offered
            "define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl",
            "FEATURE(`no_default_msa')dnl",
        ]
        if self.tls is not None:
            t = b / "tls"
            lines += [
                f"define(`confCACERT_PATH', `{t / 'cacerts'}')dnl",
                f"define(`confCACERT', `{t / 'ca.pem'}')dnl",
                f"define(`confSERVER_CERT', `{t / 'server.crt'}')dnl",
                f"define(`confSERVER_KEY', `{t / 'server.key'}')dnl",
            ]
        for stage, macros in self.milter_macros.items():
            lines.append(f"define(`confMILTER_MACROS_{stage}', ``{macros}'')dnl")
        lines += [
            "FEATURE(`accept_unresolvable_domains')dnl",
            "FEATURE(`nocanonify')dnl",
            "RELAY_DOMAIN(`receiver.test')dnl",
            f"DAEMON_OPTIONS(`Family=inet, Name=MTA-v4, Port={self.port}, Addr=127.0.0.1')dnl",
        ]
        if self.milter_socket:
            lines.append(f"INPUT_MAIL_FILTER(`mtls', `{', '.join(milter_spec)}')dnl")
        lines += self.extra_mc
        lines += ["MAILER(`local')dnl", "MAILER(`smtp')dnl", ""]
        return "\n".join(lines)

    def _write_config(self) -> None:
        b = self.base_dir
        b.mkdir(parents=True, exist_ok=True)
        os.chmod(b, 0o755)
        self.queue_dir.mkdir(exist_ok=True)
        os.chmod(self.queue_dir, 0o700)
        (b / "service.switch").write_text("hosts files\naliases files\n")
        # 127.0.0.1 first as localhost (what the client address resolves to, as on a normal
        # host); the qualified name on its own address so sendmail finds its canonical name.
        (b / "hosts").write_text(
            f"127.0.0.1 localhost\n127.0.1.1 {_HOSTNAME} {socket.gethostname()}\n"
        )
        (b / "helpfile").write_text("")
        (b / "statistics").write_text("")
        (b / "aliases").write_text("postmaster: root\n")
        if self.tls is not None:
            t = b / "tls"
            (t / "cacerts").mkdir(parents=True, exist_ok=True)
            os.chmod(t, 0o755)
            _copy_private(self.tls.key_path, t / "server.key", 0o600)
            _copy_private(self.tls.cert_path, t / "server.crt", 0o644)
            _copy_private(self.tls.ca_path, t / "ca.pem", 0o644)
        mc = b / "sendmail.mc"
        mc.write_text(self.mc_text())
        cf_dir = _sendmail_cf_dir()
        proc = subprocess.run(
            ["m4", f"-D_CF_DIR_={cf_dir}/", str(cf_dir / "m4" / "cf.m4"), str(mc)],
            capture_output=True,
            timeout=30,
        )
        if proc.returncode != 0 or proc.stderr.strip():
            raise MtaError(f"m4 failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
        self.cf_path.write_bytes(proc.stdout)
        os.chmod(self.cf_path, 0o644)

    def command(self) -> list[str]:
        """The command line that runs the daemon (in the foreground, in its own namespaces)."""
        cmd = [
            str(_sendmail_binary()),
            "-bD",
            f"-C{self.cf_path}",
            f"-X{self.traffic_path}",
        ]
        if shutil.which("unshare") is None:  # pragma: no cover - util-linux is essential
            return cmd
        return ["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c",
                _SENDMAIL_NS_SCRIPT, "sh", str(self.base_dir), _HOSTNAME, *cmd]  # fmt: skip

    def start(self) -> None:
        if self._started:
            return
        reason = missing_mta("sendmail")
        if reason:
            raise MtaError(reason)
        t0 = time.monotonic()
        self.sink.start()
        try:
            self._write_config()
            self._syslog.start()
            out = self.out_path.open("ab")
            popen = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            out.close()
            self._proc = _Process(popen=popen, log=self.out_path, pgid=popen.pid)
            self._started = True

            def alive() -> Iterator[bool]:
                while True:
                    yield popen.poll() is None

            try:
                _wait_for_banner(self.port, timeout=20.0, alive=alive())
            except (MtaError, TimeoutError) as exc:
                raise MtaError(
                    f"sendmail did not start: {exc}\n{self.log_text()[-4000:]}"
                ) from None
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def reload(self) -> None:
        """Rebuild sendmail.cf and restart the daemon (same port)."""
        self.stop()
        self.start()

    def stop(self) -> None:
        try:
            proc, self._proc = self._proc, None
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pgid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(10)
                # daemon children (SMTP sessions, deliveries) share the process group
                deadline = time.monotonic() + 5.0
                while time.monotonic() < deadline and _pgroup_alive(proc.pgid):
                    time.sleep(0.05)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pgid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(5)
        finally:
            self._started = False
            self.sink.stop()
            self._syslog.stop()

    def log_text(self) -> str:
        parts = []
        for path in (self.log_path, self.out_path, self.traffic_path):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name} ---\n" + path.read_text(errors="replace"))
        return "\n".join(parts)


def _process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone: PID 1 may not reap in containers)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] not in (b"Z", b"X")


def _pgroup_alive(pgid: int) -> bool:
    """True while a live (non-zombie) process is in process group ``pgid``."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


# --------------------------------------------------------------------------------------------
# client


@dataclass(frozen=True)
class SmtpReply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class SmtpOutcome:
    """What the server answered at each step; later steps are ``None`` when not reached.

    The conversation stops at the first step that fails (a non-2xx/3xx reply, or the server
    closing the connection, recorded as ``SmtpReply(421, "connection closed by server")``).
    """

    banner: SmtpReply
    ehlo: SmtpReply | None = None
    starttls: SmtpReply | None = None
    tls_version: str | None = None
    mail: SmtpReply | None = None
    rcpt: SmtpReply | None = None
    data: SmtpReply | None = None

    @property
    def final(self) -> SmtpReply:
        """The last reply received (the one that ended the transaction)."""
        for reply in (self.data, self.rcpt, self.mail, self.starttls, self.ehlo):
            if reply is not None:
                return reply
        return self.banner

    @property
    def accepted(self) -> bool:
        return self.data is not None and self.data.code == 250


_CLOSED = SmtpReply(421, "connection closed by server")


def _reply(resp: tuple[int, bytes]) -> SmtpReply:
    return SmtpReply(resp[0], resp[1].decode("utf-8", "replace"))


def send_message(
    port: int,
    *,
    mail_from: str,
    rcpt: str,
    message: bytes,
    helo: str = "out.sender.test",
    starttls: bool = True,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    client_chain: Path | None = None,
    ehlo_after_starttls: bool = True,
    host: str = "127.0.0.1",
    timeout: float = 30.0,
    source_address: str | None = None,
    source_port: int = 0,
) -> SmtpOutcome:
    """Send one message over SMTP and report each reply; never raises on 4xx/5xx replies.

    ``client_chain`` (leaf first, then intermediates) wins over ``client_cert``; the whole file is
    sent. The server certificate is not verified. Raises :class:`MtaError` when ``starttls`` is
    requested but the server does not offer it. ``source_address`` binds the client socket (e.g.
    ``127.0.0.5``, so the MTA sees the client at that address), ``source_port`` its port.
    """
    source = (source_address or "127.0.0.1", source_port) if source_address or source_port else None
    smtp = smtplib.SMTP(timeout=timeout, local_hostname=helo, source_address=source)
    steps: dict[str, SmtpReply | str | None] = {}

    def outcome() -> SmtpOutcome:
        return SmtpOutcome(**steps)  # type: ignore[arg-type]

    try:
        steps["banner"] = banner = _reply(smtp.connect(host, port))
        if banner.code != 220:
            return outcome()
        steps["ehlo"] = ehlo = _reply(smtp.ehlo())
        if ehlo.code != 250:
            return outcome()
        if starttls:
            if not smtp.has_extn("starttls"):
                raise MtaError(f"STARTTLS not offered on port {port}: {smtp.ehlo_resp!r}")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            cert = client_chain or client_cert
            if cert is not None:
                ctx.load_cert_chain(str(cert), str(client_key) if client_key else None)
            code, text = smtp.docmd("STARTTLS")
            steps["starttls"] = SmtpReply(code, text.decode("utf-8", "replace"))
            if code != 220:
                return outcome()
            assert smtp.sock is not None
            smtp.sock = ctx.wrap_socket(smtp.sock, server_hostname=host)
            smtp.file = None
            smtp.helo_resp = smtp.ehlo_resp = None
            smtp.esmtp_features = {}
            smtp.does_esmtp = False
            if isinstance(smtp.sock, ssl.SSLSocket):
                steps["tls_version"] = smtp.sock.version()
            if ehlo_after_starttls:
                again = _reply(smtp.ehlo())
                if again.code != 250:
                    steps["ehlo"] = again
                    return outcome()
        steps["mail"] = mail = _reply(smtp.mail(mail_from))
        if mail.code != 250:
            return outcome()
        steps["rcpt"] = rcpt_reply = _reply(smtp.rcpt(rcpt))
        if rcpt_reply.code not in (250, 251):
            return outcome()
        try:
            steps["data"] = _reply(smtp.data(message))
        except smtplib.SMTPDataError as exc:
            err = exc.smtp_error
            err_text = err.decode("utf-8", "replace") if isinstance(err, bytes) else str(err)
            steps["data"] = SmtpReply(exc.smtp_code, err_text)
        return outcome()
    except smtplib.SMTPServerDisconnected:
        for step in ("banner", "ehlo", "starttls", "mail", "rcpt", "data"):
            if step not in steps:
                steps[step] = _CLOSED
                break
        return outcome()
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        smtp.close()
