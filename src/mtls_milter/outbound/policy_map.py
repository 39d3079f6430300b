"""``mtls-milter policy-map``: a Postfix ``smtp_tls_policy_maps`` socketmap service.

Postfix connects with ``smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8899:mtls`` and sends
netstrings ``mtls example.com``; each gets one netstring reply: ``OK secure match=… servername=
hostname``, ``NOTFOUND ``, ``TEMP <reason>`` or ``PERM <reason>``. This module only translates
the protocol; the decision is :func:`mtls_milter.core.outbound.tls_policy`.

Requests on one connection may be pipelined: they are resolved concurrently (in a thread pool,
dnspython being synchronous) and answered strictly in request order. A framing error (bad
length, missing comma, a request longer than ``[policy_map] max_request``) is answered
``PERM <reason>`` and the connection is closed, since the stream has no boundaries left to trust.

With ``[metrics] policy_map_listen`` set, this process serves its own ``/metrics`` and
``/healthz`` (docs/observability.md): answers by kind (OK, NOTFOUND, TEMP, PERM) and its DNS
lookups.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mtls_milter.config import (
    DEFAULT_DNS_BUDGET,
    Config,
    ConfigError,
    PolicyMapConfig,
    load_config,
)
from mtls_milter.core.lookups import MxResolver
from mtls_milter.core.outbound import PolicyKind, tls_policy
from mtls_milter.core.quote import quote
from mtls_milter.errors import StartupError
from mtls_milter.net.dns import DnsResolver
from mtls_milter.outbound.netstring import NetstringError, NetstringReader, encode
from mtls_milter.runtime import metrics
from mtls_milter.runtime.logsetup import configure_logging
from mtls_milter.runtime.metrics_http import MetricsServer, socket_accepts
from mtls_milter.runtime.metrics_tally import DnsLookupMetrics, Tally
from mtls_milter.runtime.options import add_command, add_daemon_options
from mtls_milter.runtime.sdnotify import notify
from mtls_milter.runtime.stream_service import Listener, StreamService

log = logging.getLogger("mtls_milter.policy_map")

READ_SIZE = 4096
IDLE_TIMEOUT = 600.0  # seconds without a request before a connection is closed
MAX_PIPELINE = 32  # requests in flight per connection; more: stop reading until answered
WORKER_THREADS = 16
UNIX_SOCKET_MODE = 0o666  # the socket gives out only public DNS facts; Postfix runs as postfix
ANSWER_KINDS = frozenset({"OK", "NOTFOUND", "TEMP", "PERM"})


def add_parser(commands: Any) -> None:
    """Register the ``policy-map`` subcommand."""
    parser = add_command(
        commands,
        "policy-map",
        summary="run the Postfix smtp_tls_policy_maps socketmap service in the foreground",
        description="Serve Postfix's smtp_tls_policy_maps over the socketmap protocol: "
        "domains that publish Client MX get 'secure match=<MX hosts> servername=hostname'. "
        "Listens on [policy_map] socket (default inet:8899@127.0.0.1). SIGTERM stops.",
    )
    add_daemon_options(parser, run)


def run(args: argparse.Namespace) -> int:
    """Load the configuration and serve until SIGTERM/SIGINT."""
    configure_logging(args.log_level)
    try:
        config = load_config(args.config)
        resolver = DnsResolver.from_config(config.dns)
    except (ConfigError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        asyncio.run(_main(config, resolver))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


async def _main(config: Config, resolver: MxResolver) -> None:
    service = PolicyMapService(config.policy_map, resolver, budget=config.dns.budget)
    server = await service.listen()
    endpoint = _start_metrics(config, resolver)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notify("READY=1")
    log.info(
        "started: socket=%s map=%s report_only=%s config=%s",
        config.policy_map.socket,
        config.policy_map.map_name,
        config.policy_map.report_only,
        config.source,
    )
    try:
        await stop.wait()
    finally:
        notify("STOPPING=1")
        server.close()
        await service.close()
        if endpoint is not None:
            endpoint.stop()
        log.info("stopped")


def _start_metrics(config: Config, resolver: MxResolver) -> MetricsServer | None:
    """Serve /metrics and /healthz when ``[metrics] policy_map_listen`` is set."""
    listen = config.metrics.policy_map_listen
    if not listen:
        return None
    m = metrics.enable()
    if isinstance(resolver, DnsResolver):
        tally = Tally()
        resolver.on_lookup = DnsLookupMetrics(m, tally)
        metrics.on_scrape(tally.flush)
    spec = config.policy_map.socket

    def health() -> tuple[bool, str]:
        refused = socket_accepts(spec)
        return (False, f"policy map socket not accepting: {refused}") if refused else (True, "")

    try:
        return metrics.start_server(config, health, listen=listen)
    except OSError as exc:
        what = f"[metrics] policy_map_listen {listen}"
        raise StartupError(f"cannot listen on {what}: {exc}") from None


class PolicyMapService(StreamService):
    """The socketmap protocol on top of :func:`tls_policy`; one instance serves all clients."""

    def __init__(
        self,
        config: PolicyMapConfig,
        resolver: MxResolver,
        *,
        budget: float = DEFAULT_DNS_BUDGET,
        workers: int = WORKER_THREADS,
    ) -> None:
        super().__init__(config.socket, socket_mode=UNIX_SOCKET_MODE, log=log)
        self.config = config
        self.resolver = resolver  # shared by all connections: its cache is the only cache
        self.budget = budget
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="policy-map")

    async def listen(self) -> Listener:
        """Open the configured socket; StartupError when that is impossible."""
        try:
            return await super().listen()
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot listen on {self.spec}: {exc}") from None

    async def close(self) -> None:
        """Cancel open connections and stop the worker threads."""
        await self.close_connections()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Read netstrings, answer each in order; return when the client is done or wrong."""
        loop = asyncio.get_running_loop()
        parser = NetstringReader(self.config.max_request)
        replies: asyncio.Queue[Awaitable[str] | None] = asyncio.Queue(MAX_PIPELINE)
        sender = asyncio.create_task(self._send_replies(replies, writer))
        try:
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(READ_SIZE), IDLE_TIMEOUT)
                except TimeoutError:
                    log.debug("closing idle connection")
                    break
                except OSError as exc:
                    log.info("connection error: %s", exc)
                    break
                if not data:
                    if parser.pending:
                        log.warning("client closed in the middle of a request (truncated)")
                    break
                parser.feed(data)
                while True:
                    try:
                        payload = parser.next_payload()
                    except NetstringError as exc:
                        log.warning("protocol error, closing connection: %s", exc)
                        await replies.put(_ready(f"PERM protocol error: {exc}"))
                        return
                    if payload is None:
                        break
                    await replies.put(loop.run_in_executor(self._executor, self.answer, payload))
        finally:
            await replies.put(None)
            with contextlib.suppress(Exception):
                await sender

    @staticmethod
    async def _send_replies(
        replies: asyncio.Queue[Awaitable[str] | None], writer: asyncio.StreamWriter
    ) -> None:
        """Write the replies in request order; after a write error keep draining the queue."""
        broken = False
        while True:
            item = await replies.get()
            if item is None:
                return
            try:
                reply = await item
            except Exception:
                log.exception("policy lookup failed")
                reply = "TEMP internal error"
            _count_answer(reply)
            if broken:
                continue
            try:
                writer.write(encode(reply.encode("ascii", "replace")))
                await writer.drain()
            except OSError as exc:
                log.info("client went away: %s", exc)
                broken = True

    def answer(self, payload: bytes) -> str:
        """Reply to one request payload (``name key``); runs in a worker thread, never raises."""
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            log.warning("request is not UTF-8: %s", quote(payload))
            return "PERM request is not UTF-8"
        name, sep, key = text.partition(" ")
        if not sep or not key.strip():
            log.warning("malformed request %s: expected 'name key'", quote(text))
            return "PERM malformed request: expected 'name key'"
        if name != self.config.map_name:
            log.info(
                "unknown map name %s (serving %r): NOTFOUND", quote(name), self.config.map_name
            )
            return "NOTFOUND "
        try:
            decision = tls_policy(key, self.resolver, self.budget)
        except Exception:
            log.exception("policy decision for %s failed", quote(key))
            return "TEMP internal error"
        reply = decision.reply()
        # Outside data (the key, MX host names in the reply) only quoted and cut to 200 characters:
        # no log injection, and a domain with hundreds of MX hosts makes no huge log line.
        who = decision.domain or quote(key)
        shown = quote(reply)
        if self.config.report_only and decision.kind is not PolicyKind.NOTFOUND:
            log.info(
                "report-only: %s would be %s (%s); answering NOTFOUND", who, shown, decision.reason
            )
            return "NOTFOUND "
        level = logging.DEBUG if decision.kind is PolicyKind.NOTFOUND else logging.INFO
        log.log(level, "%s: %s (%s)", who, shown, decision.reason)
        return reply


def _count_answer(reply: str) -> None:
    m = metrics.current()
    if m is not None:
        kind = reply.split(" ", 1)[0]
        if kind in ANSWER_KINDS:
            m.policy_map_answers.labels(kind).inc()


async def _ready(reply: str) -> str:
    return reply
