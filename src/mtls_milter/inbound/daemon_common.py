"""What both transports' daemons share: building the engine, reloading it, dropping privileges.

A reload builds a new engine from the configuration file and keeps the old one if that fails.
The DNS resolver, and with it the cache of DNS answers, is kept when ``[dns]`` and the system's
resolver configuration are unchanged: a reload during a DNS outage must not turn every cached
sender into ``temperror``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import logging
import os
import pwd
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from mtls_milter import __version__
from mtls_milter.config import Config, ConfigError, DnsConfig, load_config
from mtls_milter.core.certs import CertificateInputError
from mtls_milter.engine import Engine
from mtls_milter.errors import StartupError
from mtls_milter.inbound.policy_service import PolicyService, PolicyServiceThread, SessionTable
from mtls_milter.inbound.session import EngineHolder
from mtls_milter.runtime import metrics
from mtls_milter.runtime.sdnotify import notify

log = logging.getLogger("mtls_milter")

RESOLV_CONF = Path("/etc/resolv.conf")


def build_engine(config_path: str | None) -> Engine:
    """Load the configuration and build an engine; StartupError with a clear message."""
    try:
        return Engine.from_config(load_config(config_path))
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    except CertificateInputError as exc:
        raise StartupError(f"trust anchors: {exc}") from None


class EngineReloader:
    """Swaps the holder's engine for one built from the configuration file again."""

    def __init__(
        self,
        config_path: str | None,
        holder: EngineHolder,
        announce: Callable[[], str] = lambda: "reloaded",
    ) -> None:
        self._config_path = config_path
        self._holder = holder
        self._announce = announce  # the first words of the success line
        self._dns_inputs = resolver_inputs(holder.engine.config.dns)

    def reload(self, trigger: str = "") -> bool:
        """Reload (see the module docstring); every outcome is one log line. False: refused."""
        notify("RELOADING=1")
        try:
            engine = build_engine(self._config_path)
        except StartupError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            metrics.reload_failed(str(exc))  # /healthz and the reload gauge (docs/observability.md)
            notify("READY=1")
            return False
        old = self._holder.engine
        warn_restart_only(old.config, engine.config)
        dns_inputs = resolver_inputs(engine.config.dns)
        if dns_inputs == self._dns_inputs:
            engine = dataclasses.replace(engine, resolver=old.resolver)
            dns = "kept (cached answers stay)"
        else:
            self._dns_inputs = dns_inputs
            dns = "new resolver (empty cache)"
        self._holder.engine = engine
        notify("READY=1")
        log.info(
            "%s: changed=%s config=%s trust=%s dns=%s%s",
            self._announce(),
            config_changes(old.config, engine.config),
            engine.config.source,
            "; ".join(engine.trust_sources),
            dns,
            f" signal={trigger}" if trigger else "",
        )
        return True


def warn_restart_only(old: Config, new: Config) -> None:
    """Log the changes a reload cannot apply (sockets, transport, worker count)."""
    keys = ("socket", "transport", "workers")
    if any(getattr(new.milter, key) != getattr(old.milter, key) for key in keys):
        log.warning(
            "reload: [milter] socket, transport or workers changed; takes effect only after a "
            "restart"
        )
    if new.policy_service != old.policy_service:
        log.warning("reload: [policy_service] changed; takes effect only after a restart")


def config_changes(old: Config, new: Config) -> str:
    """``section.key`` of every value that differs, comma-separated; ``none`` when none does."""
    changed = [
        f"{section.name}.{key.name}"
        for section in dataclasses.fields(Config)
        if section.name != "source"
        for key in dataclasses.fields(getattr(new, section.name))
        if getattr(getattr(old, section.name), key.name)
        != getattr(getattr(new, section.name), key.name)
    ]
    return ",".join(changed) or "none"


def config_summary(config: Config) -> str:
    """One line of what the daemon runs with (the start-up line)."""
    dns, policy, dmarc = config.dns, config.policy, config.dmarc
    metrics = getattr(config, "metrics", None)
    listen = getattr(metrics, "listen", "") if metrics is not None else ""
    return " ".join(
        (
            f"version={__version__}",
            f"socket={config.milter.socket}",
            f"transport={config.milter.transport}",
            f"workers={config.milter.workers}",
            f"policy_service={config.policy_service.socket or 'off'}",
            f"dns={','.join(dns.nameservers) or 'system'}",
            f"dns_budget={dns.budget:g}s",
            f"on_fail={policy.on_fail}",
            f"on_temperror={policy.on_temperror}",
            f"dmarc={'off' if not dmarc.enabled else 'enforce' if dmarc.enforce else 'annotate'}",
            f"chain_fetch={'on' if config.chain_fetch.enabled else 'off'}",
            f"metrics={listen or 'off'}",
            f"config={config.source}",
        )
    )


def resolver_inputs(dns: DnsConfig) -> tuple[object, ...]:
    """What the resolver is built from: ``[dns]`` and, without configured name servers, the
    system's resolver configuration (read again at every reload)."""
    if dns.nameservers:
        return (dns,)
    try:
        system = RESOLV_CONF.read_bytes()
    except OSError as exc:
        system = f"unreadable: {exc.strerror}".encode()
    return (dns, system)


def drop_privileges(config: Config, spec: str) -> None:
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


def start_policy_service(
    config: Config,
    sessions: SessionTable,
    *,
    masked: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> PolicyServiceThread | None:
    """Serve Postfix's policy delegation in its own thread when ``[policy_service] socket`` is
    set. The thread starts inside ``masked()`` (the pymilter daemon blocks its signals there, so
    the thread inherits the mask)."""
    spec = config.policy_service.socket
    if not spec:
        return None
    thread = PolicyServiceThread(PolicyService(spec, sessions, config.policy_service.socket_mode))
    try:
        with masked():
            thread.start()
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot listen on [policy_service] socket {spec}: {exc}") from None
    return thread
