"""Postfix policy delegation (``check_policy_service``) next to the milter, in the same daemon.

Postfix before 3.12 tells a milter nothing about a client certificate it did not trust, but its
policy-delegation protocol sends the leaf's fingerprint for every presented certificate
(docs/evidence.md). This service records, per ``(client_address, client_port)``, the
``ccert_fingerprint``, ``ccert_pubkey_fingerprint`` and TLS facts of each request in a
:class:`SessionTable`; the milter looks its own ``{client_addr}``/``{client_port}`` up there at
end of message. The service never decides anything: every request is answered
``action=DUNNO``, including malformed, oversized and unexpected ones.

A record belongs to one SMTP session. Postfix sends the request at RCPT, always after the
milter's connect callback for the same session, so the milter takes a record only when it was
made after its own connect time (:meth:`SessionTable.get` with ``since``); an older record with
the same address and port is an earlier session's (docs/evidence.md).

Protocol (Postfix SMTPD_POLICY_README): ``name=value`` lines, an empty line ends a request, the
reply is ``action=...`` and an empty line; one connection carries many requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from mtls_milter.core.evidence import xtext_decode
from mtls_milter.core.lru import ExpiringLRU
from mtls_milter.errors import MtlsMilterError
from mtls_milter.runtime.service_thread import ServiceThread
from mtls_milter.runtime.stream_service import StreamService

__all__ = [
    "DUNNO",
    "PolicyFacts",
    "PolicyService",
    "PolicyServiceThread",
    "PolicyTableUnavailable",
    "SessionTable",
    "facts_from_request",
    "parse_request",
]

log = logging.getLogger("mtls_milter.policy_service")

DUNNO = b"action=DUNNO\n\n"
MAX_LINE = 2048  # bytes of one name=value line (Postfix's longest values are well below)
MAX_ATTRIBUTES = 100  # lines of one request (Postfix 3.7 sends about 35)
IDLE_TIMEOUT = 600.0  # seconds without a request before a connection is closed
MAX_CONNECTIONS = 512
TABLE_SIZE = 50_000  # sessions remembered; the oldest go first
TABLE_TTL = 3600.0  # seconds a session's facts stay usable
MAX_VALUE = 512  # characters kept of a recorded value


@dataclass(frozen=True, slots=True)
class PolicyFacts:
    """What one policy request said about the TLS side of an SMTP session."""

    fingerprint: str = ""  # ccert_fingerprint as sent (SHA-256 or MD5, colon hex); "" none
    pubkey_fingerprint: str = ""
    protocol: str = ""  # encryption_protocol, e.g. "TLSv1.3"; "" without TLS
    subject: str = ""  # ccert_subject (CN, xtext-decoded), trusted certificates only
    issuer: str = ""
    helo: str = ""
    recorded: float = 0.0  # monotonic time


class PolicyTableUnavailable(MtlsMilterError):
    """The table could not be asked (a worker's parent did not answer in time): unlike "no
    record", the session may have a fingerprint that the verdict then lacks."""


class SessionTable:
    """Bounded, expiring, thread-safe map ``(client_address, client_port)`` → facts."""

    def __init__(
        self,
        size: int = TABLE_SIZE,
        ttl: float = TABLE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._clock = clock  # injectable for tests
        self._items: ExpiringLRU[tuple[str, str], PolicyFacts] = ExpiringLRU(max(1, size))

    def record(self, address: str, port: str, facts: PolicyFacts) -> None:
        """Remember ``facts`` for the session; a later request for it replaces them."""
        key = (_norm_address(address), port.strip())
        stamped = replace(facts, recorded=self._clock())
        self._items.put(key, stamped)

    def now(self) -> float:
        """The table's clock: what a session's start is measured on for :meth:`get`."""
        return self._clock()

    def get(self, address: str, port: str, *, since: float | None = None) -> PolicyFacts | None:
        """The facts recorded for the session, unless missing, expired or recorded before
        ``since`` (the session's start on :meth:`now`'s clock: such a record is an earlier
        session's from the same address and port). :class:`PolicyTableUnavailable` when the
        table cannot be asked (only a worker's remote view of the parent's table)."""
        key = (_norm_address(address), port.strip())
        now = self._clock()
        facts = self._items.get(key, lambda facts: now - facts.recorded <= self._ttl)
        if facts is None:
            return None
        if since is not None and facts.recorded < since:
            # Kept: with several MTAs on one daemon, an earlier session may still need it.
            return None
        return facts

    def __len__(self) -> int:
        return len(self._items)


def _norm_address(address: str) -> str:
    """``IPv6:2001:db8::1`` (Sendmail style) and ``[::1]`` → the bare address, lower case."""
    text = address.strip().strip("[]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    return text.lower()


def parse_request(lines: list[bytes]) -> dict[str, str]:
    """``name=value`` lines → a mapping; lines without ``=`` are ignored; first value wins."""
    attributes: dict[str, str] = {}
    for raw in lines:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        name, sep, value = text.partition("=")
        if sep and name and name not in attributes:
            attributes[name] = value
    return attributes


def facts_from_request(attributes: dict[str, str]) -> tuple[str, str, PolicyFacts] | None:
    """(address, port, facts) from one request, or None when it names no client session."""
    address = attributes.get("client_address", "").strip()
    port = attributes.get("client_port", "").strip()
    if not address or not port.isdigit() or len(address) > 100:
        return None
    facts = PolicyFacts(
        fingerprint=attributes.get("ccert_fingerprint", "").strip()[:MAX_VALUE],
        pubkey_fingerprint=attributes.get("ccert_pubkey_fingerprint", "").strip()[:MAX_VALUE],
        protocol=attributes.get("encryption_protocol", "").strip()[:MAX_VALUE],
        subject=xtext_decode(attributes.get("ccert_subject", ""))[:MAX_VALUE],
        issuer=xtext_decode(attributes.get("ccert_issuer", ""))[:MAX_VALUE],
        helo=attributes.get("helo_name", "").strip()[:MAX_VALUE],
    )
    return address, port, facts


class PolicyService(StreamService):
    """The asyncio side: accept Postfix's connections, record facts, answer DUNNO."""

    def __init__(self, spec: str, table: SessionTable, socket_mode: str = "0660") -> None:
        super().__init__(
            spec,
            socket_mode=int(socket_mode, 8),
            log=log,
            max_connections=MAX_CONNECTIONS,
            limit=MAX_LINE + 2,
        )
        self.table = table
        self.requests = 0  # answered so far (for tests and logs)

    async def close(self) -> None:
        await self.close_connections()

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer requests until the client closes, idles out or breaks the framing."""
        lines: list[bytes] = []
        while True:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), IDLE_TIMEOUT)
            except TimeoutError:
                return
            except asyncio.IncompleteReadError as exc:
                if exc.partial or lines:
                    log.info("policy client closed in the middle of a request (ignored)")
                return
            except asyncio.LimitOverrunError:
                # A line longer than any Postfix sends: the stream is not Postfix's protocol.
                log.warning("policy request line over %d bytes: answering DUNNO, closing", MAX_LINE)
                await self._reply(writer)
                return
            line = line.rstrip(b"\n").rstrip(b"\r")
            if line:
                lines.append(line)
                if len(lines) > MAX_ATTRIBUTES:
                    log.warning(
                        "policy request over %d attributes: answering DUNNO, closing",
                        MAX_ATTRIBUTES,
                    )
                    await self._reply(writer)
                    return
                continue
            if not lines:  # an empty line with no request: nothing to answer
                continue
            self.handle(lines)
            lines = []
            if not await self._reply(writer):
                return

    def handle(self, lines: list[bytes]) -> None:
        """Record the facts of one complete request; never raises."""
        try:
            found = facts_from_request(parse_request(lines))
        except Exception:
            log.exception("policy request not understood (ignored)")
            return
        if found is None:
            log.info("policy request without client_address/client_port (ignored)")
            return
        address, port, facts = found
        self.table.record(address, port, facts)
        log.debug(
            "policy: client=%s port=%s fingerprint=%s protocol=%s",
            address,
            port,
            facts.fingerprint or "-",
            facts.protocol or "-",
        )

    async def _reply(self, writer: asyncio.StreamWriter) -> bool:
        self.requests += 1
        try:
            writer.write(DUNNO)
            await writer.drain()
        except OSError as exc:
            log.info("policy client went away: %s", exc)
            return False
        return True


class PolicyServiceThread(ServiceThread):
    """Run a :class:`PolicyService` in its own thread with its own event loop."""

    def __init__(self, service: PolicyService) -> None:
        self.service = service
        self._listening: list[socket.socket] = []
        super().__init__(self._serve_policy, name="policy-service", log=log, join_timeout=5)

    def release_in_child(self) -> None:
        """In a forked worker: this thread's descriptors (the listening sockets, Postfix's
        connections, the loop's epoll and wake-up sockets) are the parent's. Held open by a
        worker, a connection the parent closes would never reach Postfix as closed. Each is
        pointed at /dev/null rather than closed: the number stays taken, so a later close by the
        worker's copy of its Python object cannot hit a descriptor the worker opened since."""
        fds = _loop_descriptors(self._loop)
        fds.update(sock.fileno() for sock in self._listening)
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            for fd in sorted(fd for fd in fds if fd > 2 and fd != devnull):
                with contextlib.suppress(OSError):
                    os.dup2(devnull, fd)
        finally:
            os.close(devnull)

    async def _serve_policy(self, stop: asyncio.Event, ready: Callable[[], None]) -> None:
        server = await self.service.listen()
        self._listening = list(server.sockets)
        ready()
        try:
            await stop.wait()
        finally:
            server.close()
            await self.service.close()


def _loop_descriptors(loop: asyncio.AbstractEventLoop | None) -> set[int]:
    """The descriptors a selector event loop holds: its epoll, what is registered with it, its
    transports (connections) and its self-pipe. CPython's internals, read defensively."""
    if loop is None:
        return set()
    fds: set[int] = set()
    selector = getattr(loop, "_selector", None)
    if isinstance(selector, selectors.BaseSelector):
        with contextlib.suppress(RuntimeError, AttributeError):
            fds.update(key.fd for key in selector.get_map().values())
        fileno = getattr(selector, "fileno", None)
        if callable(fileno):
            fds.add(int(fileno()))
    fds.update(int(fd) for fd in getattr(loop, "_transports", {}))
    for name in ("_ssock", "_csock"):
        sock = getattr(loop, name, None)
        if isinstance(sock, socket.socket):
            fds.add(sock.fileno())
    return {fd for fd in fds if fd >= 0}
