"""Core engine figures: chain validation, warm and cold evaluation, with same-run baselines.

Run: ``.venv/bin/python bench/bench_core.py`` (or ``make bench``). Prints figures only; the
numbers belong in docs/performance.md, never in assertions.

Baselines measured in the same run:
- chain validation: a bare cryptography ``build_client_verifier().verify()`` call;
- cold evaluation: a bare dnspython query of the same Client MX name at the same server.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import benchpath  # noqa: F401  (tests/ on sys.path for support.*)
import dns.message
import dns.query
import dns.rdatatype
from cryptography.x509.verification import PolicyBuilder, Store
from support.dnsserver import TestDnsServer
from support.pki import build_test_pki

from mtls_milter.config import Config, DnsConfig
from mtls_milter.core.certs import TrustAnchors, parse_certificates
from mtls_milter.core.chain import ChainValidator
from mtls_milter.core.clock import FixedClock
from mtls_milter.core.evaluate import Result, Transaction, evaluate
from mtls_milter.core.evidence import chain_evidence
from mtls_milter.net.dns import DnsResolver


def timings(action: Callable[[], object], count: int) -> list[float]:
    """Per-call wall times in microseconds."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def describe(label: str, samples: list[float], baseline: list[float] | None = None) -> None:
    ordered = sorted(samples)
    median = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    line = f"{label:<52} median {median:9.1f} µs   p99 {p99:9.1f} µs   {1e6 / median:10.0f}/s"
    if baseline:
        line += f"   ratio vs baseline {median / statistics.median(baseline):5.2f}x"
    print(line)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, TestDnsServer() as server:
        pki = build_test_pki(Path(tmp))
        server.add("sender.test", 265, "10 out.sender.test.", ttl=3600)
        now = FixedClock(datetime.now(UTC))
        chain = parse_certificates(pki.leaves["server"].chain_path.read_bytes())
        anchors = TrustAnchors((pki.root.cert,), ("bench root",))
        evidence = chain_evidence(chain)
        transaction = Transaction("<alice@sender.test>", "out.sender.test")
        config = Config(dns=DnsConfig(nameservers=(server.nameserver,)))

        print("== chain validation (leaf + intermediate, EC P-256)")
        store = Store([pki.root.cert])

        # The stock client policy rejects a serverAuth-only leaf early, which would flatter
        # the baseline: it validates the same-shaped chain whose leaf has both EKUs.
        both = parse_certificates(pki.leaves["both"].chain_path.read_bytes())

        def bare_verify() -> None:
            verifier = PolicyBuilder().store(store).time(now.now()).build_client_verifier()
            verifier.verify(both[0], list(both[1:]))

        baseline_verify = timings(bare_verify, 500)
        describe("baseline: bare cryptography client verify", baseline_verify)
        uncached = ChainValidator(anchors, cache_size=0)
        describe(
            "validate_client, no cache",
            timings(lambda: uncached.validate_client(chain, now.now()), 500),
            baseline_verify,
        )
        cached = ChainValidator(anchors)
        cached.validate_client(chain, now.now())
        describe(
            "validate_client, repeated chain (cached verdict)",
            timings(lambda: cached.validate_client(chain, now.now()), 5000),
        )

        print("== evaluation, warm DNS cache")
        warm = DnsResolver([server.nameserver], timeout=1.0)
        assert warm.client_mx("sender.test", 5).hosts == ("out.sender.test",)

        def evaluate_with(validator: ChainValidator, resolver: DnsResolver) -> Callable[[], None]:
            def run() -> None:
                verdict = evaluate(transaction, evidence, config, resolver, validator, now)
                assert verdict.result is Result.PASS, verdict

            return run

        describe(
            "evaluate, warm DNS, chain validated each time",
            timings(evaluate_with(uncached, warm), 2000),
        )
        describe(
            "evaluate, warm DNS, cached chain verdict",
            timings(evaluate_with(cached, warm), 10000),
        )

        print("== evaluation, cold (no DNS cache) against a loopback DNS server")
        query = dns.message.make_query("sender.test", dns.rdatatype.RdataType.make(265))
        host, port = server.address

        def bare_query() -> None:
            dns.query.udp(query, host, port=port, timeout=1.0)

        baseline_dns = timings(bare_query, 300)
        describe("baseline: bare dnspython UDP query", baseline_dns)
        cold = DnsResolver([server.nameserver], timeout=1.0, cache_size=0)
        describe(
            "evaluate, cold DNS, cached chain verdict",
            timings(evaluate_with(cached, cold), 300),
            baseline_dns,
        )
        describe(
            "evaluate, cold DNS, chain validated each time",
            timings(evaluate_with(uncached, cold), 300),
            baseline_dns,
        )


if __name__ == "__main__":
    main()
