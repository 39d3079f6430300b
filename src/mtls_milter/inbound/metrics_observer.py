"""The milter daemon's metrics: what a judged message, a DNS lookup and a reload move.

:func:`start_for_daemon` is all the daemon calls: it creates the metrics (when ``[metrics]
listen`` is set), hooks the resolver, starts the HTTP endpoint when this process serves it, and
returns a :class:`DaemonMetrics` — the session observer, plus what the daemon tells it (its
connection count). Gauges are read from their sources, never kept in step by the hot path: at
scrape time in the process that serves HTTP, every second in a pre-forked worker.

Cost: a message's updates go to a :class:`~mtls_milter.runtime.metrics_tally.Tally` (one lock,
a few dictionary updates) and reach the metrics at the next refresh: about 3 µs of CPU per
message with or without workers, flushes included (docs/observability.md). Labels come from
fixed sets only; a value outside them (a bug) is counted as ``other``, never as outside text.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from mtls_milter.config import Config
from mtls_milter.core.evaluate import Verdict
from mtls_milter.core.reason_class import reason_class
from mtls_milter.engine import Engine
from mtls_milter.errors import StartupError
from mtls_milter.inbound.session import EngineHolder
from mtls_milter.net.dns import DnsResolver
from mtls_milter.runtime import metrics
from mtls_milter.runtime.metrics import Metrics
from mtls_milter.runtime.metrics_http import MetricsServer, socket_accepts
from mtls_milter.runtime.metrics_tally import DnsLookupMetrics, Tally
from mtls_milter.runtime.prefork import SupervisorHooks

log = logging.getLogger("mtls_milter")

ACTIONS = frozenset({"accept", "reject", "tempfail", "quarantine"})
DMARC_RESULTS = frozenset({"pass", "fail", "none", "temperror", "permerror"})
WORKER_REFRESH = 1.0  # seconds between a worker's gauge updates


class DaemonMetrics:
    """The session observer with everything else the daemon's metrics need."""

    def __init__(self, m: Metrics, holder: EngineHolder) -> None:
        self._m = m
        self._holder = holder
        self._tally = Tally()  # the message path's updates, flushed by refresh()
        self.dns = DnsLookupMetrics(m, self._tally)
        self._verdicts: dict[tuple[str, str, str], Any] = {}
        self._actions = {a: m.actions.labels(a) for a in (*ACTIONS, "other")}
        self._dmarc = {r: m.dmarc_results.labels(r) for r in (*DMARC_RESULTS, "other")}
        self._evaluation, self._message = m.evaluation_seconds, m.message_seconds
        self._connections: Callable[[], int] | None = None
        self._engine: object = None  # the engine the config gauges were last set for
        self._generation = 0
        self._generation_lock = threading.Lock()
        self.server: MetricsServer | None = None
        self._stop = threading.Event()

    def verdict(
        self,
        verdict: Verdict,
        action: str,
        dmarc_result: str | None,
        evaluation_seconds: float,
        message_seconds: float,
    ) -> None:
        """Count one judged message (the :class:`~.observer.SessionObserver` protocol)."""
        result = verdict.result.value
        key = (result, reason_class(result, verdict.reason), verdict.evidence.value)
        counter = self._verdicts.get(key)
        if counter is None:  # a fixed set of keys: created once each
            counter = self._verdicts[key] = self._m.verdicts.labels(*key)
        tally = self._tally
        with tally.lock:
            tally.count(counter)
            tally.count(self._actions.get(action) or self._actions["other"])
            if dmarc_result is not None:
                tally.count(self._dmarc.get(dmarc_result) or self._dmarc["other"])
            tally.observe(self._evaluation, evaluation_seconds)
            tally.observe(self._message, message_seconds)

    def flush(self) -> None:
        """Add the pending counts of the message path to the metrics (refresh does this too)."""
        self._tally.flush()

    def watch_connections(self, count: Callable[[], int]) -> None:
        """Where the open-connections gauge reads from (the milter server's count)."""
        self._connections = count

    def refresh(self) -> None:
        """Add the pending counts, bring the gauges up to date, hook a resolver a reload
        brought in."""
        self.flush()
        m, engine = self._m, self._holder.engine
        resolver = engine.resolver
        if isinstance(resolver, DnsResolver):
            if resolver.on_lookup is not self.dns:
                resolver.on_lookup = self.dns
            m.dns_cache_entries.set(resolver.cache_entries())
        if self._connections is not None:
            m.open_connections.set(self._connections())
        with self._generation_lock:  # two scrapes at once count one reload once
            if engine is not self._engine:  # the first engine, or one a reload swapped in
                self._engine = engine
                self._generation += 1
                metrics.config_loaded(self._generation, engine.validator.anchor_count)

    def health_check(self, config: Config) -> Callable[[], tuple[bool, str]]:
        """/healthz with the gauges (and a reload's success) brought up to date first."""
        check = milter_health(config)

        def health() -> tuple[bool, str]:
            self.refresh()
            return check()

        return health

    def run_refresher(self) -> None:
        """Refresh every second in a daemon thread (a worker that serves no HTTP)."""

        def loop() -> None:
            while not self._stop.wait(WORKER_REFRESH):
                try:
                    self.refresh()
                except Exception:  # never let a gauge stop the updates
                    log.exception("metrics: gauge refresh failed")

        threading.Thread(target=loop, name="metrics-refresh", daemon=True).start()

    def stop(self) -> None:
        """Stop the HTTP endpoint and the refresher."""
        self._stop.set()
        self._tally.flush()  # a stopping worker's last counts
        if self.server is not None:
            self.server.stop()


