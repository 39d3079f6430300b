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

from mtls_milter.config import Config, ConfigError, DnsConfig, load_config
from mtls_milter.core.certs import CertificateInputError
from mtls_milter.engine import Engine
from mtls_milter.errors import StartupError
from mtls_milter.inbound.policy_service import PolicyService, PolicyServiceThread, SessionTable
from mtls_milter.inbound.session import EngineHolder
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

    def __init__(self, config_path: str | None, holder: EngineHolder) -> None:
        self._config_path = config_path
        self._holder = holder
        self._dns_inputs = resolver_inputs(holder.engine.config.dns)

    def reload(self, trigger: str = "") -> None:
        """Reload (see the module docstring); every outcome is one log line."""
        notify("RELOADING=1")
        try:
            engine = build_engine(self._config_path)
        except StartupError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            notify("READY=1")
            return
        old = self._holder.engine
        new_milter, old_milter = engine.config.milter, old.config.milter
        if (new_milter.socket, new_milter.transport) != (old_milter.socket, old_milter.transport):
            log.warning(
                "reload: [milter] socket or transport changed; takes effect only after a restart"
            )
        if engine.config.policy_service != old.config.policy_service:
            log.warning("reload: [policy_service] changed; takes effect only after a restart")
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
            "reloaded: config=%s trust=%s dns=%s%s",
            engine.config.source,
            "; ".join(engine.trust_sources),
            dns,
            f" signal={trigger}" if trigger else "",
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
