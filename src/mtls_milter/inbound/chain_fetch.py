"""Chain evidence (docs/evidence.md): fetch the certificate chain a client's own host serves.

The MTA tells us the fingerprint of the client's leaf (Sendmail ``{cert_fp}``/``{cert_md5}``,
Postfix through the policy service) but never the chain or the SANs. A sending host normally
serves the same certificate on its own SMTP port, so we connect to the client's address, do
EHLO + STARTTLS with SNI and capture the served chain (no trust decision in the handshake). The
chain counts only if its leaf has the session's fingerprint (:func:`chain_binding`); the core
then validates it with our policy and takes the SAN names.

Bounded everywhere: one deadline per fetch (``[chain_fetch] timeout``), at most
``max_concurrent`` fetches in flight (beyond that a message goes without), a positive cache by
leaf fingerprint, a negative cache by address, and fetches run in their own threads so a slow
peer only ever delays its own message, by at most the timeout.

With metrics on, each fetch is counted by outcome (ok, failed, timeout, refused: the host served
another certificate or too long a chain; skipped: wanted but not done) and timed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mtls_milter.config import ChainFetchConfig
from mtls_milter.core.certs import fingerprint_sha256
from mtls_milter.core.evidence import TlsSession, chain_binding
from mtls_milter.core.lru import TimedLRU
from mtls_milter.net.starttls import StartTlsResult, starttls_chain
from mtls_milter.runtime import metrics

__all__ = ["MAX_CHAIN", "ChainFetcher", "FetchOutcome", "fetch_allowed"]

log = logging.getLogger("mtls_milter.chain_fetch")

MAX_CHAIN = 10  # certificates; a longer served chain is refused (real ones have 2-4)
CACHE_SIZE = 10_000  # chains kept
NEGATIVE_SIZE = 10_000  # failed addresses kept
MAX_THREADS = 1024  # upper bound of the pool; [chain_fetch] max_concurrent gates the use

Fetch = Callable[..., StartTlsResult]


@dataclass(frozen=True, slots=True)
class FetchOutcome:
    """The chain bound to the session (``()`` when none) and a line for the log."""

    chain: tuple[x509.Certificate, ...] = ()
    detail: str = ""
    binding: str = ""  # "sha256", "md5" or ""
    cached: bool = False
    fetched: bool = False  # a connection was attempted for it


def fetch_allowed(address: str, allow_private: bool) -> bool:
    """False for addresses we must not connect to: unparsable, or non-global unless allowed."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0].strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return False
    return allow_private or ip.is_global


