"""Metrics: what a judged message, a DNS lookup and a reload move; multiprocess sums."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mtls_milter.config import Config, config_from_mapping
from mtls_milter.core.evaluate import Result, Verdict
from mtls_milter.core.evidence import EvidenceKind
from mtls_milter.engine import Engine
from mtls_milter.inbound import metrics_observer
from mtls_milter.inbound.metrics_observer import DaemonMetrics, milter_health, start_for_daemon
from mtls_milter.inbound.session import EngineHolder
from mtls_milter.net.dns import DnsResolver
from mtls_milter.runtime import metrics
from mtls_milter.runtime.metrics import LATENCY_BUCKETS
from mtls_milter.runtime.metrics_tally import Tally

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape() -> Samples:
    return parse(metrics.render()[0].decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def daemon() -> DaemonMetrics:
    config = config_from_mapping({"dns": {"nameservers": ["127.0.0.1:9"]}})
    holder = EngineHolder(Engine.from_config(config))
    return DaemonMetrics(metrics.enable(), holder)


def test_a_judged_message_moves_verdict_action_dmarc_and_timings(daemon: DaemonMetrics) -> None:
    before = scrape()
    reason = "certificate name a matches client-mx host a"
    passed = Verdict(Result.PASS, reason, "a.test", evidence=EvidenceKind.CHAIN)
    daemon.verdict(passed, "accept", "pass", 0.002, 0.4)
    daemon.verdict(Verdict(Result.FAIL, "no TLS", "b.test"), "reject", None, 0.001, 0.1)
    daemon.verdict(Verdict(Result.FAIL, "no TLS", "c.test"), "made-up", "weird", 0.001, 0.1)
    pending = scrape()  # the counts wait in the tally until the next refresh (a scrape)
    assert value(pending, "mtls_milter_actions_total", action="reject") == value(
        before, "mtls_milter_actions_total", action="reject"
    )
    daemon.refresh()
    after = scrape()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    verdicts = "mtls_milter_verdicts_total"
    assert moved(verdicts, result="pass", reason_class="ok", evidence="chain") == 1
    assert moved(verdicts, result="fail", reason_class="no_tls", evidence="none") == 2
    assert moved("mtls_milter_actions_total", action="accept") == 1
    assert moved("mtls_milter_actions_total", action="reject") == 1
    assert moved("mtls_milter_actions_total", action="other") == 1  # never the odd text itself
    assert moved("mtls_milter_dmarc_results_total", result="pass") == 1
    assert moved("mtls_milter_dmarc_results_total", result="other") == 1
    assert moved("mtls_milter_evaluation_seconds_count") == 3
    assert moved("mtls_milter_message_seconds_bucket", le="0.25") == 2  # 0.1, 0.1; not 0.4
    assert not any("b.test" in str(key) or "made-up" in str(key) for key in after)


def test_dns_lookups_feed_the_histogram_and_the_cache_counters(daemon: DaemonMetrics) -> None:
    before = scrape()
    daemon.dns("client_mx", 0.012, False)
    daemon.dns("client_mx", 0.0, True)
    daemon.dns("txt", 0.0, True)
    daemon.dns("bogus", 0.5, False)  # counted as a miss, kept out of the histogram
    daemon.refresh()
    after = scrape()
    lookups = "mtls_milter_dns_cache_lookups_total"
    assert value(after, lookups, outcome="hit") - value(before, lookups, outcome="hit") == 2
    assert value(after, lookups, outcome="miss") - value(before, lookups, outcome="miss") == 2
    seconds, cmx = "mtls_milter_dns_lookup_seconds_count", "client_mx"
    assert value(after, seconds, rrtype=cmx) - value(before, seconds, rrtype=cmx) == 1
    hits, misses = (value(after, lookups, outcome=o) for o in ("hit", "miss"))
    assert value(after, "mtls_milter_dns_cache_hit_ratio") == hits / (hits + misses)


def test_refresh_hooks_the_resolver_and_follows_a_reload(daemon: DaemonMetrics) -> None:
    holder = daemon._holder
    daemon.watch_connections(lambda: 7)
    daemon.refresh()
    resolver = holder.engine.resolver
    assert isinstance(resolver, DnsResolver) and resolver.on_lookup is daemon.dns
    first = scrape()
    assert value(first, "mtls_milter_open_connections") == 7
    assert value(first, "mtls_milter_config_last_reload_ok") == 1
    assert value(first, "mtls_milter_trust_anchors") == holder.engine.validator.anchor_count > 0
    generation = value(first, "mtls_milter_config_generation")

    metrics.reload_failed("[dns] timeout: bad")  # not the trust store: still healthy
    assert value(scrape(), "mtls_milter_config_last_reload_ok") == 0
    holder.engine = Engine.from_config(Config())  # a reload swapped in a new engine
    daemon.refresh()
    after = scrape()
    assert value(after, "mtls_milter_config_generation") == generation + 1
    assert value(after, "mtls_milter_config_last_reload_ok") == 1
    new_resolver = holder.engine.resolver
    assert isinstance(new_resolver, DnsResolver) and new_resolver.on_lookup is daemon.dns


def test_healthz_says_why_trust_store_then_socket(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "milter.sock"
    config = config_from_mapping({"milter": {"socket": f"unix:{path}"}})
    health = milter_health(config)
    healthy, reason = health()
    assert not healthy and reason.startswith("milter socket not accepting: ")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        listening.listen()
        assert health() == (True, "")
        metrics.reload_failed("trust anchors: /etc/t.pem: cannot read: Permission denied")
        why = "trust store not loaded: /etc/t.pem: cannot read: Permission denied"
        assert health() == (False, why)
        metrics.config_loaded(9, 3)
        assert health() == (True, "")


def test_metrics_off_means_no_daemon_metrics() -> None:
    holder = EngineHolder(Engine.from_config(Config()))
    assert start_for_daemon(Config(), holder, serve_http=True) is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=-1, max_value=100, allow_nan=False), max_size=40))
def test_a_tally_adds_up_to_what_observe_and_inc_give(observed: list[float]) -> None:
    registry = CollectorRegistry()
    direct = Histogram("direct_seconds", "d", registry=registry, buckets=LATENCY_BUCKETS)
    batched = Histogram("batched_seconds", "b", registry=registry, buckets=LATENCY_BUCKETS)
    counted = Counter("counted", "c", registry=registry)
    tally = Tally()
    for amount in observed:
        direct.observe(amount)
        with tally.lock:
            tally.observe(batched, amount)
            tally.count(counted)
    tally.flush()
    samples = parse(generate_latest(registry).decode())

    def of(name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(k[0].removeprefix(name), k[1]): v for k, v in samples.items() if name in k[0]}

    assert of("direct_seconds") == pytest.approx(of("batched_seconds"))
    assert value(samples, "counted_total") == len(observed)


MULTIPROCESS = textwrap.dedent(
    """
    import json, os, sys, urllib.request
    from mtls_milter.config import config_from_mapping
    from mtls_milter.runtime import metrics

    config = config_from_mapping({"metrics": {"listen": "127.0.0.1:0"}})
    metrics.setup(config, workers=2)
    m = metrics.current()
    pids = []
    for n in (3, 4):
        pid = os.fork()
        if pid == 0:
            m.verdicts.labels("pass", "ok", "chain").inc(n)
            m.open_connections.set(n)
            m.message_seconds.observe(0.01 * n)
            m.dns_cache_lookups.labels("hit").inc(n)
            m.dns_cache_lookups.labels("miss").inc(1)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    server = metrics.start_server(config, lambda: (True, ""))
    url = f"http://127.0.0.1:{server.port}/metrics"
    before = urllib.request.urlopen(url).read().decode()
    metrics.worker_exited(pids[0])
    after = urllib.request.urlopen(url).read().decode()
    server.stop()
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    mode = os.stat(directory).st_mode & 0o777
    print(json.dumps({"before": before, "after": after, "dir": directory, "mode": mode}))
    """
)


def test_workers_counts_add_up_and_a_dead_workers_gauges_vanish(tmp_path: Path) -> None:
    env = {**os.environ, "RUNTIME_DIRECTORY": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    before, after = parse(out["before"]), parse(out["after"])
    verdict = {"result": "pass", "reason_class": "ok", "evidence": "chain"}
    assert value(before, "mtls_milter_verdicts_total", **verdict) == 7
    assert value(after, "mtls_milter_verdicts_total", **verdict) == 7  # counts outlive workers
    assert value(before, "mtls_milter_message_seconds_count") == 2
    assert value(before, "mtls_milter_open_connections") == 7  # livesum over both workers
    assert value(after, "mtls_milter_open_connections") == 4  # the exited one's is gone
    assert value(before, "mtls_milter_dns_cache_hit_ratio") == 7 / 9  # from the summed counters
    assert value(before, "mtls_milter_config_last_reload_ok") == 1  # the parent's 1 too
    assert out["mode"] == 0o700
    assert Path(out["dir"]).parent == tmp_path
    assert not Path(out["dir"]).exists()  # removed when the parent exited


def test_an_unknown_rrtype_or_action_never_becomes_a_label() -> None:
    assert "other" not in metrics.RRTYPES
    assert {"accept", "reject", "tempfail", "quarantine"} == metrics_observer.ACTIONS


def test_supervisor_hooks_count_live_workers_and_call_the_others_too() -> None:
    from mtls_milter.inbound.metrics_observer import SupervisorMetrics
    from mtls_milter.runtime.metrics_http import MetricsServer
    from mtls_milter.runtime.prefork import SupervisorHooks

    metrics.enable()
    engine = Engine.from_config(Config())
    seen: list[tuple[int, ...]] = []
    others = SupervisorHooks(
        before_fork=lambda slot: seen.append((slot,)),
        worker_started=lambda slot, pid: seen.append((slot, pid)),
        worker_exited=lambda slot, pid, status: seen.append((slot, pid, status)),
    )
    with MetricsServer("127.0.0.1:0", metrics.render, lambda: (True, "")) as server:
        supervisor = SupervisorMetrics(server, engine, set())
        hooks = supervisor.hooks(others)
        assert hooks.before_fork and hooks.worker_started and hooks.worker_exited
        hooks.before_fork(0)
        hooks.worker_started(0, 101)
        hooks.worker_started(1, 102)
        assert value(scrape(), "mtls_milter_workers") == 2
        hooks.worker_exited(0, 101, 9)
        assert value(scrape(), "mtls_milter_workers") == 1
        generation = value(scrape(), "mtls_milter_config_generation")
        supervisor.reloaded(engine)
        assert value(scrape(), "mtls_milter_config_generation") == generation + 1
    assert seen == [(0,), (0, 101), (1, 102), (0, 101, 9)]


def test_a_worker_without_the_parents_metrics_counts_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No private directory per worker (it would outlive the worker): the parent sets up."""
    monkeypatch.setattr(metrics, "_state", metrics._State())
    config = config_from_mapping({"metrics": {"listen": "127.0.0.1:9"}, "milter": {"workers": 2}})
    holder = EngineHolder(Engine.from_config(Config()))
    assert start_for_daemon(config, holder, serve_http=False, workers=2) is None
    assert metrics.current() is None
    assert "the supervisor serves no metrics" in caplog.text


def test_the_supervisors_healthz_is_503_while_no_worker_runs() -> None:
    from mtls_milter.inbound.metrics_observer import supervisor_health

    alive: set[int] = set()
    health = supervisor_health(alive, lambda: (True, ""))
    assert health() == (False, "no worker is running (the log says why they exit)")
    alive.add(4711)
    assert health() == (True, "")
    alive.clear()
    assert health()[0] is False
