"""``mtls-milter serve``: run the milter daemon in the foreground.

``[milter] transport`` picks the daemon: ``"asyncio"`` runs :mod:`.asyncio_daemon`; this module
is the ``"pymilter"`` one, described here. libmilter runs in a worker thread; the main thread
owns the signals. libmilter starts a signal thread of its own that waits (sigwait) for SIGHUP,
SIGINT and SIGTERM and takes any of them as "stop". Linux hands a process-directed signal to the
main thread when that thread does not block it and has no other signal pending; otherwise to
another thread that does not block it, and a thread in sigwait counts as one. So:

* SIGHUP, SIGTERM and SIGINT are blocked in every thread but the main one
  (:func:`start_with_signals_blocked`; threads they start inherit the mask), and the main
  thread never blocks them;
* their handlers only note the signal, and are installed with SA_NODEFER, so a second SIGHUP that
  arrives while the first one's handler runs is still the main thread's, not libmilter's;
* SIGUSR1 (reload) is blocked in every thread and taken by one thread of ours with sigwait: it
  never becomes pending in the main thread, where it would send a SIGHUP that follows it to
  libmilter;
* the main thread's loop acts on the notes: a reload runs there, one at a time (signals during a
  reload coalesce into one more), a stop stops libmilter;
* a return of libmilter's main loop that nobody asked for (its signal thread took a signal after
  all, or it failed) is an error: one log line and exit status 1, so a service manager restarts.

SIGUSR1 is the recommended reload signal: libmilter never waits for it, so it can never be
taken for "stop". SIGHUP still reloads.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import Milter
import milter

from mtls_milter.config import Config, MilterTransport
from mtls_milter.engine import Engine
from mtls_milter.errors import StartupError
from mtls_milter.inbound import asyncio_daemon, workers
from mtls_milter.inbound.chain_fetch import ChainFetcher
from mtls_milter.inbound.daemon_common import (
    EngineReloader,
    build_engine,
    config_summary,
    drop_privileges,
    start_policy_service,
)
from mtls_milter.inbound.metrics_observer import DaemonMetrics, start_for_daemon
from mtls_milter.inbound.milter import EngineHolder, MtlsMilter
from mtls_milter.inbound.observer import NULL_OBSERVER
from mtls_milter.inbound.policy_service import PolicyServiceThread, SessionTable
from mtls_milter.inbound.session import MilterSession
from mtls_milter.net.lookup_pool import LookupPool
from mtls_milter.runtime.logsetup import configure_logging
from mtls_milter.runtime.options import add_command, add_daemon_options
from mtls_milter.runtime.sdnotify import notify
from mtls_milter.runtime.stream_service import (
    parse_listen_spec,
    tcp_listener_sockets,
    unix_listener_socket,
)

log = logging.getLogger("mtls_milter")

MILTER_NAME = "mtls-milter"
MILTER_TIMEOUT = 600  # seconds libmilter waits for the MTA between commands
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
MAIN_THREAD_SIGNALS = (signal.SIGHUP, *STOP_SIGNALS)  # the ones libmilter's thread waits for
DAEMON_SIGNALS = (*MAIN_THREAD_SIGNALS, signal.SIGUSR1)


def add_parser(commands: Any) -> None:
    """Register the ``serve`` subcommand."""
    parser = add_command(
        commands,
        "serve",
        summary="run the milter daemon in the foreground",
        description="Run the milter in the foreground. Without --config it runs on the "
        "built-in defaults. SIGUSR1 (or SIGHUP) reloads the configuration and trust store; "
        "SIGTERM stops.",
    )
    add_daemon_options(parser, run)


def run(args: argparse.Namespace) -> int:
    """Start the daemon and block until SIGTERM/SIGINT."""
    configure_logging(args.log_level)
    try:
        engine = build_engine(args.config)
        milter_config = engine.config.milter
        if milter_config.transport is MilterTransport.ASYNCIO:
            if milter_config.workers > 1:
                return workers.serve(args.config, engine)
            return asyncio_daemon.serve(args.config, engine)
        daemon = Daemon.start(args.config, engine)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return daemon.wait()


class Daemon:
    """The running milter: its engine holder, its worker threads and its signal handling."""

    def __init__(self, config_path: str | None, engine: Engine) -> None:
        self._holder = EngineHolder(engine)
        self._reloader = EngineReloader(config_path, self._holder)
        self._executor = LookupPool(name="prefetch")  # a thread per lookup, on demand
        self._thread: threading.Thread | None = None
        self._sessions = SessionTable()
        self._fetcher = ChainFetcher()
        self._policy: PolicyServiceThread | None = None
        self._metrics: DaemonMetrics | None = None  # [metrics] listen set: the session observer
        # Written by the signal handlers (they run in the main thread, between two bytecodes of
        # wait()) and read by wait(); the handled count is wait()'s own, so no request is lost.
        self._hup_requests = 0  # written by the SIGHUP handler only
        self._usr1_requests = 0  # written by the SIGUSR1 thread only
        self._handled = (0, 0)  # the two counts at the last reload (wait() only)
        self._stop_signal = 0
        self._libmilter_done = threading.Event()
        self._libmilter_error = False
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        for end in (self._wakeup_r, self._wakeup_w):
            end.setblocking(False)

    @classmethod
    def start(cls, config_path: str | None, engine: Engine | None = None) -> Daemon:
        """Open the socket, drop privileges, start serving."""
        engine = engine or build_engine(config_path)
        daemon = cls(config_path, engine)
        daemon._install_signals()
        daemon._policy = start_policy_service(
            engine.config, daemon._sessions, masked=signals_blocked
        )
        daemon._listen(engine.config)
        daemon._thread = threading.Thread(target=daemon._serve, name="libmilter", daemon=True)
        start_with_signals_blocked(daemon._thread)
        notify("READY=1")
        log.info(
            "started: %s trust=%s", config_summary(engine.config), "; ".join(engine.trust_sources)
        )
        return daemon

    def _listen(self, config: Config) -> None:
        spec = config.milter.socket
        holder, executor = self._holder, self._executor
        sessions = self._sessions if config.policy_service.socket else None
        fetcher = self._fetcher
        try:
            with signals_blocked():  # the endpoint's thread leaves the signals to the main thread
                self._metrics = start_for_daemon(config, holder, serve_http=True)
        except OSError as exc:
            where = f"[metrics] listen {config.metrics.listen}"
            raise StartupError(f"cannot listen on {where}: {exc}") from None
        observer = self._metrics or NULL_OBSERVER
        Milter.factory = lambda: MtlsMilter(
            MilterSession(holder, executor, sessions=sessions, fetcher=fetcher, observer=observer)
        )
        _register_callbacks(config)
        milter.setconn(spec)
        milter.settimeout(MILTER_TIMEOUT)
        try:
            milter.opensocket(True)
        except milter.error:
            raise StartupError(f"cannot listen on {spec}: {_os_reason(spec)}") from None
        if spec.startswith(("unix:", "local:")):
            os.chmod(spec.split(":", 1)[1], int(config.milter.socket_mode, 8))
        else:
            set_nodelay_on_listeners()
        drop_privileges(config, spec)

    def _serve(self) -> None:
        """libmilter's main loop (its own thread); returns when libmilter stops."""
        try:
            milter.main()
        except Exception:
            log.exception("libmilter stopped with an error")
            self._libmilter_error = True
        finally:
            self._libmilter_done.set()
            self._wake()

    # -- signals -----------------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGHUP, self._on_reload)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_stop)
        _no_defer(MAIN_THREAD_SIGNALS)
        # Blocked here before any thread starts, so in every thread; only _take_usr1 takes it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        thread = threading.Thread(target=self._take_usr1, name="sigusr1", daemon=True)
        start_with_signals_blocked(thread)

    def _take_usr1(self) -> None:
        while True:
            signal.sigwait({signal.SIGUSR1})
            self._usr1_requests += 1
            self._wake()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        # Acted on by wait(), never here: a reload inside a handler nests under the next signal.
        self._hup_requests += 1

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wakeup_w.send(b"\0")

    def _sleep(self, timeout: float) -> None:
        """Wait until a signal or libmilter's thread wakes us (or ``timeout``); drain the pipe."""
        with contextlib.suppress(InterruptedError):
            select.select([self._wakeup_r], [], [], timeout)
        with contextlib.suppress(OSError):
            while self._wakeup_r.recv(4096):
                pass

    # -- life cycle ----------------------------------------------------------------------------

    def reload(self, trigger: str = "") -> None:
        """Build a new engine from the configuration file; keep the old one if that fails."""
        self._reloader.reload(trigger)
        if self._metrics is not None:  # the config gauges count every reload
            self._metrics.refresh()

    def wait(self) -> int:
        """Run the main thread's loop until stopped; return the exit status."""
        while True:
            self._sleep(1.0)
            if self._stop_signal:
                log.info("stopping on %s", signal.Signals(self._stop_signal).name)
                notify("STOPPING=1")
                milter.stop()
                break
            if self._libmilter_done.is_set():
                break
            requests = (self._hup_requests, self._usr1_requests)
            if requests != self._handled:  # any number of signals since the last one: one reload
                names = [
                    name
                    for name, now, before in zip(
                        ("SIGHUP", "SIGUSR1"), requests, self._handled, strict=True
                    )
                    if now != before
                ]
                self._handled = requests
                self.reload("+".join(names))
        status = 0
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self._stop_signal or self._libmilter_error:
            log.error(
                "libmilter's main loop returned without a stop request%s; exiting with status 1 "
                "so that the service manager restarts the daemon",
                " (its error is logged above)" if self._libmilter_error else "",
            )
            status = 1
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._fetcher.shutdown()
        if self._policy is not None:
            self._policy.stop()
        if self._metrics is not None:
            self._metrics.stop()
        log.info("stopped")
        return status


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block the daemon's signals in this thread for the ``with`` body; a thread started in it
    inherits the mask, so only the main thread (or libmilter's sigwait) ever takes them."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _os_reason(spec: str) -> str:
    """Why libmilter could not listen on ``spec``, in the OS's words: libmilter only says
    "cannot opensocket". Binds the same address once (and lets go at once) to learn it."""
    try:
        kind, where, host = parse_listen_spec(spec)
        if kind == "unix":
            unix_listener_socket(Path(str(where)), 0o600).close()
            Path(str(where)).unlink(missing_ok=True)
        else:
            for sock in tcp_listener_sockets(host, int(where)):
                sock.close()
    except (OSError, ValueError) as exc:
        return str(exc)
    return "cannot opensocket"


def start_with_signals_blocked(thread: threading.Thread) -> None:
    """Start ``thread`` with the daemon's signals blocked in it."""
    with signals_blocked():
        thread.start()


class _SigAction(ctypes.Structure):
    """glibc's ``struct sigaction`` on Linux (x86-64, arm64: the same layout)."""

    _fields_ = [
        ("sa_handler", ctypes.c_void_p),
        ("sa_mask", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong)))),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    ]


