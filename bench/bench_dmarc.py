"""DMARC figures (docs/performance.md, "DMARC"): per-message CPU cost with warm caches.

Run: ``.venv/bin/python bench/bench_dmarc.py``. Prints figures only.

1. DMARC without DKIM (mtls verdict as the identifier, SPF off): From parsing, the tree walk and
   alignment from the resolver's warm cache. Target ≤ 50 µs per message.
2. One DKIM signature on a 10 kB message: our ``verify_dkim`` (dkimpy through our resolver,
   warm cache) next to dkimpy's own ``dkim.verify`` with a key function that returns the record
   at once, in the same run.
3. DMARC off: what a transport still runs (``our_methods`` for the forged-field removal).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import benchpath  # noqa: F401  (tests/ on sys.path for support.*)
import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from support.dnsserver import TestDnsServer

from mtls_milter.config import config_from_mapping
from mtls_milter.core.clock import SystemClock
from mtls_milter.core.dkim_input import verify_dkim
from mtls_milter.core.dmarc_message import MessageFacts, dmarc_for_message, our_methods
from mtls_milter.core.dmarc_walk import Budget
from mtls_milter.core.evaluate import Result, Verdict
from mtls_milter.net.dns import DnsResolver


def per_call_us(fn: Callable[[], object], seconds: float = 1.0) -> float:
    """The best of five runs of the mean time per call, in microseconds (the machine is shared:
    the best run is the one least disturbed)."""
    fn()  # warm the caches
    runs: list[float] = []
    for _ in range(5):
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / 5:
            fn()
            count += 1
        runs.append((time.perf_counter() - start) / count * 1e6)
    return min(runs)


def main() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    body = (b"x" * 76 + b"\r\n") * 130  # ~10 kB
    message = b"From: A <a@mail.sender.test>\r\nTo: b@receiver.test\r\nSubject: s\r\n\r\n" + body
    signed = bytes(dkim.sign(message, b"sel1", b"sender.test", pem, include_headers=[b"from"]))
    signed += message
    with TestDnsServer() as dns:
        dns.add("_dmarc.sender.test", "TXT", '"v=DMARC1; p=reject"')
        chunks = " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))
        dns.add("sel1._domainkey.sender.test", "TXT", chunks)
        resolver = DnsResolver([dns.nameserver], timeout=1.0)
        clock = SystemClock()
        verdict = Verdict(Result.PASS, "matched", domain="bounce.sender.test")
        on = config_from_mapping({"dmarc": {"enabled": True, "spf": "off", "dkim": "off"}})
        facts = MessageFacts(from_fields=["A <a@mail.sender.test>"])

        def dmarc_only() -> object:
            return dmarc_for_message(facts, verdict, on, resolver, clock, budget_seconds=5.0)

        ours = per_call_us(lambda: verify_dkim(signed, resolver, Budget(clock, 5.0)))
        theirs = per_call_us(lambda: dkim.verify(signed, dnsfunc=lambda *a, **k: record.encode()))
        off = config_from_mapping({})
        print(f"DMARC without DKIM, warm cache: {per_call_us(dmarc_only):.1f} µs/message")
        print(f"DKIM verify, 10 kB, ours (dkimpy via our resolver): {ours:.0f} µs")
        print(f"DKIM verify, 10 kB, dkimpy dkim.verify alone:       {theirs:.0f} µs")
        print(f"DMARC off, our_methods(): {per_call_us(lambda: our_methods(off)):.2f} µs")


if __name__ == "__main__":
    main()
