"""Prometheus metrics: the metric objects, single- or multiprocess mode, config and health state.

Nothing is created at import time. :func:`setup` creates the metrics once per process, after it
has chosen the mode: prometheus-client decides between in-memory values and one memory-mapped
file per process when a metric is created, so with pre-forked workers the parent calls
:func:`setup` *before* forking, every process then writes its own files in a private directory,
and the process that serves HTTP adds them up (:func:`render`). Counters and histograms of a
worker that exited stay in the sum; its gauges are dropped by :func:`worker_exited`.

Label values are only ever members of fixed sets (result names, reason classes, actions...),
never outside data: no domain, address or reason text becomes a label. docs/observability.md
lists every metric.

While :func:`setup` has not run (``[metrics] listen`` empty), :func:`current` is ``None`` and every
instrumented place skips its update: metrics cost nothing when off.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mtls_milter import __version__
from mtls_milter.config import Config
from mtls_milter.core.quote import clip
from mtls_milter.runtime.metrics_http import Health, MetricsServer

PREFIX = "mtls_milter_"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # where prometheus-client keeps per-process files
# seconds: from a cached answer (~0.1 ms) to the DNS budget and a chain fetch's timeout
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
RRTYPES = frozenset({"client_mx", "mx", "a", "aaaa", "txt"})  # DNS histogram labels
TRUST_PREFIX = "trust anchors:"  # how a reload refused for its trust store is worded
TRUST_FILE = "trust-problem.{pid}.txt"  # multiprocess mode: a worker's trust problem


class _Factory:
    """Creates metrics in one registry (None: multiprocess mode, collected from files)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry

    def counter(self, name: str, doc: str, *labels: str) -> Counter:
        return Counter(PREFIX + name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, mode: str, *labels: str) -> Gauge:
        # mode: how a multiprocess scrape combines the processes' values ("live": only the
        # processes still running)
        return Gauge(PREFIX + name, doc, labels, registry=self.registry, multiprocess_mode=mode)  # type: ignore[arg-type]

    def histogram(self, name: str, doc: str, *labels: str) -> Histogram:
        buckets = LATENCY_BUCKETS
        return Histogram(PREFIX + name, doc, labels, registry=self.registry, buckets=buckets)


class Metrics:
    """Every metric the product exports (docs/observability.md), in one registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        make = _Factory(registry)
        self._counters(make)
        self._histograms(make)
        self._gauges(make)

    def _counters(self, make: _Factory) -> None:
        self.verdicts = make.counter(
            "verdicts_total",
            "Messages judged, by mtls result, reason class and the evidence the result rests on.",
            "result", "reason_class", "evidence",
        )  # fmt: skip
        self.actions = make.counter("actions_total", "Actions on judged messages.", "action")
        self.dmarc_results = make.counter(
            "dmarc_results_total", "DMARC results of judged messages.", "result"
        )
        self.chain_fetches = make.counter(
            "chain_fetches_total", "Chain fetches from a client's host, by outcome.", "outcome"
        )
        self.policy_map_answers = make.counter(
            "policy_map_answers_total", "Socketmap answers of the policy map.", "kind"
        )
        self.acme_validations = make.counter(
            "acme_validations_total", "ACME validations, by result.", "result"
        )
        self.dns_cache_lookups = make.counter(
            "dns_cache_lookups_total", "DNS lookups answered by the cache or not.", "outcome"
        )

    def _histograms(self, make: _Factory) -> None:
        self.evaluation_seconds = make.histogram(
            "evaluation_seconds", "End of message to the mtls decision."
        )
        self.dns_lookup_seconds = make.histogram(
            "dns_lookup_seconds", "DNS lookups sent to a name server, by record type.", "rrtype"
        )
        self.chain_fetch_seconds = make.histogram(
            "chain_fetch_seconds", "Chain fetches from a client's host."
        )
        self.message_seconds = make.histogram(
            "message_seconds", "MAIL FROM to the decision at end of message."
        )

    def _gauges(self, make: _Factory) -> None:
        self.dns_cache_entries = make.gauge(
            "dns_cache_entries", "Answers in the DNS cache (summed over workers).", "livesum"
        )
        self.open_connections = make.gauge("open_connections", "Open MTA connections.", "livesum")
        self.config_generation = make.gauge(
            "config_generation", "Configuration loads since start (1: the first).", "livemax"
        )
        self.config_load_timestamp = make.gauge(
            "config_load_timestamp_seconds", "Unix time of the newest config load.", "livemax"
        )
        self.config_last_reload_ok = make.gauge(
            "config_last_reload_ok", "1 if the last (re)load succeeded, else 0.", "livemin"
        )
        self.trust_anchors = make.gauge("trust_anchors", "Trust anchors loaded.", "livemax")
        self.workers = make.gauge("workers", "Live worker processes.", "livemax")
        self.build_info = make.gauge("build_info", "Always 1; the version.", "livemax", "version")


@dataclass
class _State:
    """This process's metrics and what /healthz and the config gauges remember."""

    metrics: Metrics | None = None
    registry: CollectorRegistry | None = None  # single-process: what /metrics serves
    multiproc_dir: str = ""  # multiprocess mode: the private directory of per-process files
    trust_problem: str = ""  # why the trust store could not be loaded at the last reload
    generation: int = 0
    on_scrape: list[Callable[[], None]] = field(default_factory=list)