class ChainFetcher:
    """Fetches, binds and caches client chains; one instance serves the whole daemon."""

    def __init__(
        self,
        *,
        fetch: Fetch = starttls_chain,
        clock: Callable[[], float] = time.monotonic,
        ehlo_name: str = "",
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._ehlo_name = ehlo_name or _local_name()
        self._lock = threading.Lock()
        # leaf SHA-256 (and "md5:" + MD5) -> chain; address or address|fingerprint -> reason
        self._chains: TimedLRU[str, tuple[x509.Certificate, ...]] = TimedLRU(cache_size)
        self._failed: TimedLRU[str, str] = TimedLRU(NEGATIVE_SIZE)
        self._inflight: dict[tuple[str, int, str], Future[FetchOutcome]] = {}
        self._executor = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="chain-fetch")
        self.fetches = 0  # connections attempted (for tests and benchmarks)

    # -- cache -------------------------------------------------------------------------------

    def cached(self, session: TlsSession) -> tuple[x509.Certificate, ...] | None:
        """A chain seen before for this session's leaf fingerprint, or None."""
        key = _cache_key(session)
        if not key:
            return None
        with self._lock:
            chain = self._chains.get_at(key, self._clock())
        return chain

    # -- fetching ------------------------------------------------------------------------------

    def start(
        self,
        session: TlsSession,
        address: str,
        server_name: str,
        config: ChainFetchConfig,
    ) -> Future[FetchOutcome]:
        """A future of the outcome; done at once when cached or skipped. Never raises."""
        chain = self.cached(session)
        if chain is not None:
            return _done(FetchOutcome(chain, "chain cache hit", _binding(session), cached=True))
        key = _cache_key(session)
        if not config.enabled:
            return _done(FetchOutcome(detail="chain fetch disabled"))
        if not key:
            return _done(FetchOutcome(detail="no certificate fingerprint for this session"))
        if not fetch_allowed(address, config.allow_private):
            _record("skipped")
            return _done(FetchOutcome(detail=f"chain fetch not done: {address} is not global"))
        now = self._clock()
        inflight_key = (address, config.port, key)
        with self._lock:
            reason = self._failed.get_at(address, now) or self._failed.get_at(
                f"{address}|{key}", now
            )
            if reason is not None:
                _record("skipped")
                return _done(FetchOutcome(detail=f"chain fetch skipped (recent failure: {reason})"))
            running = self._inflight.get(inflight_key)
            if running is not None:
                return running
            if len(self._inflight) >= config.max_concurrent:
                detail = f"chain fetch skipped: {config.max_concurrent} fetches already running"
                log.warning("%s (client %s)", detail, address)
                _record("skipped")
                return _done(FetchOutcome(detail=detail))
            future: Future[FetchOutcome] = Future()
            self._inflight[inflight_key] = future
            self.fetches += 1
        try:
            self._executor.submit(self._run, future, inflight_key, session, server_name, config)
        except RuntimeError:  # shutting down
            with self._lock:
                self._inflight.pop(inflight_key, None)
            future.set_result(FetchOutcome(detail="chain fetch unavailable (shutting down)"))
        return future

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(
        self,
        future: Future[FetchOutcome],
        inflight_key: tuple[str, int, str],
        session: TlsSession,
        server_name: str,
        config: ChainFetchConfig,
    ) -> None:
        address, port, key = inflight_key
        try:
            outcome = self._fetch_and_bind(session, address, port, server_name, config, key)
        except Exception as exc:  # never let a peer's behaviour escape the worker
            log.exception("chain fetch from %s:%d failed", address, port)
            _record("failed")
            outcome = FetchOutcome(detail=f"chain fetch failed: {type(exc).__name__}", fetched=True)
        finally:
            with self._lock:
                self._inflight.pop(inflight_key, None)
        future.set_result(outcome)

    def _fetch_and_bind(
        self,
        session: TlsSession,
        address: str,
        port: int,
        server_name: str,
        config: ChainFetchConfig,
        key: str,
    ) -> FetchOutcome:
        started = self._clock()
        result = self._fetch(
            address, port, _sni(server_name), timeout=config.timeout, ehlo_name=self._ehlo_name
        )
        elapsed = self._clock() - started
        where = f"{address}:{port}"
        if result.error or not result.chain:
            reason = result.error or "no certificate served"
            _record("timeout" if reason.startswith("timed out") else "failed", elapsed)
            return self._failure(address, reason, config, f"from {where} ({elapsed:.2f} s)")
        chain = tuple(result.chain)
        if len(chain) > MAX_CHAIN:
            reason = f"{len(chain)} certificates served (more than {MAX_CHAIN})"
            _record("refused", elapsed)
            return self._failure(address, reason, config, f"from {where}")
        binding = chain_binding(session, chain[0])
        if not binding:
            _record("refused", elapsed)
            reason = "the host serves a different certificate"
            served = fingerprint_sha256(chain[0])
            log.info(
                "chain fetch from %s: %s (served leaf %s, session %s); no chain evidence",
                where,
                reason,
                served,
                session.fingerprint or f"MD5 {session.fingerprint_md5}",
            )
            with self._lock:
                if config.negative_ttl:
                    self._failed.put_until(
                        f"{address}|{key}", reason, self._clock() + config.negative_ttl
                    )
            return FetchOutcome(detail=f"chain refused: {reason}", fetched=True)
        with self._lock:
            if config.cache_ttl:
                expires = self._clock() + config.cache_ttl
                self._chains.put_until(fingerprint_sha256(chain[0]), chain, expires)
                self._chains.put_until("md5:" + _md5(chain[0]), chain, expires)
        _record("ok", elapsed)
        note = (
            " (bound by MD5 only: the MTA sent no SHA-256 fingerprint)" if binding == "md5" else ""
        )
        log.info(
            "chain fetch from %s: %d certificates, leaf matches the session%s (%.2f s)",
            where,
            len(chain),
            note,
            elapsed,
        )
        return FetchOutcome(chain, f"chain fetched from {where}{note}", binding, fetched=True)

    def _failure(
        self, address: str, reason: str, config: ChainFetchConfig, where: str
    ) -> FetchOutcome:
        log.info("chain fetch %s: %s; no chain evidence", where, reason)
        with self._lock:
            if config.negative_ttl:
                self._failed.put_until(address, reason, self._clock() + config.negative_ttl)
        return FetchOutcome(detail=f"chain fetch failed: {reason}", fetched=True)


def _record(outcome: str, seconds: float | None = None) -> None:
    """Count a fetch (ok|failed|timeout|refused) or a fetch wanted but not done (skipped)."""
    m = metrics.current()
    if m is None:
        return
    m.chain_fetches.labels(outcome).inc()
    if seconds is not None:
        m.chain_fetch_seconds.observe(seconds)


def _done(outcome: FetchOutcome) -> Future[FetchOutcome]:
    future: Future[FetchOutcome] = Future()
    future.set_result(outcome)
    return future


def _cache_key(session: TlsSession) -> str:
    if session.fingerprint:
        return session.fingerprint
    if session.fingerprint_md5:
        return "md5:" + session.fingerprint_md5
    return ""


def _binding(session: TlsSession) -> str:
    return "sha256" if session.fingerprint else "md5"


def _md5(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.MD5()).hex(":").upper()


def _sni(name: str) -> str:
    """A name usable as SNI (a host name with a dot, ASCII), else "" (no SNI)."""
    name = name.strip().rstrip(".").lower()
    if not name or "." not in name or len(name) > 253 or name.startswith("["):
        return ""
    if not all(c.isascii() and (c.isalnum() or c in "-.") for c in name):
        return ""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return ""  # an address literal is not a server name


def _local_name() -> str:
    name = socket.gethostname()  # not getfqdn(): a reverse lookup could stall start-up
    return name if "." in name else "mtls-milter.invalid"
