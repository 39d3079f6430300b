"""Cold-DNS figures: bursts of mail from domains whose name servers are slow, through the milter
session (``MilterSession``: MAIL FROM starts the Client MX lookup, end of message waits for it).

Run: ``.venv/bin/python bench/bench_dns_cold.py`` (or via ``bench/run_all.py``). Prints figures
only, never asserts. Each scenario runs with the product's :class:`LookupPool` and, as the
baseline in the same run, with the fixed ``ThreadPoolExecutor(32)`` the daemons used before
(whose queue wait counted against the message's DNS budget).

1. 72 messages at once from 72 distinct cold domains, every Client MX answer 1.8 s late, DNS
   budget 5 s: how many verdicts are pass and how many temperror (target: 0 temperror).
2. Slow domains (answers 4 s late) in flight while other mail arrives: how much later a message
   from a fast cold domain and one from a cached domain get their verdict than with no slow
   domain in flight (target: < 50 ms), with 1 slow domain and with 40 (more than 32 threads).
3. The hand-off cost of a lookup: submit to result for a call that returns at once.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import benchpath  # noqa: F401  (tests/ on sys.path for support.*)
from support.dnsserver import TestDnsServer
from support.pki import TestPki, build_test_pki

from mtls_milter.config import config_from_mapping
from mtls_milter.engine import Engine
from mtls_milter.inbound.session import EngineHolder, MilterSession, Outcome
from mtls_milter.net.lookup_pool import LookupPool

CMX = 265
OLD_POOL_THREADS = 32  # what inbound/daemon.py and inbound/asyncio_daemon.py used
POSTFIX_TRUSTED = {
    "{tls_version}": "TLSv1.3",
    "{cert_subject}": "out.sender.test",
    "{cert_issuer}": "Test Intermediate CA",
}
Pools = dict[str, Callable[[], Executor]]
POOLS: Pools = {
    "LookupPool (new)": LookupPool,
    "ThreadPoolExecutor(32) (old)": lambda: ThreadPoolExecutor(OLD_POOL_THREADS),
}


@contextmanager
def pool_of(make: Callable[[], Executor]) -> Iterator[Executor]:
    pool = make()
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def holder_for(server: TestDnsServer, pki: TestPki, timeout: float) -> EngineHolder:
    raw = {
        "milter": {"authserv_id": "mx.receiver.test"},
        "dns": {"nameservers": [server.nameserver], "timeout": timeout, "budget": 5.0},
        "tls": {"trust": [str(pki.root_path)]},
    }
    return EngineHolder(Engine.from_config(config_from_mapping(raw)))


def start_message(holder: EngineHolder, pool: Executor, domain: str, port: int) -> MilterSession:
    session = MilterSession(holder, pool)
    session.connect("192.0.2.7", str(port))
    session.helo("out.sender.test", POSTFIX_TRUSTED)
    session.mail(f"<a@{domain}>", POSTFIX_TRUSTED)
    return session


def result_of(outcome: Outcome) -> str:
    for change in outcome.headers:
        if "mtls=" in change.value:
            return change.value.split("mtls=", 1)[1].split()[0]
    return "none"


def burst(server: TestDnsServer, pki: TestPki, tag: str) -> None:
    """Scenario 1, for each pool."""
    print("72 cold domains at once, Client MX answers 1.8 s late, budget 5 s:")
    for round_number, (label, make) in enumerate(POOLS.items()):
        domains = [f"{tag}{round_number}-{i}.test" for i in range(72)]
        for domain in domains:
            server.add(domain, CMX, "10 out.sender.test.")
            server.delay(domain, 1.8)
        holder = holder_for(server, pki, timeout=2.0)
        with pool_of(make) as pool:
            started = time.monotonic()
            sessions = [start_message(holder, pool, d, 1000 + i) for i, d in enumerate(domains)]
            results = [result_of(session.eom({})) for session in sessions]
            elapsed = time.monotonic() - started
        counts = {r: results.count(r) for r in sorted(set(results))}
        print(f"  {label:30} {counts}  all verdicts after {elapsed:.2f} s")


def verdict_ms(holder: EngineHolder, pool: Executor, domain: str) -> tuple[float, str]:
    """Milliseconds from MAIL FROM to the verdict of one message, and the result."""
    started = time.perf_counter()
    result = result_of(start_message(holder, pool, domain, 2000).eom({}))
    return (time.perf_counter() - started) * 1000, result


class Latency:
    """Median and worst verdict time of a series, and its results other than pass."""

    def __init__(self, samples: list[tuple[float, str]]) -> None:
        times = [ms for ms, _ in samples]
        self.median, self.worst = statistics.median(times), max(times)
        self.failed = [result for _, result in samples if result != "pass"]

    def versus(self, base: Latency) -> str:
        text = (
            f"median {self.median - base.median:+.2f} ms, worst {self.worst - base.worst:+.2f} ms"
        )
        if self.failed:
            text += f", {len(self.failed)} not pass: {sorted(set(self.failed))}"
        return text


def latencies(holder: EngineHolder, pool: Executor, tag: str, rounds: int) -> tuple[Latency, ...]:
    """Verdict times for fast cold domains and for a cached one."""
    cold = [verdict_ms(holder, pool, f"{tag}-fast{i}.test") for i in range(rounds)]
    warm = [verdict_ms(holder, pool, "cached.test") for _ in range(rounds)]
    return Latency(cold), Latency(warm)


def slow_neighbours(server: TestDnsServer, pki: TestPki, tag: str) -> None:
    """Scenario 2, for each pool."""
    print("Verdict delay for other mail while slow domains (4 s answers) are in flight,")
    print("against the same pool with nothing in flight (fast cold domain / cached domain):")
    server.add("cached.test", CMX, "10 out.sender.test.")
    rounds = 15
    for number, (label, make) in enumerate(POOLS.items()):
        holder = holder_for(server, pki, timeout=5.0)
        for kind in ("base", "1", "40"):
            for i in range(rounds):
                server.add(f"{tag}{number}-{kind}-fast{i}.test", CMX, "10 out.sender.test.")
        with pool_of(make) as pool:
            verdict_ms(holder, pool, "cached.test")  # warm the cache
            base = latencies(holder, pool, f"{tag}{number}-base", rounds)
            print(
                f"  {label}: nothing in flight: fast cold median {base[0].median:.2f} ms, "
                f"cached median {base[1].median:.2f} ms"
            )
            for slow_count in (1, 40):
                names = [f"{tag}{number}-slow{slow_count}-{i}.test" for i in range(slow_count)]
                for name in names:
                    server.delay(name, 4.0)
                for i, name in enumerate(names):  # their lookups end on their own
                    start_message(holder, pool, name, 3000 + i)
                time.sleep(0.05)  # the slow queries are out
                cold, warm = latencies(holder, pool, f"{tag}{number}-{slow_count}", rounds)
                print(f"    {slow_count:2} slow in flight: fast cold {cold.versus(base[0])}")
                print(f"    {'':16} cached     {warm.versus(base[1])}")
        time.sleep(4.2)  # let the slow answers drain before the next pool


def hand_off() -> None:
    """Scenario 3: submit → result for a call that returns at once (µs; rounds interleaved,
    the best round's median of 2000)."""
    print("Hand-off, submit to result of a call that returns at once:")
    best: dict[str, float] = {}
    with pool_of(LookupPool) as new, pool_of(POOLS["ThreadPoolExecutor(32) (old)"]) as old:
        for _ in range(3):
            for label, pool in (("LookupPool (new)", new), ("ThreadPoolExecutor(32) (old)", old)):
                pool.submit(int).result()
                samples = []
                for _ in range(2000):
                    started = time.perf_counter()
                    pool.submit(int).result()
                    samples.append((time.perf_counter() - started) * 1e6)
                median = statistics.median(samples)
                best[label] = min(best.get(label, median), median)
    for label, median in best.items():
        print(f"  {label:30} {median:.1f} µs (an idle thread takes it)")
    cold = []
    for _ in range(200):
        pool = LookupPool(idle_seconds=0.0)
        started = time.perf_counter()
        pool.submit(int).result()
        cold.append((time.perf_counter() - started) * 1e6)
        pool.shutdown(wait=False)
    print(f"  {'LookupPool, new thread':30} {statistics.median(cold):.1f} µs")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, TestDnsServer() as server:
        pki = build_test_pki(Path(tmp) / "pki")
        burst(server, pki, "burst")
        slow_neighbours(server, pki, "n")
        hand_off()


if __name__ == "__main__":
    main()