def start_for_daemon(
    config: Config, holder: EngineHolder, *, serve_http: bool, workers: int = 1
) -> DaemonMetrics | None:
    """Metrics for ``mtls-milter serve`` (None when ``[metrics] listen`` is empty).

    ``serve_http``: this process serves /metrics and /healthz (single-process daemon); a
    pre-forked worker passes False and its parent serves them (``workers`` > 1 after
    :func:`metrics.setup` in the parent). OSError when the endpoint cannot listen.
    """
    if not config.metrics.listen:
        return None
    if serve_http:
        metrics.setup(config, workers)
    m = metrics.current()
    if m is None:  # a worker whose parent set up no metrics (start_for_supervisor)
        log.warning("[metrics] listen is set, but the supervisor serves no metrics")
        return None
    daemon = DaemonMetrics(m, holder)
    daemon.refresh()
    if serve_http:
        metrics.on_scrape(daemon.refresh)
        daemon.server = metrics.start_server(config, daemon.health_check(config))
    else:
        daemon.run_refresher()
    return daemon


def milter_health(config: Config) -> Callable[[], tuple[bool, str]]:
    """/healthz: the milter socket accepts a connection and the trust store is loaded."""
    spec = config.milter.socket

    def health() -> tuple[bool, str]:
        problem = metrics.trust_problem()
        if problem:
            return False, f"trust store not loaded: {problem}"
        refused = socket_accepts(spec)
        if refused:
            return False, f"milter socket not accepting: {refused}"
        return True, ""

    return health


class SupervisorMetrics:
    """The supervising parent's part with ``[milter] workers`` > 1: it serves /metrics (the sum
    of every process's files) and /healthz, counts live workers, drops an exited worker's
    gauges, and reports its own reload checks (a refused reload never reaches the workers)."""

    def __init__(self, server: MetricsServer, engine: Engine, alive: set[int]) -> None:
        self.server = server
        self._alive = alive  # pids of the live workers; /healthz reads it too
        self._generation = 1
        metrics.config_loaded(1, engine.validator.anchor_count)

    def hooks(self, others: SupervisorHooks | None = None) -> SupervisorHooks:
        """The supervisor's hooks: ours, then ``others``' (when given)."""
        others = others or SupervisorHooks()

        def before_fork(slot: int) -> None:
            if others.before_fork is not None:
                others.before_fork(slot)

        def started(slot: int, pid: int) -> None:
            self._alive.add(pid)
            metrics.workers_alive(len(self._alive))
            if others.worker_started is not None:
                others.worker_started(slot, pid)

        def exited(slot: int, pid: int, status: int) -> None:
            self._alive.discard(pid)
            metrics.worker_exited(pid)
            metrics.workers_alive(len(self._alive))
            if others.worker_exited is not None:
                others.worker_exited(slot, pid, status)

        return SupervisorHooks(before_fork, started, exited)

    def reloaded(self, engine: Engine) -> None:
        """The parent's reload check passed with ``engine``."""
        self._generation += 1
        metrics.config_loaded(self._generation, engine.validator.anchor_count)

    def close_in_child(self) -> None:
        """In a forked worker: let go of the parent's HTTP sockets."""
        self.server.close_in_child()

    def stop(self) -> None:
        self.server.stop()


def start_for_supervisor(config: Config, engine: Engine) -> SupervisorMetrics | None:
    """In the supervising parent, before it forks and drops privileges: multiprocess metrics
    and the HTTP endpoint (None when ``[metrics] listen`` is empty); StartupError when the
    endpoint cannot listen. A refused reload: :func:`metrics.reload_failed` (as every reload
    refusal is reported)."""
    if not config.metrics.listen:
        return None
    metrics.setup(config, config.milter.workers)
    alive: set[int] = set()
    try:
        server = metrics.start_server(config, supervisor_health(alive, milter_health(config)))
    except OSError as exc:
        where = f"[metrics] listen {config.metrics.listen}"
        raise StartupError(f"cannot listen on {where}: {exc}") from None
    return SupervisorMetrics(server, engine, alive)


def supervisor_health(
    alive: set[int], check: Callable[[], tuple[bool, str]]
) -> Callable[[], tuple[bool, str]]:
    """The parent's /healthz: ``check`` once at least one worker is alive. The parent's
    listening socket accepts into its backlog even when every worker has died (say, a trust
    file became unreadable and each restart fails), so that alone would read as healthy."""

    def health() -> tuple[bool, str]:
        if not alive:
            return False, "no worker is running (the log says why they exit)"
        return check()

    return health
