"""``mtls-milter serve`` on the asyncio transport (``[milter] transport = "asyncio"``).

One event loop serves every MTA connection (:class:`~.asyncio_driver.MilterServer`); the
decisions are :class:`~.session.MilterSession`'s, end of message runs in a worker pool. Signals
are handled on the loop: SIGUSR1 and SIGHUP reload, one reload at a time (signals during a
reload coalesce into one more, run in a worker thread so the loop keeps serving); SIGTERM and
SIGINT stop accepting connections and give the messages in flight up to ``STOP_GRACE`` seconds
to finish. No libmilter, so no signal thread that takes SIGHUP for "stop".

The same daemon runs as one of several pre-forked workers (``[milter] workers`` > 1,
:mod:`.workers`) when given a :class:`WorkerRole`: then the listening socket is inherited, the
policy service is the parent's (looked up through :class:`.shared_sessions.RemoteSessionTable`),
privileges are already dropped, and the worker tells its parent when it is up and when a reload
is done; it stops by itself when its parent is gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from dataclasses import dataclass

from mtls_milter.config import Config
from mtls_milter.engine import Engine
from mtls_milter.errors import StartupError
from mtls_milter.inbound.asyncio_driver import MilterServer, run
from mtls_milter.inbound.asyncio_handler import handler_factory, options_for
from mtls_milter.inbound.chain_fetch import ChainFetcher
from mtls_milter.inbound.daemon_common import (
    EngineReloader,
    config_summary,
    drop_privileges,
    start_policy_service,
)
from mtls_milter.inbound.metrics_observer import DaemonMetrics, start_for_daemon
from mtls_milter.inbound.observer import NULL_OBSERVER
from mtls_milter.inbound.policy_service import PolicyServiceThread, SessionTable
from mtls_milter.inbound.session import EngineHolder, MilterSession
from mtls_milter.inbound.shared_sessions import RemoteSessionTable
from mtls_milter.net.lookup_pool import LookupPool
from mtls_milter.runtime.sdnotify import notify
from mtls_milter.runtime.worker_link import RELOADED, UP, WorkerLink, mib, rss_bytes

log = logging.getLogger("mtls_milter")

STOP_GRACE = 10.0  # seconds messages in flight get after SIGTERM
RELOAD_SIGNALS = (signal.SIGUSR1, signal.SIGHUP)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PARENT_CHECK = 1.0  # seconds between a worker's checks that its parent is still there


@dataclass(frozen=True)
class WorkerRole:
    """What makes the daemon one of several pre-forked workers."""

    slot: int
    link: WorkerLink  # the channel to the parent
    listeners: list[socket.socket]  # the parent's listening sockets, inherited


def serve(config_path: str | None, engine: Engine) -> int:
    """Serve until SIGTERM/SIGINT; the exit status (StartupError when it cannot start)."""
    return run(AsyncioDaemon(config_path, engine).main())


class AsyncioDaemon:
    """The running milter on the asyncio transport."""

    def __init__(
        self, config_path: str | None, engine: Engine, worker: WorkerRole | None = None
    ) -> None:
        self._holder = EngineHolder(engine)
        self._worker = worker
        self._reloader = EngineReloader(config_path, self._holder, self._reload_announcement)
        # A thread per DNS lookup or waiting end of message, on demand: no fixed pool that an
        # unrelated message could queue behind (docs/design.md "DNS under load").
        self._prefetch = LookupPool(name="prefetch")
        self._eom = LookupPool(name="eom")
        self._sessions = SessionTable() if worker is None else RemoteSessionTable(worker.link)
        self._fetcher = ChainFetcher()
        self._metrics: DaemonMetrics | None = None  # [metrics] listen set: the session observer
        self._policy: PolicyServiceThread | None = None
        self._reload_wanted: list[str] = []  # signal names since the last reload started
        self._wakeup = asyncio.Event()
        self._stop_signal = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def main(self) -> int:
        config = self._holder.engine.config
        if self._worker is None:
            self._policy = start_policy_service(config, self._sessions)
        server = self._server(config)
        try:
            await server.start()
        except (OSError, ValueError) as exc:
            self._shutdown_pools()
            raise StartupError(f"cannot listen on {config.milter.socket}: {exc}") from None
        self._metrics = self._start_metrics(config, server)
        if self._worker is None:
            drop_privileges(config, config.milter.socket)
        loop = asyncio.get_running_loop()
        for signum in RELOAD_SIGNALS:
            loop.add_signal_handler(signum, self._on_reload, signum)
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_stop, signum)
        self._announce_start()
        await self._signal_loop()
        log.info("%sstopping on %s", self._who(), signal.Signals(self._stop_signal).name)
        notify("STOPPING=1")
        await server.aclose(grace=STOP_GRACE)
        self._shutdown_pools()
        log.info("%sstopped", self._who())
        return 0

    def _announce_start(self) -> None:
        if self._worker is not None:
            log.info("%sserving, rss=%s", self._who(), mib(rss_bytes()))
            self._worker.link.tell(UP)
            watcher = asyncio.get_running_loop().create_task(self._watch_parent(os.getppid()))
            self._tasks.add(watcher)  # a reference, so the task is not garbage-collected
            return
        notify("READY=1")
        engine = self._holder.engine
        log.info(
            "started: %s trust=%s", config_summary(engine.config), "; ".join(engine.trust_sources)
        )

    def _who(self) -> str:
        """``worker N (pid P): `` in a worker's lines, nothing in a single process."""
        return "" if self._worker is None else f"worker {self._worker.slot} (pid {os.getpid()}): "

    def _reload_announcement(self) -> str:
        if self._worker is None:
            return "reloaded"
        return f"{self._who()}rss={mib(rss_bytes())} reload done"

    async def _watch_parent(self, parent: int) -> None:
        """Stop when the supervising parent is gone (it was killed: nobody restarts us)."""
        while os.getppid() == parent:
            await asyncio.sleep(PARENT_CHECK)
        log.warning("%sparent %d is gone", self._who(), parent)
        self._on_stop(signal.SIGTERM)

    def _server(self, config: Config) -> MilterServer:
        holder, prefetch, fetcher = self._holder, self._prefetch, self._fetcher
        sessions = self._sessions if config.policy_service.socket else None

        def make_session() -> MilterSession:
            observer = self._metrics or NULL_OBSERVER
            return MilterSession(
                holder, prefetch, sessions=sessions, fetcher=fetcher, observer=observer
            )

        factory = handler_factory(make_session, self._eom)
        mode = int(config.milter.socket_mode, 8)
        options = lambda: options_for(holder.engine.config)  # noqa: E731 (after a reload too)
        listeners = None if self._worker is None else self._worker.listeners
        return MilterServer(
            config.milter.socket, factory, options, socket_mode=mode, listeners=listeners
        )

    def _start_metrics(self, config: Config, server: MilterServer) -> DaemonMetrics | None:
        """``[metrics] listen``: served here, or by the supervising parent for a worker."""
        try:
            found = start_for_daemon(
                config, self._holder, serve_http=self._worker is None, workers=config.milter.workers
            )
        except OSError as exc:
            self._shutdown_pools()
            where = f"[metrics] listen {config.metrics.listen}"
            raise StartupError(f"cannot listen on {where}: {exc}") from None
        if found is not None:
            found.watch_connections(lambda: server.connections)
        return found

    def _on_reload(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if name not in self._reload_wanted:
            self._reload_wanted.append(name)
        self._wakeup.set()

    def _on_stop(self, signum: int) -> None:
        self._stop_signal = signum
        self._wakeup.set()

    async def _signal_loop(self) -> None:
        """Act on signals until a stop: reloads one at a time, each off the loop."""
        loop = asyncio.get_running_loop()
        while not self._stop_signal:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._stop_signal:
                return
            if self._reload_wanted:
                trigger = "+".join(self._reload_wanted)
                self._reload_wanted = []
                await loop.run_in_executor(self._eom, self._reloader.reload, trigger)
                if self._metrics is not None:  # the config gauges count every reload
                    self._metrics.refresh()
                if self._worker is not None:
                    self._worker.link.tell(RELOADED)

    def _shutdown_pools(self) -> None:
        self._prefetch.shutdown(wait=False, cancel_futures=True)
        self._eom.shutdown(wait=False, cancel_futures=True)
        self._fetcher.shutdown()
        if self._policy is not None:
            self._policy.stop()
        if self._metrics is not None:
            self._metrics.stop()
