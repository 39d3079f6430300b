"""Metrics end to end: a real Prometheus scrapes a real ``mtls-milter serve`` every second.

The daemon runs with ``[metrics] listen`` on loopback, on each transport; messages go through
the raw milter client with Postfix's macros (a certificate the MTA verified, no TLS, a sender
without Client MX). The
test then asks Prometheus's HTTP API (``/api/v1/query``) for the counters, which must have moved
by exactly the messages sent, under the documented labels. Then the trust store file is made
unreadable and the daemon reloaded: the reload is refused, ``/healthz`` answers 503 with the
reason, and Prometheus sees ``mtls_milter_config_last_reload_ok`` drop to 0.

Prometheus comes from Debian's package unpacked by tests/e2e/install_prometheus.sh (never
installed or started as a service); without it the test skips, under CI it fails.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.daemon import MilterDaemon
from support.dnsserver import TestDnsServer
from support.milter_client import full_conversation
from support.pki import TestPki
from support.ports import free_port
from support.prometheus import PrometheusServer, require

pytestmark = pytest.mark.e2e

VERIFIED = {"{tls_version}": "TLSv1.3", "{cert_subject}": "out.sender.test", "{cert_issuer}": "CA"}
SENT = [  # (MAIL FROM, TLS macros, expected verdict labels)
    ("someone@sender.test", VERIFIED, ("pass", "ok", "mta")),
    ("someone@sender.test", VERIFIED, ("pass", "ok", "mta")),
    ("someone@sender.test", VERIFIED, ("pass", "ok", "mta")),
    ("someone@sender.test", {}, ("fail", "no_tls", "none")),
    ("someone@sender.test", {}, ("fail", "no_tls", "none")),
    ("someone@plain.test", VERIFIED, ("none", "not_opted_in", "none")),
]


def send(daemon: MilterDaemon, sender: str, tls: dict[str, str]) -> str:
    """One message as Postfix sends it; the Authentication-Results value the milter adds."""
    result = full_conversation(
        ("127.0.0.1", daemon.port),
        sender=f"<{sender}>",
        headers=(("Subject", "metrics"),),
        tls=tls,
        helo="out.sender.test",
        j="mx.receiver.test",
    )
    (value,) = result.header_values("Authentication-Results")
    return value


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(params=["asyncio", "pymilter"])
def milter(
    request: pytest.FixtureRequest, tmp_path: Path, pki: TestPki
) -> Iterator[tuple[MilterDaemon, str, Path]]:
    require("prometheus")  # before anything starts: skip (or fail under CI) at once
    trust = tmp_path / "trust.pem"
    trust.write_bytes(pki.root_path.read_bytes())
    listen = f"127.0.0.1:{free_port()}"
    with TestDnsServer() as dns:
        dns.add("sender.test", 265, "10 out.sender.test.")
        config: dict[str, dict[str, Any]] = {
            "milter": {"authserv_id": "mx.receiver.test", "transport": request.param},
            "dns": {"nameservers": [dns.nameserver], "timeout": 1.0, "budget": 2.0},
            "tls": {"trust": [str(trust)]},
            "metrics": {"listen": listen},
        }
        with MilterDaemon(tmp_path / "milter", config) as running:
            yield running, listen, trust


def test_prometheus_sees_exactly_the_messages_sent_and_the_failed_reload(
    milter: tuple[MilterDaemon, str, Path], tmp_path: Path
) -> None:
    daemon, listen, trust = milter
    assert get(f"http://{listen}/healthz") == (200, "ok\n")
    with PrometheusServer(tmp_path / "prometheus", [listen]) as prometheus:
        assert prometheus.wait_for_value('up{job="mtls-milter"}', 1) == 1
        for sender, tls, (result, _, _) in SENT:
            assert f"mtls={result}" in send(daemon, sender, tls)

        expected: dict[tuple[str, str, str], int] = {}
        for _, _, labels in SENT:
            expected[labels] = expected.get(labels, 0) + 1
        total = "sum(mtls_milter_verdicts_total)"
        assert prometheus.wait_for_value(total, len(SENT)) == len(SENT)
        for (result, reason_class, evidence), count in expected.items():
            selector = (
                f'mtls_milter_verdicts_total{{result="{result}",'
                f'reason_class="{reason_class}",evidence="{evidence}"}}'
            )
            assert prometheus.value(selector) == count, selector
        assert prometheus.value('mtls_milter_actions_total{action="accept"}') == len(SENT)
        assert prometheus.value("mtls_milter_message_seconds_count") == len(SENT)
        assert prometheus.value("mtls_milter_evaluation_seconds_count") == len(SENT)
        assert prometheus.value('mtls_milter_dns_cache_lookups_total{outcome="hit"}') == 4
        assert prometheus.value('mtls_milter_dns_cache_lookups_total{outcome="miss"}') == 2
        assert prometheus.value("mtls_milter_trust_anchors") == 1
        assert prometheus.value("mtls_milter_config_last_reload_ok") == 1
        assert prometheus.value('mtls_milter_build_info{version="0.1.0"}') == 1

        generation = scraped(listen, "mtls_milter_config_generation")
        assert daemon.signal_reload() and daemon.signal_reload()
        assert scraped(listen, "mtls_milter_config_generation") == generation + 2  # each reload

        trust.write_text("not a certificate\n")
        assert daemon.signal_reload() is False  # refused: the running trust store stays
        status, body = get(f"http://{listen}/healthz")
        assert status == 503
        assert body.startswith(f"trust store not loaded: {trust}: ")
        assert body.endswith("\n") and body.count("\n") == 1
        ok = "mtls_milter_config_last_reload_ok"
        assert prometheus.wait_for_value(ok, 0) == 0
        assert "mtls=pass" in send(daemon, *SENT[0][:2])  # still judging with the old store


def scraped(listen: str, name: str) -> float:
    """One unlabelled sample straight from the daemon's /metrics."""
    status, body = get(f"http://{listen}/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (the supervisor's workers)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return sorted(int(p) for p in path.read_text().split())


def test_with_workers_the_parent_serves_the_sum_and_a_killed_worker_keeps_its_counts(
    tmp_path: Path, pki: TestPki
) -> None:
    require("prometheus")
    listen = f"127.0.0.1:{free_port()}"
    with TestDnsServer() as dns:
        dns.add("sender.test", 265, "10 out.sender.test.")
        config: dict[str, dict[str, Any]] = {
            "milter": {"authserv_id": "mx.receiver.test", "workers": 2},
            "dns": {"nameservers": [dns.nameserver], "timeout": 1.0, "budget": 2.0},
            "tls": {"trust": [str(pki.root_path)]},
            "metrics": {"listen": listen},
        }
        with (
            MilterDaemon(tmp_path / "milter", config) as daemon,
            PrometheusServer(tmp_path / "prometheus", [listen]) as prometheus,
        ):
            assert prometheus.wait_for_value("mtls_milter_workers", 2) == 2
            for number in range(8):
                sender, tls, _ = SENT[number % 2 * 3]  # pass, no TLS, pass, ...
                send(daemon, sender, tls)
            total = "sum(mtls_milter_verdicts_total)"
            assert prometheus.wait_for_value(total, 8) == 8  # every worker flushes each second
            pid = daemon.pid
            assert pid is not None
            victim = children(pid)[0]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while victim in children(pid) or len(children(pid)) < 2:
                assert time.monotonic() < deadline, daemon.log_tail()
                time.sleep(0.1)
            send(daemon, *SENT[0][:2])
            assert prometheus.wait_for_value(total, 9) == 9  # what the killed worker counted stays
            assert prometheus.wait_for_value("mtls_milter_workers", 2) == 2
            assert prometheus.value('mtls_milter_verdicts_total{result="pass"}') == 5
            assert get(f"http://{listen}/healthz") == (200, "ok\n")
            assert prometheus.value("mtls_milter_config_last_reload_ok") == 1
            assert prometheus.value("mtls_milter_trust_anchors") == 1
