"""The shipped dashboard and alert rules against a real Prometheus scraping a real daemon.

``mtls-milter serve`` (``[metrics] listen`` on loopback, ``on_fail = "reject"``,
``on_temperror = "tempfail"``) judges a mix of messages sent with the raw milter client and
Postfix's macros: pass, fail (no TLS), none (no Client MX) and temperror (the domain's name
server answers SERVFAIL). A real Prometheus scrapes it every second. Then every query of
examples/grafana/mtls-milter.json, with Grafana's variables filled in as Grafana does, must be
accepted by Prometheus, and the panels an operator looks at while mail flows must show the
traffic sent; every alert expression of examples/prometheus/alerts.yml must evaluate, and on
this traffic (30% temperror) exactly the temperror alert's condition holds; once the daemon
is stopped, the milter-down condition holds.

Prometheus comes from Debian's package unpacked by tests/e2e/install_prometheus.sh (never
installed or started as a service); without it the test skips, under CI it fails.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.daemon import MilterDaemon
from support.dnsserver import TestDnsServer
from support.milter_client import full_conversation
from support.pki import TestPki
from support.ports import free_port
from support.prometheus import PrometheusServer, require

from mtls_milter import __version__

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "examples" / "grafana" / "mtls-milter.json"
ALERTS = ROOT / "examples" / "prometheus" / "alerts.yml"
JOB = "mtls-milter"  # the job name the alert rules match

VERIFIED = {"{tls_version}": "TLSv1.3", "{cert_subject}": "out.sender.test", "{cert_issuer}": "CA"}
MIX = [  # (MAIL FROM, TLS macros, expected result) × count
    *[("a@sender.test", VERIFIED, "pass")] * 4,
    *[("a@sender.test", {}, "fail")] * 2,
    ("a@plain.test", VERIFIED, "none"),
    *[("a@broken.test", VERIFIED, "temperror")] * 3,
]
# Panels that must show the traffic above (the others need DMARC, chain fetches, the policy
# map or ACME, which this daemon does not do).
MUST_SHOW = {
    "Milter up",
    "Messages per second",
    "mtls pass share",
    "Open milter connections",
    "Workers",
    "Trust anchors",
    "Last reload OK",
    "Version",
    "Verdicts by result",
    "Why not pass (reason class)",
    "Evidence kinds",
    "Actions taken",
    "Evaluation and message time p99",
    "DNS lookup latency by record type",
    "DNS cache hit ratio",
    "DNS cache entries",
    "Configuration generation",
    "Configuration age",
}


def send(daemon: MilterDaemon, sender: str, tls: dict[str, str]) -> str:
    """One message as Postfix sends it; the final reply command (a accept, y reply code)."""
    result = full_conversation(
        ("127.0.0.1", daemon.port),
        sender=f"<{sender}>",
        headers=(("Subject", "dashboard"),),
        tls=tls,
        helo="out.sender.test",
        j="mx.receiver.test",
    )
    return result.final.command.decode()


def grafana_query(expr: str) -> str:
    """A panel query as Grafana sends it: All for the variables, a 30 s rate window."""
    expr = expr.replace("$__rate_interval", "30s")
    return expr.replace("$job", JOB).replace("$instance", ".*")


def shown_values(series: list[dict[str, Any]]) -> list[float]:
    """The numbers a panel would draw (NaN from an empty histogram window is not a value)."""
    values = [float(s["value"][1]) for s in series]
    return [v for v in values if not math.isnan(v)]


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def milter(
    tmp_path: Path, pki: TestPki, request: pytest.FixtureRequest
) -> Iterator[tuple[MilterDaemon, str]]:
    require("prometheus")  # before anything starts: skip (or fail under CI) at once
    trust = tmp_path / "trust.pem"
    trust.write_bytes(pki.root_path.read_bytes())
    listen = f"127.0.0.1:{free_port()}"
    with TestDnsServer() as dns:
        dns.add("sender.test", 265, "10 out.sender.test.")
        dns.servfail("broken.test")
        config: dict[str, dict[str, Any]] = {
            "milter": {
                "authserv_id": "mx.receiver.test",
                "transport": "asyncio",
                "workers": request.param,  # two: the supervisor adds up the workers' figures
            },
            "dns": {"nameservers": [dns.nameserver], "timeout": 1.0, "budget": 2.0},
            "tls": {"trust": [str(trust)]},
            "policy": {"on_fail": "reject", "on_temperror": "tempfail"},
            "metrics": {"listen": listen},
        }
        with MilterDaemon(tmp_path / "milter", config) as running:
            yield running, listen


def test_dashboard_and_alerts_on_real_traffic(
    milter: tuple[MilterDaemon, str], tmp_path: Path
) -> None:
    daemon, listen = milter
    with PrometheusServer(tmp_path / "prometheus", [listen], job=JOB) as prometheus:
        assert prometheus.wait_for_value(f'up{{job="{JOB}"}}', 1) == 1
        # Twice, a scrape apart: a series is born with its first value, which rate() does not
        # count as an increase, so the second round is what the rate panels show.
        for rounds in (1, 2):
            replies = [send(daemon, sender, tls) for sender, tls, _ in MIX]
            assert replies.count("a") == 5 and replies.count("y") == 5  # 2 reject, 3 tempfail
            total = prometheus.wait_for_value("sum(mtls_milter_verdicts_total)", rounds * len(MIX))
            assert total == rounds * len(MIX)
        time.sleep(2)  # a few more scrapes within the rate window

        panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
        shown: dict[str, list[dict[str, Any]]] = {}
        for panel in panels:  # Prometheus refuses a query it cannot parse or evaluate
            for target in panel["targets"]:
                series = prometheus.query(grafana_query(target["expr"]))
                shown.setdefault(panel["title"], []).extend(series)
        blank = sorted(t for t in MUST_SHOW if not shown_values(shown[t]))
        assert blank == []

        results = {s["metric"]["result"] for s in shown["Verdicts by result"]}
        assert results == {"pass", "fail", "none", "temperror"}
        actions = {s["metric"]["action"]: float(s["value"][1]) for s in shown["Actions taken"]}
        assert actions["reject"] > 0 and actions["tempfail"] > 0
        assert [s["metric"]["version"] for s in shown["Version"]] == [__version__]

        rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
        holding = sorted(r["alert"] for r in rules if prometheus.query(r["expr"]))
        assert holding == ["MtlsMilterTemperrorRatioHigh"]

        daemon.stop()
        assert prometheus.wait_for_value(f'up{{job="{JOB}"}}', 0) == 0
        down = next(r for r in rules if r["alert"] == "MtlsMilterDown")
        assert [s["metric"]["instance"] for s in prometheus.query(down["expr"])] == [listen]
