"""The shipped Grafana dashboard and Prometheus rules name only what the product exports.

``examples/grafana/mtls-milter.json`` and ``examples/prometheus/alerts.yml`` are checked
against the metric families the product registers: every ``mtls_milter_*`` name in a PromQL
expression must be a sample name the family really has (a counter ``X`` has ``X_total``, a
histogram ``X`` has ``X_bucket``/``X_sum``/``X_count``, a gauge ``X`` is ``X``), every label an
expression filters or groups on must exist, and a label value matched literally must be one the
product can write. ``promtool`` (Prometheus 2.42, unpacked by tests/e2e/install_prometheus.sh,
never installed as a package) checks the rule file, the scrape snippet and the PromQL syntax of
every dashboard query, and unit-tests three alerts. Without promtool those tests skip
loudly, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from support.prometheus import require

from mtls_milter.core.evaluate import Result
from mtls_milter.core.evidence import EvidenceKind
from mtls_milter.core.reason_class import REASON_CLASSES
from mtls_milter.inbound.metrics_observer import ACTIONS, DMARC_RESULTS
from mtls_milter.runtime.metrics import RRTYPES, Metrics, metric_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "examples" / "grafana" / "mtls-milter.json"
ALERTS = ROOT / "examples" / "prometheus" / "alerts.yml"
SCRAPE = ROOT / "examples" / "prometheus" / "prometheus.yml"
DATASOURCE_UID = "${datasource}"


@dataclass(frozen=True)
class Family:
    """One exported metric family: its type, its labels and the values a label can take."""

    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...] = ()

    def sample_names(self, name: str) -> set[str]:
        if self.kind == "counter":
            return {f"{name}_total"}
        if self.kind == "histogram":
            return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        return {name}


def exported_families() -> dict[str, Family]:
    """What the product exports, from its own registry: family name (as prometheus_client
    names it: a counter without _total) → type and label names. Families computed at scrape
    time (named by ``metric_names`` but not registered) are unlabelled gauges."""
    registry = CollectorRegistry()
    created = Metrics(registry)
    labels = {
        wrapper._name: tuple(wrapper._labelnames)  # prometheus_client keeps them nowhere public
        for wrapper in vars(created).values()
        if isinstance(wrapper, MetricWrapperBase)
    }
    families = {f.name: Family(f.type, labels.get(f.name, ())) for f in registry.collect()}
    for name in metric_names():
        if name.removesuffix("_total") not in families:
            families[name] = Family("gauge")
    return families


EXPORTED = exported_families()
# Label values the product writes, per label name (a literal matcher must use one of these).
LABEL_VALUES: dict[str, frozenset[str]] = {
    "action": ACTIONS,
    "outcome": frozenset({"ok", "failed", "timeout", "refused", "skipped", "hit", "miss"}),
    "kind": frozenset({"OK", "NOTFOUND", "TEMP", "PERM"}),
    "rrtype": RRTYPES,
    "evidence": frozenset(kind.value for kind in EvidenceKind),
    "reason_class": REASON_CLASSES,
    # mtls results and DMARC results / ACME validation results share the label name
    "result": frozenset(r.value for r in Result) | DMARC_RESULTS | {"valid", "invalid", "error"},
}
# Labels Prometheus adds to every scraped series (histogram buckets add le).
TARGET_LABELS = frozenset({"job", "instance"})

_METRIC = re.compile(r"\bmtls_milter_[a-z_]+\b")
_SELECTOR = re.compile(r"\b(mtls_milter_[a-z_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def sample_names() -> dict[str, tuple[str, Family]]:
    """Every sample name the product can expose → (family name, family)."""
    names: dict[str, tuple[str, Family]] = {}
    for family_name, family in EXPORTED.items():
        for sample in family.sample_names(family_name):
            names[sample] = (family_name, family)
    return names


def expression_problems(expr: str) -> list[str]:
    """What is wrong with one PromQL expression's use of our metrics (empty when nothing)."""
    known = sample_names()
    problems = [f"{name}: not exported" for name in _METRIC.findall(expr) if name not in known]
    labels_here = set(TARGET_LABELS)
    for name, body in _SELECTOR.findall(expr):
        if name not in known:
            continue
        family = known[name][1]
        allowed = (
            TARGET_LABELS | set(family.labels) | ({"le"} if name.endswith("_bucket") else set())
        )
        labels_here |= allowed
        for label, op, value in _MATCHER.findall(body):
            if label not in allowed:
                problems.append(f"{name}: no label {label!r}")
            elif label in LABEL_VALUES and op in ("=", "!=", "=~", "!~") and "$" not in value:
                bad = set(value.split("|")) - LABEL_VALUES[label]
                if bad:
                    problems.append(f"{name}: {label} never takes {sorted(bad)}")
    for grouping in _GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            if label not in labels_here:
                problems.append(f"grouping by {label!r}, which no metric here has")
    return problems


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included (rows themselves are not panels)."""
    for panel in data["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
    ]


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


# --- the checker itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(mtls_milter_verdict_total[5m])", "mtls_milter_verdict_total: not exported"),
        ("mtls_milter_evaluation_seconds", "mtls_milter_evaluation_seconds: not exported"),
        ("rate(mtls_milter_workers_total[5m])", "mtls_milter_workers_total: not exported"),
        ("mtls_milter_verdicts_total_bucket", "mtls_milter_verdicts_total_bucket: not exported"),
        (
            'mtls_milter_actions_total{result="pass"}',
            "mtls_milter_actions_total: no label 'result'",
        ),
        ('mtls_milter_actions_total{action="bounce"}', "action never takes ['bounce']"),
        ('mtls_milter_verdicts_total{result=~"pass|ok"}', "result never takes ['ok']"),
        ("sum by (rrtype) (mtls_milter_verdicts_total{})", "grouping by 'rrtype'"),
        ('mtls_milter_evaluation_seconds_count{le="1"}', "no label 'le'"),
    ],
)
def test_checker_finds_wrong_names_labels_and_values(expr: str, problem: str) -> None:
    assert any(problem in found for found in expression_problems(expr)), expression_problems(expr)


def test_checker_accepts_what_is_exported() -> None:
    assert (
        expression_problems(
            "histogram_quantile(0.99, sum by (le, rrtype) (rate("
            'mtls_milter_dns_lookup_seconds_bucket{job=~"$job", rrtype="client_mx"}[5m])))'
            " + mtls_milter_evaluation_seconds_sum"
            ' + mtls_milter_dns_cache_lookups_total{outcome="hit"} + mtls_milter_workers'
        )
        == []
    )


# --- the dashboard ---------------------------------------------------------------------------


def test_dashboard_is_importable_with_a_prometheus_input() -> None:
    data = dashboard()
    assert data["title"] == "mtls-milter" and data["uid"] and data["id"] is None
    assert data["schemaVersion"] >= 36
    assert [i["name"] for i in data["__inputs"]] == ["DS_PROMETHEUS"]
    assert data["__inputs"][0]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
    assert {"job", "instance"} <= variables.keys()


def test_every_panel_has_a_title_a_description_and_the_templated_datasource() -> None:
    data = dashboard()
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(data):
        title = panel.get("title", "").strip()
        assert title, f"panel {panel.get('id')} has no title"
        assert len(panel.get("description", "")) >= 40, f"{title}: no useful description"
        assert panel.get("datasource", {}).get("uid") == DATASOURCE_UID, title
        assert panel["targets"], f"{title}: no query"
        for target in panel["targets"]:
            assert target.get("datasource", {}).get("uid") == DATASOURCE_UID, title
            # the policy map's panel reads its own job (a process of its own), all instances
            assert "$job" in target["expr"], title
            assert "$instance" in target["expr"] or "$job-policy-map" in target["expr"], title


def test_dashboard_queries_name_only_exported_metrics_labels_and_values() -> None:
    problems = [(title, p) for title, expr in dashboard_exprs() for p in expression_problems(expr)]
    assert problems == []


def test_dashboard_covers_every_exported_family() -> None:
    used = {known for _, expr in dashboard_exprs() for known in _METRIC.findall(expr)}
    families = {sample_names()[name][0] for name in used if name in sample_names()}
    assert families == set(EXPORTED)


# --- the alert rules -------------------------------------------------------------------------


def test_every_alert_has_for_severity_summary_and_description() -> None:
    rules = alert_rules()
    assert len(rules) >= 9
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"MtlsMilter[A-Za-z]+", name)
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 60


def test_alert_expressions_name_only_exported_metrics_labels_and_values() -> None:
    problems = [(r["alert"], p) for r in alert_rules() for p in expression_problems(r["expr"])]
    assert problems == []


# --- promtool ---------------------------------------------------------------------------------


def promtool() -> str:
    """Path of promtool, found as the Prometheus end-to-end harness finds prometheus; skips
    loudly when it is missing (fails under CI=true)."""
    return str(require("promtool"))


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_accepts_the_alert_rules() -> None:
    checked = run_promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout


def test_promtool_accepts_the_scrape_snippet(tmp_path: Path) -> None:
    # the snippet names the rule file by the name an operator copies it to
    shutil.copy(SCRAPE, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "mtls-milter-alerts.yml")
    checked = run_promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Grafana's variables replaced by what Grafana sends, each query becomes a recording rule."""
    rules = []
    for index, (title, expr) in enumerate(dashboard_exprs()):
        concrete = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
        rules.append(
            {
                "record": f"dashboard:query_{index}",
                "expr": concrete.replace("$instance", ".*"),
                "labels": {"panel": title},
            }
        )
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = run_promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


