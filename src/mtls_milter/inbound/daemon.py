"""``mtls-milter serve``: run the milter daemon in the foreground.

libmilter runs in a worker thread; the main thread owns the signals. libmilter's own signal
thread treats SIGHUP as "stop", so the main thread keeps SIGHUP, SIGTERM and SIGINT unblocked
with Python handlers: the kernel delivers a process-directed signal to a thread that does not
block it, and the main thread is the first such thread it tries.
"""

from __future__ import annotations

import argparse
import grp
import logging
import os
import pwd
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

import Milter
import milter

from mtls_milter.config import Config, ConfigError, load_config
from mtls_milter.core.certs import CertificateInputError
from mtls_milter.engine import Engine
from mtls_milter.errors import StartupError
from mtls_milter.inbound.chain_fetch import ChainFetcher
from mtls_milter.inbound.milter import EngineHolder, MtlsMilter
from mtls_milter.inbound.policy_service import PolicyService, PolicyServiceThread, SessionTable
from mtls_milter.runtime.logsetup import configure_logging
from mtls_milter.runtime.options import add_command, add_daemon_options
from mtls_milter.runtime.sdnotify import notify

log = logging.getLogger("mtls_milter")

MILTER_NAME = "mtls-milter"
MILTER_TIMEOUT = 600  # seconds libmilter waits for the MTA between commands
PREFETCH_THREADS = 32


def add_parser(commands: Any) -> None:
    """Register the ``serve`` subcommand."""
    parser = add_command(
        commands,
        "serve",
        summary="run the milter daemon in the foreground",
        description="Run the milter in the foreground. Without --config it runs on the "
        "built-in defaults. SIGHUP reloads the configuration and trust store; SIGTERM stops.",
    )
    add_daemon_options(parser, run)


def run(args: argparse.Namespace) -> int:
    """Start the daemon and block until SIGTERM/SIGINT."""
    configure_logging(args.log_level)
    try:
        daemon = Daemon.start(args.config)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return daemon.wait()


def build_engine(config_path: str | None) -> Engine:
    """Load the configuration and build an engine; StartupError with a clear message."""
    try:
        return Engine.from_config(load_config(config_path))
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    except CertificateInputError as exc:
        raise StartupError(f"trust anchors: {exc}") from None


class Daemon:
    """The running milter: its engine holder, its worker threads and its signal handling."""

    def __init__(self, config_path: str | None, engine: Engine) -> None:
        self._config_path = config_path
        self._holder = EngineHolder(engine)
        self._executor = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prefetch")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._status = 0
        self._sessions = SessionTable()
        self._fetcher = ChainFetcher()
        self._policy: PolicyServiceThread | None = None

    @classmethod
    def start(cls, config_path: str | None) -> Daemon:
        """Open the socket, drop privileges, start serving."""
        engine = build_engine(config_path)
        daemon = cls(config_path, engine)
        daemon._start_policy_service(engine.config)
        daemon._listen(engine.config)
        daemon._install_signals()
        daemon._thread = threading.Thread(target=daemon._serve, name="libmilter", daemon=True)
        daemon._thread.start()
        notify("READY=1")
        log.info(
            "started: socket=%s policy_service=%s config=%s trust=%s",
            engine.config.milter.socket,
            engine.config.policy_service.socket or "off",
            engine.config.source,
            "; ".join(engine.trust_sources),
        )
        return daemon

    def _start_policy_service(self, config: Config) -> None:
        """Serve Postfix's policy delegation (in its own thread) when configured."""
        spec = config.policy_service.socket
        if not spec:
            return
        service = PolicyService(spec, self._sessions, config.policy_service.socket_mode)
        thread = PolicyServiceThread(service)
        try:
            thread.start()
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot listen on [policy_service] socket {spec}: {exc}") from None
        self._policy = thread

    def _listen(self, config: Config) -> None:
        spec = config.milter.socket
        holder, executor = self._holder, self._executor
        sessions = self._sessions if config.policy_service.socket else None
        fetcher = self._fetcher
        Milter.factory = lambda: MtlsMilter(holder, executor, sessions=sessions, fetcher=fetcher)
        _register_callbacks()
        milter.setconn(spec)
        milter.settimeout(MILTER_TIMEOUT)
        try:
            milter.opensocket(True)
        except milter.error as exc:
            raise StartupError(f"cannot listen on {spec}: {exc}") from None
        if spec.startswith(("unix:", "local:")):
            os.chmod(spec.split(":", 1)[1], int(config.milter.socket_mode, 8))
        else:
            _set_nodelay_on_listeners()
        _drop_privileges(config, spec)

    def _serve(self) -> None:
        try:
            milter.main()
        except Exception:
            log.exception("libmilter stopped with an error")
            self._status = 1
        finally:
            self._stopping.set()

    def _install_signals(self) -> None:
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload()

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        notify("STOPPING=1")
        milter.stop()
        self._stopping.set()

    def reload(self) -> None:
        """Build a new engine from the configuration file; keep the old one if that fails."""
        notify("RELOADING=1")
        try:
            engine = build_engine(self._config_path)
        except StartupError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            notify("READY=1")
            return
        old = self._holder.engine.config
        if engine.config.milter.socket != old.milter.socket:
            log.warning("reload: [milter] socket changed; takes effect only after a restart")
        if engine.config.policy_service != old.policy_service:
            log.warning("reload: [policy_service] changed; takes effect only after a restart")
        self._holder.engine = engine
        notify("READY=1")
        log.info(
            "reloaded: config=%s trust=%s", engine.config.source, "; ".join(engine.trust_sources)
        )

    def wait(self) -> int:
        """Block until stopped; return the exit status."""
        while not self._stopping.wait(1.0):
            pass
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._fetcher.shutdown()
        if self._policy is not None:
            self._policy.stop()
        log.info("stopped")
        return self._status


def _register_callbacks() -> None:
    """Register pymilter's callbacks without entering its main loop (as runmilter would)."""
    milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.SETSYMLIST)
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


def _set_nodelay_on_listeners() -> None:
    """Set TCP_NODELAY on libmilter's listening TCP socket; accepted sockets inherit it.

    libmilter writes a reply as several small packets and never sets TCP_NODELAY, so over TCP
    each message can stall ~40 ms on Nagle + delayed ACK (docs/performance.md).
    """
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


def _drop_privileges(config: Config, spec: str) -> None:
    """When root and a user is configured, switch to it (after the socket is open)."""
    user, group = config.milter.user, config.milter.group
    if os.geteuid() != 0 or not user:
        return
    try:
        entry = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError as exc:
        raise StartupError(f"[milter] user/group: {exc.args[0]}") from None
    policy = config.policy_service.socket
    for path in (spec, policy):
        if path.startswith(("unix:", "local:")):
            os.chown(Path(path.split(":", 1)[1]), entry.pw_uid, gid)
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(entry.pw_uid)
    log.info("dropped privileges to %s:%s", user, group or gid)