SA_NODEFER = 0x40000000  # Linux


def _no_defer(signals: tuple[int, ...]) -> None:
    """Add SA_NODEFER to the handlers Python installed for ``signals``.

    Without it the kernel blocks a signal in the main thread while that signal's C handler runs
    (Python's handler only sets a flag, but the thread can be preempted inside it); a second
    SIGHUP in that window would go to libmilter's signal thread and stop the daemon. Python's
    C handler is reentrant (atomic flag, a write to the wakeup fd). Best effort, Linux only.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for signum in signals:
            action = _SigAction()
            if libc.sigaction(signum, None, ctypes.byref(action)) != 0:
                raise OSError(ctypes.get_errno(), f"sigaction({signum}) read")
            action.sa_flags |= SA_NODEFER
            if libc.sigaction(signum, ctypes.byref(action), None) != 0:
                raise OSError(ctypes.get_errno(), f"sigaction({signum}) write")
    except (OSError, AttributeError) as exc:
        log.warning("cannot set SA_NODEFER on the signal handlers (%s); continuing", exc)


def _register_callbacks(config: Config) -> None:
    """Register pymilter's callbacks without entering its main loop (as runmilter would).
    The quarantine action is asked for only with DMARC on (the MTA must offer it)."""
    flags = Milter.ADDHDRS | Milter.CHGHDRS | Milter.SETSYMLIST
    milter.set_flags(flags | (Milter.QUARANTINE if config.dmarc.enabled else 0))
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)
    milter.register(
        MILTER_NAME,
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )


def set_nodelay_on_listeners() -> int:
    """Set TCP_NODELAY on libmilter's listening TCP socket (every listening TCP socket of this
    process); accepted sockets inherit it. Returns how many it set.

    libmilter writes a reply as several small packets and never sets TCP_NODELAY, so over TCP
    each message can stall ~40 ms on Nagle + delayed ACK (docs/performance.md).
    """
    count = 0
    for entry in os.listdir("/proc/self/fd"):
        try:
            probe = socket.socket(fileno=os.dup(int(entry)))
        except OSError:
            continue
        with probe:
            try:
                listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            except OSError:
                continue
            if listening and probe.family in (socket.AF_INET, socket.AF_INET6):
                probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                count += 1
    return count
