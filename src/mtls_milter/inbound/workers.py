"""``mtls-milter serve`` with ``[milter] workers`` > 1: a supervising parent and N workers.

The parent, still with the privileges it was started with, opens the milter socket and the
policy-service socket (and runs the policy service itself, in a thread), then drops privileges,
then forks the workers (:mod:`mtls_milter.runtime.prefork`): no worker ever runs as root, and
the parent needs no privileges later (a restarted worker inherits the open socket). Each worker
builds its own engine from the parent's current configuration and runs the asyncio daemon
(:class:`.asyncio_daemon.AsyncioDaemon` with a :class:`.asyncio_daemon.WorkerRole`); its DNS
and chain caches are its own. A reload is checked in the parent first (a configuration that does
not load is refused there, and the workers are not bothered), then each worker reloads.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path

from mtls_milter.config import Config
from mtls_milter.core.certs import CertificateInputError
from mtls_milter.engine import Engine
from mtls_milter.errors import StartupError
from mtls_milter.inbound.asyncio_daemon import AsyncioDaemon, WorkerRole
from mtls_milter.inbound.asyncio_driver import run
from mtls_milter.inbound.daemon_common import (
    build_engine,
    config_changes,
    config_summary,
    drop_privileges,
    start_policy_service,
    warn_restart_only,
)
from mtls_milter.inbound.metrics_observer import SupervisorMetrics, start_for_supervisor
from mtls_milter.inbound.policy_service import PolicyServiceThread, SessionTable
from mtls_milter.inbound.shared_sessions import answer_lookup
from mtls_milter.runtime import metrics
from mtls_milter.runtime.prefork import Supervisor, SupervisorHooks
from mtls_milter.runtime.stream_service import (
    parse_listen_spec,
    tcp_listener_sockets,
    unix_listener_socket,
)
from mtls_milter.runtime.worker_link import WorkerLink

log = logging.getLogger("mtls_milter")


def serve(config_path: str | None, engine: Engine, hooks: SupervisorHooks | None = None) -> int:
    """Supervise ``[milter] workers`` workers until SIGTERM/SIGINT; StartupError if impossible."""
    config = engine.config
    listeners = open_listeners(config)
    sessions = SessionTable()
    observed: SupervisorMetrics | None = None
    try:
        observed = start_for_supervisor(config, engine)  # before forking: multiprocess metrics
        policy = start_policy_service(config, sessions)
    except StartupError:
        if observed is not None:
            observed.stop()
        _close(listeners)
        raise
    try:
        drop_privileges(config, config.milter.socket)
        parent = _Parent(config_path, engine, listeners, observed)
        supervisor = Supervisor(
            config.milter.workers,
            parent.worker_main,
            answer=lambda request: answer_lookup(sessions, request),
            reload=parent.reload,
            on_ready=parent.on_ready,
            close_in_child=lambda: _release_in_child(observed, policy),
            hooks=observed.hooks(hooks) if observed is not None else hooks,
        )
        status = supervisor.run()
    finally:
        if policy is not None:
            policy.stop()
        if observed is not None:
            observed.stop()
        _close(listeners)
    log.info("stopped")
    return status


def _release_in_child(
    observed: SupervisorMetrics | None, policy: PolicyServiceThread | None
) -> None:
    """In a worker: let go of the parent's own sockets (metrics, the policy service's)."""
    if observed is not None:
        observed.close_in_child()
    if policy is not None:
        policy.release_in_child()


def open_listeners(config: Config) -> list[socket.socket]:
    """The milter's listening sockets, opened once in the parent; StartupError if impossible."""
    spec = config.milter.socket
    try:
        kind, where, host = parse_listen_spec(spec)
        if kind == "unix":
            return [unix_listener_socket(Path(str(where)), int(config.milter.socket_mode, 8))]
        return tcp_listener_sockets(host, int(where))
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot listen on {spec}: {exc}") from None


def _close(listeners: list[socket.socket]) -> None:
    for sock in listeners:
        with contextlib.suppress(OSError):
            sock.close()


class _Parent:
    """What the supervisor asks of the milter: a worker's life, a reload check, the start line."""

    def __init__(
        self,
        config_path: str | None,
        engine: Engine,
        listeners: list[socket.socket],
        observed: SupervisorMetrics | None = None,
    ):
        self.config_path = config_path
        self.observed = observed  # [metrics] listen: the parent's metrics
        self.config = engine.config  # what a worker started now runs with
        self.trust = "; ".join(engine.trust_sources)
        self.listeners = listeners

    def worker_main(self, slot: int, link: WorkerLink) -> int:
        """In the child: build an engine from the current configuration and serve."""
        try:
            engine = Engine.from_config(self.config)
        except CertificateInputError as exc:
            log.error("worker %d cannot start: trust anchors: %s", slot, exc)
            return 1
        daemon = AsyncioDaemon(self.config_path, engine, WorkerRole(slot, link, self.listeners))
        return run(daemon.main())

    def reload(self, trigger: str) -> str | None:
        """Check the configuration file; the text for the ``reloaded:`` line, None: refused."""
        try:
            engine = build_engine(self.config_path)
        except StartupError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            metrics.reload_failed(str(exc))  # /healthz says why (docs/observability.md)
            return None
        warn_restart_only(self.config, engine.config)
        changed = config_changes(self.config, engine.config)
        self.config = engine.config
        self.trust = "; ".join(engine.trust_sources)
        if self.observed is not None:
            self.observed.reloaded(engine)
        return f"changed={changed} config={engine.config.source} signal={trigger}"

    def on_ready(self, pids: list[int]) -> None:
        log.info(
            "started: %s pids=%s trust=%s",
            config_summary(self.config),
            ",".join(map(str, pids)),
            self.trust,
        )