# The one process-wide holder of the metrics: prometheus-client's values are process-wide
# anyway (one file set per process in multiprocess mode).
_state = _State()


def current() -> Metrics | None:
    """The metrics of this process, or None when metrics are off."""
    return _state.metrics


def setup(config: Config, workers: int = 1) -> None:
    """Create the metrics when ``[metrics] listen`` is set (once per process; before forking).

    With ``workers > 1`` this switches prometheus-client to multiprocess mode with a new private
    directory, owned by ``[milter] user`` when the daemon will drop privileges to it.
    """
    if config.metrics.listen:
        enable(workers, user=config.milter.user, group=config.milter.group)


def enable(workers: int = 1, *, user: str = "", group: str = "") -> Metrics:
    """Create the metrics (idempotent); the entry point for other processes than the daemon."""
    if _state.metrics is not None:
        return _state.metrics
    if workers > 1:
        _state.multiproc_dir = _enter_multiprocess_mode(user, group)
        registry = None  # each scrape collects the files (render)
    else:
        registry = CollectorRegistry()
    # no *_created series: fewer bytes per scrape, nothing lost
    disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = Metrics(registry)
    # 1 from the start (nothing has failed). In multiprocess mode every process's value takes
    # part in the minimum over the live processes, and a forked child starts from an empty
    # file (0): it says 1 too until one of its own reloads fails.
    metrics.config_last_reload_ok.set(1)
    if workers > 1:
        os.register_at_fork(after_in_child=lambda: metrics.config_last_reload_ok.set(1))
    metrics.build_info.labels(version=__version__).set(1)
    _state.metrics, _state.registry = metrics, registry
    return metrics


def _enter_multiprocess_mode(user: str, group: str) -> str:
    # systemd's RuntimeDirectory= when there is one (cleaned by systemd), else the temp dir
    base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    path = tempfile.mkdtemp(prefix="mtls-milter-metrics.", dir=base)  # new, empty, mode 0700
    if os.geteuid() == 0 and user:
        with contextlib.suppress(KeyError):  # an unknown user stops the daemon elsewhere
            entry = pwd.getpwnam(user)
            gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
            os.chown(path, entry.pw_uid, gid)
    os.environ[MULTIPROC_ENV] = path
    # prometheus-client picks its value class when it is imported; pick again now that the
    # directory is set (metrics take the class when they are created, which is after this).
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    atexit.register(_remove_directory, path, os.getpid())
    return path


def _remove_directory(path: str, owner: int) -> None:
    if os.getpid() == owner:  # a forked worker exiting must not remove the parent's files
        shutil.rmtree(path, ignore_errors=True)


def worker_exited(pid: int) -> None:
    """Drop an exited worker's live gauges (its counters stay in the sums)."""
    if _state.multiproc_dir:
        _share_trust_problem(pid, "")
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, _state.multiproc_dir)  # type: ignore[no-untyped-call]


def workers_alive(count: int) -> None:
    """The supervisor's count of live workers."""
    if _state.metrics is not None:
        _state.metrics.workers.set(count)


