"""The chain fetcher: STARTTLS to the client's own host, bind by fingerprint, bounded, cached."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from support.pki import Issued, TestPki, write_bundle
from support.smtp_tls_server import StartTlsServer

from mtls_milter.config import ChainFetchConfig
from mtls_milter.core.certs import fingerprint_sha256
from mtls_milter.core.evidence import CertPresence, TlsSession
from mtls_milter.inbound.chain_fetch import ChainFetcher, FetchOutcome, fetch_allowed
from mtls_milter.net.starttls import StartTlsResult

CONFIG = ChainFetchConfig(allow_private=True, timeout=1.0)


def session_for(issued: Issued) -> TlsSession:
    return TlsSession(
        tls=True, certificate=CertPresence.PRESENTED, fingerprint=fingerprint_sha256(issued.cert)
    )


def md5_session_for(issued: Issued) -> TlsSession:
    md5 = issued.cert.fingerprint(hashes.MD5()).hex(":").upper()
    return TlsSession(tls=True, certificate=CertPresence.PRESENTED, fingerprint_md5=md5)


def result(future: Future[FetchOutcome], timeout: float = 10.0) -> FetchOutcome:
    return future.result(timeout)


@pytest.fixture
def fetcher() -> Iterator[ChainFetcher]:
    f = ChainFetcher(ehlo_name="mx.receiver.test")
    yield f
    f.shutdown()


@pytest.fixture
def served(pki: TestPki) -> Iterator[StartTlsServer]:
    leaf = pki.leaves["server"]
    with StartTlsServer("127.0.0.1", chain=leaf.chain_path, key=leaf.key_path) as server:
        yield server


def test_fetch_binds_and_caches(
    fetcher: ChainFetcher, served: StartTlsServer, pki: TestPki
) -> None:
    session = session_for(pki.leaves["server"])
    config = replace(CONFIG, port=served.port)
    outcome = result(fetcher.start(session, "127.0.0.1", "out.sender.test", config))
    assert outcome.binding == "sha256"
    assert [fingerprint_sha256(c) for c in outcome.chain] == [
        fingerprint_sha256(c) for c in pki.leaves["server"].chain
    ]
    assert served.last_sni == "out.sender.test"
    again = result(fetcher.start(session, "127.0.0.1", "out.sender.test", config))
    assert again.cached and again.chain == outcome.chain
    assert fetcher.fetches == 1
    assert fetcher.cached(session) == outcome.chain


def test_md5_binding_only_when_nothing_else(
    fetcher: ChainFetcher, served: StartTlsServer, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    session = md5_session_for(pki.leaves["server"])
    outcome = result(fetcher.start(session, "127.0.0.1", "", replace(CONFIG, port=served.port)))
    assert outcome.binding == "md5" and outcome.chain
    assert "bound by MD5 only" in caplog.text


def test_different_certificate_is_refused_and_remembered(
    fetcher: ChainFetcher, served: StartTlsServer, pki: TestPki
) -> None:
    session = session_for(pki.leaves["client"])  # the host serves "server", not "client"
    config = replace(CONFIG, port=served.port)
    outcome = result(fetcher.start(session, "127.0.0.1", "out.sender.test", config))
    assert not outcome.chain
    assert "different certificate" in outcome.detail
    again = result(fetcher.start(session, "127.0.0.1", "out.sender.test", config))
    assert "recent failure" in again.detail
    assert fetcher.fetches == 1
    assert fetcher.cached(session) is None


def test_private_addresses_need_allow_private(fetcher: ChainFetcher, pki: TestPki) -> None:
    session = session_for(pki.leaves["server"])
    outcome = result(fetcher.start(session, "127.0.0.1", "", ChainFetchConfig()))
    assert "not global" in outcome.detail
    assert fetcher.fetches == 0


@pytest.mark.parametrize(
    ("address", "private", "allowed"),
    [
        ("192.0.2.1", False, False),  # documentation range: not global
        ("8.8.8.8", False, True),
        ("10.1.2.3", False, False),
        ("10.1.2.3", True, True),
        ("::1", False, False),
        ("::ffff:8.8.8.8", False, True),
        ("2001:4860::8888", False, True),
        ("0.0.0.0", True, False),
        ("224.0.0.1", True, False),
        ("not-an-ip", True, False),
        ("", True, False),
    ],
)
def test_fetch_allowed(address: str, private: bool, allowed: bool) -> None:
    assert fetch_allowed(address, private) is allowed


def test_disabled_and_no_fingerprint(fetcher: ChainFetcher) -> None:
    fp = "AA:" * 31 + "AA"
    session = TlsSession(tls=True, certificate=CertPresence.PRESENTED, fingerprint=fp)
    off = result(fetcher.start(session, "8.8.8.8", "", replace(CONFIG, enabled=False)))
    assert off.detail == "chain fetch disabled"
    none = result(fetcher.start(TlsSession(tls=True), "8.8.8.8", "", CONFIG))
    assert "no certificate fingerprint" in none.detail
    assert fetcher.fetches == 0


# -- hostile or broken peers: bounded time, no chain, a clear detail ------------------------------


def _bounded(fetcher: ChainFetcher, pki: TestPki, port: int, timeout: float = 1.0) -> FetchOutcome:
    session = session_for(pki.leaves["server"])
    config = replace(CONFIG, port=port, timeout=timeout)
    started = time.monotonic()
    outcome = result(fetcher.start(session, "127.0.0.1", "out.sender.test", config))
    assert time.monotonic() - started < timeout + 1.0
    assert not outcome.chain
    assert outcome.detail.startswith("chain fetch failed: "), outcome.detail
    return outcome


def test_hanging_host(fetcher: ChainFetcher, pki: TestPki) -> None:
    with StartTlsServer("127.0.0.1", hang=True, hang_seconds=10) as server:
        outcome = _bounded(fetcher, pki, server.port, timeout=0.5)
    assert "timed out after 0.5 s (greeting)" in outcome.detail


def test_refused_connection(fetcher: ChainFetcher, pki: TestPki) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens
    assert "connect failed" in _bounded(fetcher, pki, port).detail


def test_no_starttls(fetcher: ChainFetcher, pki: TestPki) -> None:
    with StartTlsServer("127.0.0.1", chain=None) as server:
        assert "STARTTLS not offered" in _bounded(fetcher, pki, server.port).detail


class _RawServer:
    """Accepts connections and sends ``payload`` (bytes, repeated ``repeat`` times)."""

    def __init__(self, payload: bytes, repeat: int = 1) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.payload, self.repeat = payload, repeat
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                for _ in range(self.repeat):
                    conn.sendall(self.payload)
                time.sleep(0.5)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    ("payload", "repeat", "expected"),
    [
        pytest.param(b"\x16\x03\x01\x00\xff garbage\r\n", 1, "not an SMTP reply", id="garbage"),
        pytest.param(b"x" * 4096, 100, "line too long", id="endless-line"),
        pytest.param(b"220-more\r\n", 500, "too many lines", id="endless-reply"),
        pytest.param(b"554 go away\r\n", 1, "greeting 554", id="refusing"),
    ],
)
def test_garbage_peers(
    fetcher: ChainFetcher, pki: TestPki, payload: bytes, repeat: int, expected: str
) -> None:
    server = _RawServer(payload, repeat)
    try:
        assert expected in _bounded(fetcher, pki, server.port).detail
    finally:
        server.close()


def test_sixty_certificate_chain_is_refused(
    fetcher: ChainFetcher, pki: TestPki, tmp_path: Path
) -> None:
    leaf = pki.leaves["server"]
    bundle = write_bundle(tmp_path / "long.pem", leaf, *([pki.intermediate] * 59))
    with StartTlsServer("127.0.0.1", chain=bundle, key=leaf.key_path) as server:
        outcome = _bounded(fetcher, pki, server.port, timeout=2.0)
    assert "60 certificates served" in outcome.detail


# -- concurrency -----------------------------------------------------------------------------------


class _SlowFake:
    """A fetch function: addresses in ``slow`` block until released; others answer at once."""

    def __init__(self, chain: list[Any], slow: set[str]) -> None:
        self.chain, self.slow = chain, slow
        self.release = threading.Event()

    def __call__(self, address: str, port: int, sni: str, **kwargs: Any) -> StartTlsResult:
        if address in self.slow:
            self.release.wait(kwargs["timeout"])
            return StartTlsResult(connected=True, error="timed out after 1 s (greeting)")
        return StartTlsResult(connected=True, starttls=True, chain=list(self.chain))


def test_slow_peer_does_not_delay_others(pki: TestPki) -> None:
    leaf = pki.leaves["server"]
    fake = _SlowFake(list(leaf.chain), {"198.51.100.1"})
    fetcher = ChainFetcher(fetch=fake)
    try:
        slow = fetcher.start(session_for(leaf), "198.51.100.1", "", CONFIG)
        started = time.monotonic()
        fast = result(fetcher.start(session_for(leaf), "203.0.113.7", "", CONFIG))
        assert fast.chain and time.monotonic() - started < 0.5
        assert not slow.done()
        fake.release.set()
        assert not result(slow).chain
    finally:
        fake.release.set()
        fetcher.shutdown()


def test_concurrency_limit_and_inflight_sharing(pki: TestPki) -> None:
    leaf, other = pki.leaves["server"], pki.leaves["client"]
    fake = _SlowFake(list(leaf.chain), {"198.51.100.1", "198.51.100.2"})
    fetcher = ChainFetcher(fetch=fake)
    config = replace(CONFIG, max_concurrent=1)
    try:
        first = fetcher.start(session_for(leaf), "198.51.100.1", "", config)
        shared = fetcher.start(session_for(leaf), "198.51.100.1", "", config)
        assert shared is first  # the same fetch, not a second connection
        over = result(fetcher.start(session_for(other), "198.51.100.2", "", config))
        assert "already running" in over.detail
        assert fetcher.fetches == 1
    finally:
        fake.release.set()
        fetcher.shutdown()


# -- metrics ------------------------------------------------------------------------------------


def _fetch_counts() -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    from mtls_milter.runtime import metrics

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        for sample in family.samples:
            if sample.name == "mtls_milter_chain_fetches_total":
                counts[sample.labels["outcome"]] = sample.value
            if sample.name == "mtls_milter_chain_fetch_seconds_count":
                counts["seconds_count"] = sample.value
    return counts


def test_outcomes_are_counted_and_timed(
    fetcher: ChainFetcher, served: StartTlsServer, pki: TestPki
) -> None:
    from mtls_milter.runtime import metrics

    metrics.enable()
    before = _fetch_counts()
    config = replace(CONFIG, port=served.port)
    result(fetcher.start(session_for(pki.leaves["server"]), "127.0.0.1", "", config))  # ok
    result(fetcher.start(session_for(pki.leaves["server"]), "127.0.0.1", "", config))  # cached
    wrong = session_for(pki.leaves["client"])
    result(fetcher.start(wrong, "127.0.0.1", "", config))  # refused, remembered
    result(fetcher.start(wrong, "127.0.0.1", "", config))  # skipped: recent failure
    result(fetcher.start(wrong, "127.0.0.1", "", ChainFetchConfig()))  # skipped: not global
    fresh = ChainFetcher(ehlo_name="mx.receiver.test")  # nothing cached
    with StartTlsServer("127.0.0.1", hang=True, hang_seconds=10) as server:
        _bounded(fresh, pki, server.port, timeout=0.3)  # timeout
    fresh.shutdown()
    after = _fetch_counts()

    def moved(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert {k: moved(k) for k in ("ok", "refused", "skipped", "timeout", "failed")} == {
        "ok": 1,
        "refused": 1,
        "skipped": 2,
        "timeout": 1,
        "failed": 0,
    }
    assert moved("seconds_count") == 3  # the fetches that talked to a host
