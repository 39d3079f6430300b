"""Re-capture the milter conversations in tests/data/milter/ from real MTAs (run as root).

    .venv/bin/python tests/support/capture_milter_fixtures.py [OUTDIR] [--transport pymilter]
    .venv/bin/python tests/support/capture_milter_fixtures.py --transport asyncio  # -> asyncio/

Starts the in-process DNS server, the test PKI and ``mtls-milter serve`` (pymilter transport by
default, so the replies are libmilter's), puts a :class:`~support.milter_capture.CaptureProxy`
in front of it and sends one message per case through real Postfix / Sendmail (and runs
``miltertest`` with bench/lua/conversation.lua), writing one ``.hex`` file per case.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.daemon import MilterDaemon
from support.dnsserver import TestDnsServer
from support.milter_capture import CaptureProxy, Conversation, write_capture
from support.mta import MtaTls, PostfixHarness, SendmailHarness, send_message
from support.pki import TestPki, build_test_pki
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "data" / "milter"
MESSAGE = (
    b"From: Some One <someone@sender.test>\r\n"
    b"To: <someone@receiver.test>\r\n"
    b"Subject: capture\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <capture@sender.test>\r\n"
    b"X-Folded: first part\r\n\tsecond part\r\n"
    b"\r\n"
    b"Body line.\r\n.Dot line.\r\n"
)
# Macros at every stage Postfix has (its defaults send none at EOH and only "i" at EOM).
POSTFIX_MACROS = {
    "milter_end_of_header_macros": "i {mail_addr}",
    "milter_end_of_data_macros": "i {tls_version} {cert_subject}",
}


def _settle(proxy: CaptureProxy, before: int, timeout: float = 10.0) -> list[Conversation]:
    """Wait until the MTA closed the new milter connections (every chunk is recorded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = proxy.conversations[before:]
        if new and all(c.ended for c in new):
            break
        time.sleep(0.1)
    return proxy.conversations[before:]


def _send(port: int, pki: TestPki, *, tls: bool) -> None:
    leaf = pki.leaves["client"]
    extra = {"client_chain": leaf.chain_path, "client_key": leaf.key_path} if tls else {}
    outcome = send_message(
        port,
        mail_from="someone@sender.test",
        rcpt="someone@receiver.test",
        message=MESSAGE,
        starttls=tls,
        **extra,  # type: ignore[arg-type]
    )
    if not outcome.accepted:
        raise RuntimeError(f"message not accepted: {outcome}")


def _send_two(port: int, pki: TestPki) -> None:
    """Two messages in one SMTP session after STARTTLS (one milter connection for both)."""
    leaf = pki.leaves["client"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(str(leaf.chain_path), str(leaf.key_path))
    with smtplib.SMTP("127.0.0.1", port, local_hostname="out.sender.test", timeout=30) as smtp:
        smtp.starttls(context=context)
        for number in (1, 2):
            message = MESSAGE.replace(b"Subject: capture", b"Subject: capture %d" % number)
            smtp.sendmail("someone@sender.test", ["someone@receiver.test"], message)


def _send_full(port: int) -> None:
    """An unknown command, a refused and an accepted recipient, a message with a body."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="out.sender.test", timeout=30) as smtp:
        smtp.ehlo()
        smtp.docmd("XYZZY")
        smtp.mail("someone@sender.test")
        code, text = smtp.rcpt("reject@receiver.test")
        if code != 550 or b"by the full milter" not in text:
            raise RuntimeError(f"RCPT reject@: {code} {text!r}")
        smtp.rcpt("someone@receiver.test")
        smtp.data(MESSAGE)


def _full_milter(port: int) -> subprocess.Popen[bytes]:
    script = Path(__file__).with_name("full_milter.py")
    proc = subprocess.Popen([sys.executable, str(script), f"inet:{port}@127.0.0.1"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("full_milter.py did not start")


def _capture_full(tls: MtaTls, out: Path, work: Path) -> None:
    """Postfix against tests/support/full_milter.py: every step, every kind of answer."""
    port = free_port()
    milter = _full_milter(port)
    try:
        with (
            CaptureProxy(("127.0.0.1", port)) as proxy,
            PostfixHarness(
                work / "postfix-full", milter_socket=proxy.postfix_socket, tls=tls
            ) as postfix,
        ):
            comment = (
                "Postfix 3.7, no TLS, against tests/support/full_milter.py (pymilter: every step,"
                "\nRCPT refused with a two-line reply, body, unknown command, header add/insert/"
                "\nchange/delete, quarantine)"
            )
            send = partial(_send_full, postfix.port)
            _capture("postfix37-full-libmilter", proxy, out, comment, send)
    finally:
        milter.terminate()
        milter.wait(10)


def _capture(
    name: str, proxy: CaptureProxy, out: Path, comment: str, run: Callable[[], None]
) -> None:
    before = len(proxy.conversations)
    run()
    conversations = _settle(proxy, before)
    write_capture(out / f"{name}.hex", conversations, comment)
    print(f"{name}: {len(conversations)} connection(s)", flush=True)


def _miltertest(proxy: CaptureProxy) -> None:
    script = REPO / "bench" / "lua" / "conversation.lua"
    command = [shutil.which("miltertest") or "miltertest", "-s", str(script),
               "-D", f"sock=inet:{proxy.port}@127.0.0.1", "-D", "count=1",
               "-D", "header=Authentication-Results"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if "DONE 1" not in done.stdout:
        raise RuntimeError(f"miltertest failed: {done.stdout}{done.stderr}")


def _capture_all(
    proxy: CaptureProxy, pki: TestPki, tls: MtaTls, out: Path, work: Path, note: str
) -> None:
    """One capture file per case in ``out``; the MTAs run under ``work``."""
    postfix = PostfixHarness(
        work / "postfix", milter_socket=proxy.postfix_socket, tls=tls, extra_main_cf=POSTFIX_MACROS
    )
    with postfix:
        for name, with_tls, what in (
            ("postfix37-tls-cert", True, "STARTTLS + client certificate"),
            ("postfix37-plain", False, "no TLS"),
        ):
            send = partial(_send, postfix.port, pki, tls=with_tls)
            _capture(name, proxy, out, f"Postfix 3.7, {what}; {note}", send)
        comment = f"Postfix 3.7, STARTTLS + client certificate, two messages; {note}"
        send = partial(_send_two, postfix.port, pki)
        _capture("postfix37-tls-two-messages", proxy, out, comment, send)
    sendmail = SendmailHarness(
        work / "sendmail", milter_socket=proxy.sendmail_socket, tls=tls, milter_flags=""
    )
    with sendmail:
        send = partial(_send, sendmail.port, pki, tls=True)
        comment = f"Sendmail 8.17, STARTTLS + client certificate; {note}"
        _capture("sendmail817-tls-cert", proxy, out, comment, send)
    comment = f"miltertest, bench/lua/conversation.lua (count=1); {note}"
    _capture("miltertest-conversation", proxy, out, comment, partial(_miltertest, proxy))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Re-capture tests/data/milter/ (as root).")
    parser.add_argument("outdir", nargs="?", type=Path)
    parser.add_argument("--transport", default="pymilter", choices=("pymilter", "asyncio"))
    args = parser.parse_args(argv)
    out: Path = args.outdir or (OUT if args.transport == "pymilter" else OUT / args.transport)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="milter-capture-"))
    pki = build_test_pki(work / "pki")
    mx = pki.leaves["mx-server"]
    tls = MtaTls(cert_path=mx.chain_path, key_path=mx.key_path, ca_path=pki.root_path)
    note = f"captured by tests/support/capture_milter_fixtures.py, {args.transport} milter"
    with TestDnsServer() as dns:
        dns.add("sender.test", 265, "10 out.sender.test.")
        config = {
            "milter": {"authserv_id": "mx.receiver.test", "transport": args.transport},
            "dns": {"nameservers": [dns.nameserver], "timeout": 1.0, "budget": 3.0},
            "tls": {"trust": [str(pki.root_path)]},
        }
        with (
            MilterDaemon(work / "milter", config) as daemon,
            CaptureProxy(("127.0.0.1", daemon.port)) as proxy,
        ):
            _capture_all(proxy, pki, tls, out, work, note)
    if args.transport == "pymilter":
        _capture_full(tls, out, work)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
