"""DnsResolver against a real DNS server from Debian (dnsmasq) serving Client MX as TYPE265."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import dns.rdata
import pytest
from support.ports import free_port

from mtls_milter.core.lookups import LookupStatus
from mtls_milter.net.dns import DnsResolver

pytestmark = pytest.mark.e2e

DNSMASQ = "/usr/sbin/dnsmasq"


def mx_hex(text: str) -> str:
    wire = dns.rdata.from_text("IN", "MX", text).to_wire()
    assert wire is not None
    return wire.hex()


@pytest.fixture
def dnsmasq() -> Iterator[str]:
    """A dnsmasq serving the test zone; yields its ``127.0.0.1:PORT``."""
    if not shutil.which(DNSMASQ):
        pytest.skip(
            f"!!! {DNSMASQ} is missing: install the Debian package dnsmasq-base "
            "(the Makefile does this in CI) to run the real-DNS-server tests !!!"
        )
    port = free_port(udp=True)
    command = [
        DNSMASQ,
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--conf-file=/dev/null",
        "--pid-file=",  # no pid file: nothing left behind, works unprivileged too
        "--log-facility=-",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        # Without this, dnsmasq answers REFUSED (no upstream) for names it does not know.
        "--local=/test/",
        f"--dns-rr=sender.test,265,{mx_hex('10 out.sender.test.')}",
        f"--dns-rr=two.test,265,{mx_hex('20 Out2.two.test.')}",
        f"--dns-rr=two.test,265,{mx_hex('10 out1.two.test.')}",
        f"--dns-rr=null.test,265,{mx_hex('0 .')}",
        "--mx-host=mx.test,mail.mx.test,10",
        "--host-record=implicit.test,192.0.2.7",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        nameserver = f"127.0.0.1:{port}"
        probe = DnsResolver([nameserver], timeout=0.1, cache_size=0)
        deadline = time.monotonic() + 5
        while probe.client_mx("sender.test", 0.1).status is not LookupStatus.OK:
            if process.poll() is not None or time.monotonic() > deadline:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"dnsmasq did not start: {output}")
            time.sleep(0.01)
        yield nameserver
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


def test_client_mx_from_dnsmasq(dnsmasq: str) -> None:
    result = DnsResolver([dnsmasq]).client_mx("sender.test", 5)
    assert result.status is LookupStatus.OK
    assert result.hosts == ("out.sender.test",)


def test_two_client_mx_records_from_dnsmasq(dnsmasq: str) -> None:
    result = DnsResolver([dnsmasq]).client_mx("two.test", 5)
    assert result.status is LookupStatus.OK
    assert result.hosts == ("out1.two.test", "out2.two.test")


def test_null_client_mx_from_dnsmasq(dnsmasq: str) -> None:
    result = DnsResolver([dnsmasq]).client_mx("null.test", 5)
    assert (result.status, result.null, result.hosts) == (LookupStatus.OK, True, ())


def test_missing_client_mx_from_dnsmasq(dnsmasq: str) -> None:
    resolver = DnsResolver([dnsmasq])
    assert resolver.client_mx("nobody.test", 5).status is LookupStatus.NOT_FOUND
    assert resolver.client_mx("mx.test", 5).status is LookupStatus.NOT_FOUND


def test_server_mx_from_dnsmasq(dnsmasq: str) -> None:
    resolver = DnsResolver([dnsmasq])
    assert resolver.server_mx("mx.test", 5).hosts == ("mail.mx.test",)
    implicit = resolver.server_mx("implicit.test", 5)
    assert (implicit.status, implicit.implicit, implicit.hosts) == (
        LookupStatus.OK,
        True,
        ("implicit.test",),
    )