ALERT_UNIT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'mtls_milter_config_last_reload_ok{{job="mtls-milter", instance="mx1:9898"}}'
        values: '1 1 0 0 0 0 0 0 0 0 1'
      - series: 'up{{job="mtls-milter", instance="mx1:9898"}}'
        values: '1 1 1 0 0 0 0 1'
    alert_rule_test:
      - eval_time: 5m  # refused at 2m: still within for: 5m
        alertname: MtlsMilterReloadFailed
        exp_alerts: []
      - eval_time: 7m
        alertname: MtlsMilterReloadFailed
        exp_alerts:
          - exp_labels: {{severity: warning, job: mtls-milter, instance: "mx1:9898"}}
            exp_annotations:
              summary: "mtls-milter on mx1:9898 refused its last configuration reload"
              description: "{reload_description}"
      - eval_time: 10m  # a good reload clears it
        alertname: MtlsMilterReloadFailed
        exp_alerts: []
      - eval_time: 4m  # down since 3m: not yet 2 minutes
        alertname: MtlsMilterDown
        exp_alerts: []
      - eval_time: 6m
        alertname: MtlsMilterDown
        exp_alerts:
          - exp_labels: {{severity: critical, job: mtls-milter, instance: "mx1:9898"}}
            exp_annotations:
              summary: "mtls-milter on mx1:9898 does not answer scrapes"
              description: "{down_description}"
  - interval: 1m
    input_series:  # 1 message/s, temperror share 0 for 20 minutes, then 30%
      - series: 'mtls_milter_verdicts_total{{job="mtls-milter", instance="mx1:9898",
          result="pass", reason_class="ok", evidence="chain"}}'
        values: '0+60x20 1260+42x30'
      - series: 'mtls_milter_verdicts_total{{job="mtls-milter", instance="mx1:9898",
          result="temperror", reason_class="dns", evidence="none"}}'
        values: '0+0x20 0+18x30'
    alert_rule_test:
      - eval_time: 20m
        alertname: MtlsMilterTemperrorRatioHigh
        exp_alerts: []
      - eval_time: 40m
        alertname: MtlsMilterTemperrorRatioHigh
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "mx1:9898"}}
            exp_annotations:
              summary: "30% of messages get mtls=temperror on mx1:9898"
              description: "{temperror_description}"
"""


def _annotation(alert: str, key: str) -> str:
    """An annotation as Prometheus renders it for instance mx1:9898, quoted for the test file
    (JSON string quoting is valid YAML double-quoted string quoting)."""
    text = next(r for r in alert_rules() if r["alert"] == alert)["annotations"][key]
    return json.dumps(text.replace("{{ $labels.instance }}", "mx1:9898"))[1:-1]


def test_promtool_unit_tests_of_alerts(tmp_path: Path) -> None:
    """Reload failed and milter down fire after their ``for:``, not before; temperror ratio."""
    path = tmp_path / "alerts_test.yml"
    path.write_text(
        ALERT_UNIT_TESTS.format(
            rules=json.dumps(str(ALERTS)),
            reload_description=_annotation("MtlsMilterReloadFailed", "description"),
            down_description=_annotation("MtlsMilterDown", "description"),
            temperror_description=_annotation("MtlsMilterTemperrorRatioHigh", "description"),
        )
    )
    tested = run_promtool("test", "rules", str(path))
    assert tested.returncode == 0, tested.stdout + tested.stderr
