"""The records ``mtls-milter record`` prints, served by a real DNS server (dnsmasq, Debian),
answer the Client MX query the milter makes with the hosts given."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from support.ports import free_port

from mtls_milter.cli.record import record_lines
from mtls_milter.core.lookups import LookupStatus
from mtls_milter.net.dns import DnsResolver

pytestmark = pytest.mark.e2e

DNSMASQ = "/usr/sbin/dnsmasq"


@pytest.fixture
def served() -> Iterator[str]:
    if not shutil.which(DNSMASQ):
        pytest.skip(f"!!! {DNSMASQ} is missing: install the Debian package dnsmasq-base !!!")
    lines = record_lines("sender.test", ["out1.sender.test", "out2.sender.test"])
    options = [f"--{line}" for line in lines if line.startswith("dns-rr=")]
    assert len(options) == 2
    port = free_port(udp=True)
    command = [
        DNSMASQ,
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--conf-file=/dev/null",
        "--pid-file=",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--local=/test/",
        *options,
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        nameserver = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 5
        probe = DnsResolver([nameserver], timeout=0.1, cache_size=0)
        while probe.client_mx("sender.test", 0.1).status is not LookupStatus.OK:
            assert process.poll() is None and time.monotonic() < deadline, "dnsmasq did not start"
            time.sleep(0.02)
        yield nameserver
    finally:
        process.terminate()
        process.wait(5)


def test_printed_records_answer_the_client_mx_query(served: str) -> None:
    result = DnsResolver([served]).client_mx("sender.test", 5)
    assert result.status is LookupStatus.OK
    assert result.hosts == ("out1.sender.test", "out2.sender.test")
