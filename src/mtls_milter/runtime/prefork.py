"""Pre-forked workers: one supervising parent, N worker processes on one listening socket.

The parent opens the listening socket (with the start-up privileges), then forks the workers;
each inherits the socket and runs its own event loop in its own process (its own GIL); the
kernel hands each connection to one of the processes waiting in ``accept()``. The parent serves
no connection. It restarts a worker that dies (one log line with pid and exit status or signal;
the delay doubles from 0.5 s to 30 s while workers die young, :class:`RestartBackoff`); checks a
reload itself, then sends SIGHUP to every worker and logs ``reloaded:`` once all confirmed; on
SIGTERM/SIGINT stops every worker (SIGKILL after :data:`STOP_GRACE` s) and exits when all are
gone; alone tells systemd READY=1, RELOADING=1, STOPPING=1 (NOTIFY_SOCKET is removed in the
workers); answers each worker's requests on its private channel (:mod:`.worker_link`).

What a worker runs, what a request means and what a reload checks are given to the supervisor;
:class:`SupervisorHooks` are the places for per-process bookkeeping (e.g. metrics).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn

from mtls_milter.runtime.sdnotify import notify
from mtls_milter.runtime.worker_link import (
    ID,
    MAX_MESSAGE,
    RELOADED,
    REQUEST,
    UP,
    WorkerLink,
    mib,
    rss_bytes,
)

log = logging.getLogger("mtls_milter")

STABLE_AFTER = 10.0  # seconds; a worker that lived this long is restarted without delay
FIRST_DELAY = 0.5  # seconds before restarting a worker that died young
QUICK_DELAY = 0.1  # seconds before restarting a worker that had a normal life
MAX_DELAY = 30.0
STOP_GRACE = 15.0  # seconds workers get after SIGTERM before SIGKILL
RELOAD_TIMEOUT = 30.0  # seconds the parent waits for every worker to confirm a reload
RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PARENT_SIGNALS = (*RELOAD_SIGNALS, *STOP_SIGNALS, signal.SIGCHLD, signal.SIGUSR2)

WorkerMain = Callable[[int, WorkerLink], int]  # slot, channel -> exit status (in the child)
Answer = Callable[[bytes], bytes]  # a worker's request -> the reply (in the parent)
Reload = Callable[[str], str | None]  # trigger -> text for the "reloaded:" line, None: refused


class RestartBackoff:
    """How long to wait before restarting a worker slot, from how long its worker lived."""

    def __init__(
        self, stable_after: float = STABLE_AFTER, first: float = FIRST_DELAY, top: float = MAX_DELAY
    ) -> None:
        self._stable_after, self._first, self._top = stable_after, first, top
        self._last: dict[int, float] = {}  # slot -> the delay last given to a young death

    def delay(self, slot: int, lived: float) -> float:
        if lived >= self._stable_after:
            self._last.pop(slot, None)
            return QUICK_DELAY
        previous = self._last.get(slot)
        delay = self._first if previous is None else min(previous * 2, self._top)
        self._last[slot] = delay
        return delay


def describe_status(status: int) -> str:
    """A wait status in words: ``killed by signal SIGKILL`` or ``exited with status 1``."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return f"killed by signal {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


@dataclass
class SupervisorHooks:
    """Optional callbacks in the parent, each quick (one that raises is logged and ignored)."""

    before_fork: Callable[[int], None] | None = None  # slot
    worker_started: Callable[[int, int], None] | None = None  # slot, pid
    worker_exited: Callable[[int, int, int], None] | None = None  # slot, pid, wait status


@dataclass
class Worker:
    slot: int
    pid: int
    channel: socket.socket  # the parent's end
    started: float
    up: bool = False
    reloaded: bool = True


@dataclass
class _Reload:
    summary: str
    deadline: float


class Supervisor:
    """Fork ``count`` workers running ``worker_main`` and keep them running until a stop."""

    def __init__(
        self,
        count: int,
        worker_main: WorkerMain,
        *,
        answer: Answer,
        reload: Reload,
        on_ready: Callable[[list[int]], None],
        close_in_child: Callable[[], None] = lambda: None,
        hooks: SupervisorHooks | None = None,
        stop_grace: float = STOP_GRACE,
    ) -> None:
        self.count = count
        self.worker_main = worker_main
        self.answer = answer  # a worker's request -> the reply
        self.reload = reload  # checks the new configuration in the parent
        self.on_ready = on_ready  # all workers up the first time: their pids
        self.close_in_child = close_in_child  # the parent's own sockets, closed in a worker
        self.hooks = hooks or SupervisorHooks()
        self.backoff = RestartBackoff()
        self.stop_grace = stop_grace
        self.workers: dict[int, Worker] = {}  # pid -> worker
        self._restart_at: dict[int, float] = {}  # slot -> monotonic time
        self._reload_wanted: list[str] = []  # signal names since the last reload started
        self._reload: _Reload | None = None
        self._stop_signal = 0
        self._report_wanted = False
        self._ready_sent = False
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT and every worker is gone; the exit status."""
        self._install_signals()
        for slot in range(self.count):
            self._spawn(slot)
        while not self._stop_signal:
            self._step(self._next_timeout())
        log.info(
            "stopping on %s: %d workers", signal.Signals(self._stop_signal).name, len(self.workers)
        )
        notify("STOPPING=1")
        self._stop_workers()
        return 0

    # -- the loop ------------------------------------------------------------------------------

    def _step(self, timeout: float) -> None:
        channels = {w.channel: w for w in self.workers.values() if w.channel.fileno() >= 0}
        with contextlib.suppress(InterruptedError):
            readable, _, _ = select.select([self._wake_r, *channels], [], [], timeout)
            for sock in readable:
                if sock is self._wake_r:
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
                else:
                    self._serve_channel(channels[sock])
        self._reap()
        if self._stop_signal:
            return
        self._restart_due()
        self._advance_reload()
        if self._report_wanted:
            self._report_wanted = False
            log.info("workers: %s", self._memory_text())
        if not self._ready_sent and self._all_up():
            self._ready_sent = True
            notify("READY=1")
            self.on_ready(sorted(self.workers))

    def _next_timeout(self) -> float:
        now = time.monotonic()
        due = [at - now for at in self._restart_at.values()]
        if self._reload is not None:
            due.append(self._reload.deadline - now)
        return max(0.0, min([1.0, *due]))

    def _all_up(self) -> bool:
        return len(self.workers) == self.count and all(w.up for w in self.workers.values())

    def _memory_text(self) -> str:
        return " ".join(
            f"{w.slot}:pid={w.pid}:rss={mib(rss_bytes(w.pid))}"
            for w in sorted(self.workers.values(), key=lambda w: w.slot)
        )

    # -- channels ------------------------------------------------------------------------------

    def _serve_channel(self, worker: Worker) -> None:
        """Take every waiting message from one worker (its end is non-blocking)."""
        while True:
            try:
                message = worker.channel.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message = b""
            if not message:  # the worker is gone; _reap() tells why
                worker.channel.close()
                return
            kind, payload = message[:1], message[1:]
            if kind == REQUEST:
                self._answer(worker, payload)
            elif kind == UP:
                worker.up = True
                if not worker.reloaded:  # forked before a reload began: reload it now
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGHUP)
            elif kind == RELOADED:
                worker.reloaded = True

    def _answer(self, worker: Worker, payload: bytes) -> None:
        ident, request = payload[: ID.size], payload[ID.size :]
        try:
            reply = self.answer(request)
        except Exception:  # a bug in the answer must not stop the supervisor
            log.exception("answering worker %d failed", worker.slot)
            return  # the worker times out and reads "no answer"
        with contextlib.suppress(OSError):  # the worker is gone, or its buffer is full
            worker.channel.send(ident + reply)

    # -- workers -------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> None:
        self._restart_at.pop(slot, None)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._hook(self.hooks.before_fork, slot)
        try:
            pid = os.fork()
        except OSError as exc:
            parent_end.close()
            child_end.close()
            delay = self.backoff.delay(slot, 0.0)
            log.error("cannot fork worker %d: %s; retrying in %g s", slot, exc, delay)
            self._restart_at[slot] = time.monotonic() + delay
            return
        if pid == 0:
            parent_end.close()
            self._become_worker(slot, child_end)
        child_end.close()
        parent_end.setblocking(False)
        self.workers[pid] = Worker(slot, pid, parent_end, time.monotonic())
        self._hook(self.hooks.worker_started, slot, pid)

    @staticmethod
    def _hook(hook: Callable[..., None] | None, *args: int) -> None:
        """Call a bookkeeping hook; its failure is logged and changes nothing else."""
        if hook is not None:
            try:
                hook(*args)
            except Exception:
                log.exception("supervisor hook %s failed", getattr(hook, "__name__", hook))

    def _become_worker(self, slot: int, channel: socket.socket) -> NoReturn:
        """In the child: forget the parent's signal handling and sockets, run, exit."""
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in PARENT_SIGNALS:  # a reload before the worker listens is lost, not fatal
                ignored = signum in (*RELOAD_SIGNALS, signal.SIGUSR2)
                signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL)
            os.environ.pop("NOTIFY_SOCKET", None)
            for sock in (self._wake_r, self._wake_w, *(w.channel for w in self.workers.values())):
                sock.close()
            self.close_in_child()
            status = self.worker_main(slot, WorkerLink(channel, slot))
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("worker %d failed", slot)
        finally:
            for handler in logging.getLogger().handlers:
                with contextlib.suppress(Exception):
                    handler.flush()
            os._exit(status)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._exited(worker, status)

    def _exited(self, worker: Worker, status: int) -> None:
        worker.channel.close()
        self._hook(self.hooks.worker_exited, worker.slot, worker.pid, status)
        how = describe_status(status)
        if self._stop_signal:
            log.info("worker %d (pid %d) %s", worker.slot, worker.pid, how)
            return
        lived = time.monotonic() - worker.started
        delay = self.backoff.delay(worker.slot, lived)
        log.warning(
            "worker %d (pid %d) %s after %.1f s; restarting it in %g s",
            worker.slot,
            worker.pid,
            how,
            lived,
            delay,
        )
        self._restart_at[worker.slot] = time.monotonic() + delay

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, at in sorted(self._restart_at.items()):
            if at <= now:
                self._spawn(slot)

    # -- reload and stop -----------------------------------------------------------------------

    def _advance_reload(self) -> None:
        if self._reload is None and self._reload_wanted:
            trigger = "+".join(self._reload_wanted)
            self._reload_wanted = []
            self._begin_reload(trigger)
        reload = self._reload
        if reload is None:
            return
        waiting = [w.pid for w in self.workers.values() if not w.reloaded]
        if waiting and time.monotonic() < reload.deadline:
            return
        self._reload = None
        notify("READY=1")
        late = f" (no confirmation from pid {','.join(map(str, waiting))})" if waiting else ""
        log.info("reloaded: %s workers=%s%s", reload.summary, self._memory_text(), late)

    def _begin_reload(self, trigger: str) -> None:
        notify("RELOADING=1")
        summary = self.reload(trigger)
        if summary is None:  # refused and logged by the callback; the workers keep theirs
            notify("READY=1")
            return
        for worker in self.workers.values():
            worker.reloaded = False
            if worker.up:  # one still starting is signalled when it is up
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGHUP)
        self._reload = _Reload(summary, time.monotonic() + RELOAD_TIMEOUT)

    def _stop_workers(self) -> None:
        self._restart_at.clear()
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        while self.workers and time.monotonic() < deadline:
            self._step(min(0.2, max(0.0, deadline - time.monotonic())))
        for worker in list(self.workers.values()):
            log.warning("worker %d (pid %d) still running; SIGKILL", worker.slot, worker.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
        while self.workers:
            self._step(0.2)

    # -- signals -------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in RELOAD_SIGNALS:
            signal.signal(signum, self._on_reload)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes select() via the fd
        signal.signal(signal.SIGUSR2, self._on_report)

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if name not in self._reload_wanted:
            self._reload_wanted.append(name)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _on_report(self, signum: int, frame: FrameType | None) -> None:
        self._report_wanted = True
