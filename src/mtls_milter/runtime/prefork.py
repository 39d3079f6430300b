"""Pre-forked workers: one supervising parent, N worker processes on one listening socket.

The parent opens the listening socket (with the start-up privileges), then forks the workers;
each inherits the socket and runs its own event loop in its own process (its own GIL); the
kernel hands each connection to one of the processes waiting in ``accept()``. The parent serves
no connection. It restarts a worker that dies (one log line with pid and exit status or signal;
the delay doubles from 0.5 s to 30 s while workers die young, :class:`RestartBackoff`); checks a
reload itself, in a thread so that its loop keeps answering the workers, then sends SIGHUP to
every worker and logs ``reloaded:`` once all confirmed; on SIGTERM/SIGINT, or a failure of its
own, stops every worker (SIGKILL after :data:`STOP_GRACE` s) and exits when all are gone; alone
tells systemd READY=1, RELOADING=1, STOPPING=1 (NOTIFY_SOCKET is removed in the workers);
answers each worker's requests on its private channel (:mod:`.worker_link`).

What a worker runs, what a request means and what a reload checks are given to the supervisor;
:class:`SupervisorHooks` are the places for per-process bookkeeping (e.g. metrics).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

from mtls_milter.runtime.sdnotify import notify
from mtls_milter.runtime.worker_link import (
    ID,
    MAX_MESSAGE,
    RELOADED,
    REQUEST,
    UP,
    ReloadState,
    RestartBackoff,
    SupervisorHooks,
    Worker,
    WorkerLink,
    describe_status,
    memory_text,
)

__all__ = ["RestartBackoff", "Supervisor", "SupervisorHooks", "describe_status"]

log = logging.getLogger("mtls_milter")

STOP_GRACE = 15.0  # seconds workers get after SIGTERM before SIGKILL
RELOAD_TIMEOUT = 30.0  # seconds the parent waits for every worker to confirm a reload
RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PARENT_SIGNALS = (*RELOAD_SIGNALS, *STOP_SIGNALS, signal.SIGCHLD, signal.SIGUSR2)

WorkerMain = Callable[[int, WorkerLink], int]  # slot, channel -> exit status (in the child)
Answer = Callable[[bytes], bytes]  # a worker's request -> the reply (in the parent)
Reload = Callable[[str], str | None]  # trigger -> text for the "reloaded:" line, None: refused


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
        self._reload: ReloadState | None = None
        self._stop_signal = 0
        self._stopping = False  # stopping the workers: none is restarted
        self._report_wanted = False
        self._ready_sent = False
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        # selectors, not select.select(): a descriptor number over 1023 is fine.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT and every worker is gone; the exit status (1 after a
        failure of the supervisor itself, which stops the workers too: none is orphaned)."""
        status = 1
        try:
            self._install_signals()
            for slot in range(self.count):
                self._spawn(slot)
            while not self._stop_signal:
                self._step(self._next_timeout())
            stop = signal.Signals(self._stop_signal).name
            log.info("stopping on %s: %d workers", stop, len(self.workers))
            status = 0
        except Exception:
            log.exception("supervisor failed; stopping %d workers", len(self.workers))
        finally:
            self._stopping = True
            notify("STOPPING=1")
            self._stop_workers()
        return status

    # -- the loop ------------------------------------------------------------------------------

    def _step(self, timeout: float) -> None:
        with contextlib.suppress(InterruptedError):
            for key, _ in self._selector.select(timeout):
                if key.data is None:  # the wake-up socket
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
                else:
                    self._serve_channel(key.data)
        self._reap()
        if self._stop_signal or self._stopping:
            return
        if not self._checking():
            self._restart_due()
        self._advance_reload()
        if self._report_wanted:
            self._report_wanted = False
            log.info("workers: %s", memory_text(self.workers.values()))
        if not self._ready_sent and self._all_up():
            self._ready_sent = True
            notify("READY=1")
            self.on_ready(sorted(self.workers))

    def _next_timeout(self) -> float:
        if self._checking():  # no restart meanwhile; the check's end wakes the loop
            return 1.0
        now = time.monotonic()
        due = [at - now for at in self._restart_at.values()]
        if self._reload is not None:
            due.append(self._reload.deadline - now)
        return max(0.0, min([1.0, *due]))

    def _checking(self) -> bool:
        """A reload is being checked in its thread (it may change what a new worker runs)."""
        return self._reload is not None and not self._reload.checked

    def _all_up(self) -> bool:
        return len(self.workers) == self.count and all(w.up for w in self.workers.values())

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
                self._close_channel(worker)
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
                if worker.late:  # the confirmation of a reload that timed out: not this one's
                    worker.late -= 1
                else:
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
        # Until the child has reset them, the parent's handlers would run there: a signal meant
        # for the new worker would be taken for the parent's and lost. Blocked, it waits.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            parent_end.close()
            child_end.close()
            delay = self.backoff.delay(slot, 0.0)
            log.error("cannot fork worker %d: %s; retrying in %g s", slot, exc, delay)
            self._restart_at[slot] = time.monotonic() + delay
            return
        if pid == 0:
            parent_end.close()
            self._become_worker(slot, child_end, mask)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child_end.close()
        parent_end.setblocking(False)
        self.workers[pid] = worker = Worker(slot, pid, parent_end, time.monotonic())
        self._selector.register(parent_end, selectors.EVENT_READ, worker)
        self._hook(self.hooks.worker_started, slot, pid)

    @staticmethod
    def _hook(hook: Callable[..., None] | None, *args: int) -> None:
        """Call a bookkeeping hook; its failure is logged and changes nothing else."""
        if hook is not None:
            try:
                hook(*args)
            except Exception:
                log.exception("supervisor hook %s failed", getattr(hook, "__name__", hook))

    def _become_worker(self, slot: int, channel: socket.socket, mask: set[int]) -> NoReturn:
        """In the child: forget the parent's signal handling and sockets, run, exit."""
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in PARENT_SIGNALS:  # a reload before the worker listens is lost, not fatal
                ignored = signum in (*RELOAD_SIGNALS, signal.SIGUSR2)
                signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.environ.pop("NOTIFY_SOCKET", None)
            self._selector.close()
            for sock in (self._wake_r, self._wake_w, *(w.channel for w in self.workers.values())):
                sock.close()
            self.close_in_child()
            status = self.worker_main(slot, WorkerLink(channel, slot))
        except SystemExit as exc:  # sys.exit(): None is success, a text is a failure
            status = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
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
        self._close_channel(worker)
        self._hook(self.hooks.worker_exited, worker.slot, worker.pid, status)
        how = describe_status(status)
        if self._stop_signal or self._stopping:
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

    def _close_channel(self, worker: Worker) -> None:
        if worker.channel.fileno() >= 0:
            self._selector.unregister(worker.channel)
            worker.channel.close()

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
        if reload is None or not reload.checked:
            return
        if reload.deadline == float("inf"):
            if reload.summary is None:  # refused and logged; the workers keep theirs
                self._reload = None
                notify("READY=1")
                return
            self._signal_reload(reload)
        waiting = [w.pid for w in self.workers.values() if not w.reloaded]
        if waiting and time.monotonic() < reload.deadline:
            return
        self._reload = None
        notify("READY=1")
        late = f" (no confirmation from pid {','.join(map(str, waiting))})" if waiting else ""
        memory = memory_text(self.workers.values())
        log.info("reloaded: %s workers=%s%s", reload.summary, memory, late)

    def _begin_reload(self, trigger: str) -> None:
        """Check the configuration in a thread: the loop keeps answering the workers' lookups
        meanwhile (their event loops wait for those answers). No fork until it is done."""
        notify("RELOADING=1")
        self._reload = reload = ReloadState(trigger)
        threading.Thread(
            target=self._check_reload, args=(reload,), name="reload-check", daemon=True
        ).start()

    def _check_reload(self, reload: ReloadState) -> None:
        try:
            reload.summary = self.reload(reload.trigger)
        except Exception:  # a bug in the check: keep running as before
            log.exception("reload check failed; keeping the running configuration")
        finally:
            reload.checked = True
            with contextlib.suppress(OSError):
                self._wake_w.send(b"r")

    def _signal_reload(self, reload: ReloadState) -> None:
        for worker in self.workers.values():
            worker.late += not worker.reloaded  # a confirmation still due from the last reload
            worker.reloaded = False
            if worker.up:  # one still starting is signalled when it is up
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGHUP)
        reload.deadline = time.monotonic() + RELOAD_TIMEOUT

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
