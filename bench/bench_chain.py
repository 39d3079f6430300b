"""Chain evidence figures (docs/evidence.md): cost of a cached chain verdict, slow-peer isolation.

Run: ``.venv/bin/python bench/bench_chain.py``. Prints figures only (for docs/performance.md).

1. Per message, through the real milter callbacks (a fake libmilter context, warm DNS cache):
   baseline = Postfix-trusted CN (``evidence=mta``, no chain work) versus Postfix-untrusted with
   the fingerprint in the policy table and the chain in the fetcher's cache (``evidence=chain``:
   table lookup, cache hit, fingerprint binding, path validation from the validator's cache, SAN
   match). Target: the difference ≤ 0.1 ms.
2. Real STARTTLS fetches from a test host on 127.0.0.3 while another "client host" on
   127.0.0.2 accepts and never speaks: the fast fetches' latency with and without the slow one
   in flight. Target: unchanged (the slow fetch only holds its own thread, up to the timeout).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import benchpath  # noqa: F401  (tests/ on sys.path for support.*)
from support.dnsserver import TestDnsServer
from support.pki import build_test_pki
from support.smtp_tls_server import StartTlsServer

from mtls_milter.config import ChainFetchConfig, config_from_mapping
from mtls_milter.core.certs import fingerprint_sha256
from mtls_milter.engine import Engine
from mtls_milter.inbound.chain_fetch import ChainFetcher
from mtls_milter.inbound.milter import EngineHolder, MtlsMilter
from mtls_milter.inbound.policy_service import PolicyFacts, SessionTable
from mtls_milter.inbound.session import MilterSession
from mtls_milter.net.starttls import StartTlsResult

CLIENT = ("93.184.216.34", "41000")


class _Ctx:
    def __init__(self, macros: dict[str, str | None]) -> None:
        self.macros = macros
        self._priv: Any = None
        self.added: list[str] = []

    def getpriv(self) -> Any:
        return self._priv

    def setpriv(self, priv: Any) -> None:
        self._priv = priv

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setsymlist(self, stage: int, macros: str) -> None:
        pass

    def addheader(self, field: str, value: str, idx: int = -1) -> None:
        self.added.append(value)

    def chgheader(self, field: str, idx: int, value: str) -> None:
        pass

    def setreply(self, *args: str) -> None:
        pass


def _message(milter: MtlsMilter, ctx: _Ctx, policy: Callable[[], None] = lambda: None) -> None:
    milter.connect("client", 2, (CLIENT[0], int(CLIENT[1])))
    milter.hello("out.sender.test")
    milter.envfrom_bytes(b"<a@sender.test>")
    policy()  # Postfix's policy request (the fingerprint) comes at RCPT, within this session
    milter.data()
    milter.header_bytes("Subject", b"x")
    milter.eom()


def _per_message(make: Any, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        milter, ctx, policy = make()
        start = time.perf_counter()
        _message(milter, ctx, policy)
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def cached_chain_cost(tmp: Path, server: TestDnsServer) -> None:
    pki = build_test_pki(tmp / "pki")
    leaf = pki.leaves["server"]
    raw = {
        "milter": {"authserv_id": "mx.receiver.test"},
        "dns": {"nameservers": [server.nameserver]},
        "tls": {"trust": [str(pki.root_path)]},
    }
    engine = Engine.from_config(config_from_mapping(raw))
    holder = EngineHolder(engine)
    executor = ThreadPoolExecutor(4)
    sessions = SessionTable()
    facts = PolicyFacts(fingerprint=fingerprint_sha256(leaf.cert))

    def fake(*args: Any, **kwargs: Any) -> StartTlsResult:
        return StartTlsResult(connected=True, starttls=True, chain=list(leaf.chain))

    fetcher = ChainFetcher(fetch=fake)
    trusted = {
        "{tls_version}": "TLSv1.3",
        "{cert_subject}": "out.sender.test",
        "{cert_issuer}": "Test Intermediate CA",
    }
    untrusted: dict[str, str | None] = {"{tls_version}": "TLSv1.3"}

    def mta() -> tuple[MtlsMilter, _Ctx, Callable[[], None]]:
        milter, ctx = MtlsMilter(MilterSession(holder, executor)), _Ctx(dict(trusted))
        milter._setctx(ctx)
        return milter, ctx, lambda: None

    def chain() -> tuple[MtlsMilter, _Ctx, Callable[[], None]]:
        milter = MtlsMilter(MilterSession(holder, executor, sessions=sessions, fetcher=fetcher))
        ctx = _Ctx(dict(untrusted))
        milter._setctx(ctx)
        return milter, ctx, lambda: sessions.record(*CLIENT, facts)

    for make in (mta, chain):  # warm: DNS cache, chain cache, validator cache
        for _ in range(3):
            milter, ctx, policy = make()
            _message(milter, ctx, policy)
        assert "mtls=pass" in ctx.added[-1], ctx.added
    assert "evidence=chain" in ctx.added[-1]
    rounds = 5
    base, with_chain = [], []
    for _ in range(rounds):  # interleaved, so drift hits both alike
        base += _per_message(mta, 400)
        with_chain += _per_message(chain, 400)
    b, c = _median(base), _median(with_chain)
    print(f"per message, evidence=mta (no chain work)         median {b:8.1f} µs")
    print(f"per message, evidence=chain (cached chain)        median {c:8.1f} µs")
    print(f"added by the cached chain verdict                        {c - b:8.1f} µs "
          f"(target ≤ 100 µs)")  # fmt: skip
    fetcher.shutdown()
    executor.shutdown()


def slow_peer_isolation(tmp: Path) -> None:
    pki = build_test_pki(tmp / "pki2")
    leaf = pki.leaves["server"]
    session_fp = fingerprint_sha256(leaf.cert)
    from mtls_milter.core.evidence import CertPresence, TlsSession

    session = TlsSession(tls=True, certificate=CertPresence.PRESENTED, fingerprint=session_fp)
    with (
        StartTlsServer("127.0.0.3", 0, chain=leaf.chain_path, key=leaf.key_path) as fast,
        StartTlsServer("127.0.0.2", fast.port, hang=True, hang_seconds=30) as _slow,
    ):
        config = ChainFetchConfig(
            allow_private=True, port=fast.port, timeout=3.0, cache_ttl=0, negative_ttl=0
        )

        def fast_fetches(fetcher: ChainFetcher, count: int) -> list[float]:
            samples = []
            for _ in range(count):
                start = time.perf_counter()
                outcome = fetcher.start(session, "127.0.0.3", "out.sender.test", config).result(5)
                assert outcome.chain, outcome
                samples.append((time.perf_counter() - start) * 1e3)
            return samples

        fetcher = ChainFetcher(ehlo_name="bench.invalid")
        alone = fast_fetches(fetcher, 50)
        slow_future = fetcher.start(
            replace(session, fingerprint="AA:" * 31 + "AA"), "127.0.0.2", "", config
        )
        start = time.perf_counter()
        during = fast_fetches(fetcher, 50)
        window = time.perf_counter() - start
        still_running = not slow_future.done()
        slow = slow_future.result(10)
        fetcher.shutdown()
    print(f"real fetch from 127.0.0.3, alone                  median {_median(alone):8.2f} ms")
    print(
        f"same, while 127.0.0.2 hangs (3 s budget)          median {_median(during):8.2f} ms   "
        f"(50 fetches in {window:.2f} s; slow fetch still running: {still_running})"
    )
    print(f"the slow fetch ended with: {slow.detail}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, TestDnsServer() as server:
        server.add("sender.test", 265, "10 out.sender.test.", ttl=3600)
        cached_chain_cost(Path(tmp), server)
        slow_peer_isolation(Path(tmp))


if __name__ == "__main__":
    main()