def config_loaded(generation: int, trust_anchor_count: int) -> None:
    """A configuration (re)load succeeded: generation, load time, reload ok, trust anchors."""
    _state.trust_problem = ""
    _share_trust_problem(os.getpid(), "")
    _state.generation = generation
    metrics = _state.metrics
    if metrics is None:
        return
    metrics.config_generation.set(generation)
    metrics.config_load_timestamp.set(time.time())
    metrics.config_last_reload_ok.set(1)
    metrics.trust_anchors.set(trust_anchor_count)


def reload_failed(reason: str, *, trust_store: bool | None = None) -> None:
    """A reload was refused (the running configuration stays). A refusal for the trust store
    (``trust_store``, by default read from the reason's ``trust anchors:`` prefix) makes
    /healthz answer 503 until a load succeeds."""
    if trust_store is None:
        trust_store = reason.startswith(TRUST_PREFIX)
    if trust_store:
        _state.trust_problem = clip(reason.removeprefix(TRUST_PREFIX).strip(), 200)
        _share_trust_problem(os.getpid(), _state.trust_problem)
    if _state.metrics is not None:
        _state.metrics.config_last_reload_ok.set(0)


def trust_problem() -> str:
    """Why the trust store is not loaded ("" when it is), in this or a live worker process."""
    if _state.trust_problem or not _state.multiproc_dir:
        return _state.trust_problem
    for path in sorted(Path(_state.multiproc_dir).glob(TRUST_FILE.format(pid="*"))):
        with contextlib.suppress(OSError):
            return path.read_text(encoding="ascii", errors="replace")
    return ""


def _share_trust_problem(pid: int, problem: str) -> None:
    """Multiprocess mode: a worker's trust problem, for the process that answers /healthz."""
    if not _state.multiproc_dir:
        return
    path = Path(_state.multiproc_dir) / TRUST_FILE.format(pid=pid)
    with contextlib.suppress(OSError):
        if problem:
            path.write_text(problem, encoding="ascii", errors="replace")
        else:
            path.unlink(missing_ok=True)


def on_scrape(refresh: Callable[[], None]) -> None:
    """Call ``refresh`` before each rendering (gauges read at scrape time)."""
    _state.on_scrape.append(refresh)


def render() -> tuple[bytes, str]:
    """The Prometheus text exposition of every metric, and its content type."""
    for refresh in list(_state.on_scrape):
        with contextlib.suppress(Exception):  # a failing refresh must not cost the scrape
            refresh()
    source: Collector
    if _state.multiproc_dir:  # every process's files, added up
        source = multiprocess.MultiProcessCollector(None, _state.multiproc_dir)  # type: ignore[no-untyped-call]
    elif _state.registry is not None:
        source = _state.registry
    else:
        return b"", CONTENT_TYPE_LATEST
    return generate_latest(_WithHitRatio(source)), CONTENT_TYPE_LATEST


class _WithHitRatio(Collector):
    """The collected metrics plus ``dns_cache_hit_ratio``, computed from the (summed) cache
    lookup counters at scrape time: one meaning with one process or many, no gauge to keep."""

    def __init__(self, source: Collector) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        hits = lookups = 0.0
        for family in self._source.collect():
            if family.name == PREFIX + "dns_cache_lookups":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        lookups += sample.value
                        hits += sample.value if sample.labels.get("outcome") == "hit" else 0.0
            yield family
        yield GaugeMetricFamily(
            PREFIX + "dns_cache_hit_ratio",
            "DNS cache hits / DNS lookups since start (all workers).",
            value=hits / lookups if lookups else 0.0,
        )


def start_server(config: Config, health: Health, *, listen: str = "") -> MetricsServer:
    """Serve /metrics and /healthz on ``listen`` (default ``[metrics] listen``) in a thread of
    its own; OSError when it cannot listen."""
    return MetricsServer(listen or config.metrics.listen, render, health).start()


def metric_names() -> tuple[str, ...]:
    """The names of every exported metric family (for checks of dashboards and alerts)."""
    registry = CollectorRegistry()
    Metrics(registry)
    names: list[str] = []
    for family in _WithHitRatio(registry).collect():
        names.append(family.name + ("_total" if family.type == "counter" else ""))
    return tuple(sorted(names))
