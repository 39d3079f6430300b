"""Transport figures: our own inbound milter transport vs pymilter/libmilter, null milters, then
the product (``mtls-milter serve``) on each ``[milter] transport`` beside the null pymilter milter.

Run: ``.venv/bin/python bench/bench_inbound.py`` (or via ``bench/run_all.py``). Prints figures
and ratios only, never asserts timings.

Both milters do the same work: every protocol step negotiated, CONTINUE everywhere, ``X-Null``
inserted at the top at end of message, accept. The load is Debian's ``miltertest`` running
``bench/lua/conversation.lua`` (one connection per message, checked header and reply), N
processes in parallel for concurrency N, on a unix socket and on TCP 127.0.0.1 (the pymilter
milter with TCP_NODELAY forced on its listener, as ``mtls-milter serve`` does; ours sets it on
each connection; miltertest with TCP_NODELAY forced by bench_milter.py's LD_PRELOAD shim, since
its own small writes otherwise stall ~40 ms each). Rounds are interleaved; the median round is
shown, with the milter's CPU per message (all threads, user + system). With uvloop importable
(e.g. ``PYTHONPATH`` pointing at an installed copy) the inbound milter runs on it.

The product rows use the unix socket and ``bench_milter.py``'s conversation: Postfix TLS macros
for a trusted client certificate, a Client MX record served with a one-hour TTL (warm cache),
``Authentication-Results: ... mtls=pass`` checked on every message.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import benchpath  # noqa: F401  (tests/ on sys.path for support.*)
from bench_milter import (
    Bench,
    Figure,
    MilterProc,
    build_nodelay_shim,
    ensure_miltertest,
    fmt,
    ratio,
    short_tmpdir,
)
from support.dnsserver import TestDnsServer
from support.ports import free_port

HERE = Path(__file__).resolve().parent
NULL_INBOUND = HERE / "null_inbound.py"
ROUNDS = 3
RUN_SECONDS = 0.7
TOTAL_BUDGET = 60.0


def start_inbound(bench: Bench, label: str, spec: str) -> MilterProc:
    log = bench.tmp / f"{label}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, str(NULL_INBOUND), "--socket", spec],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    bench.processes.append(process)
    return MilterProc(label, spec, "X-Null", process, log)


def main() -> int:
    miltertest = ensure_miltertest()
    if miltertest is None:
        return 0
    began = time.monotonic()
    with short_tmpdir() as tmp:
        bench = Bench(miltertest, tmp)
        try:
            status = measure(bench, tmp, began)
        finally:
            bench.close()
    if status:
        return status
    with short_tmpdir() as tmp, TestDnsServer() as dns_server:
        dns_server.add("sender.test", 265, "10 out.sender.test.", ttl=3600)
        bench = Bench(miltertest, tmp)
        try:
            return measure_product(bench, tmp, dns_server.nameserver)
        finally:
            bench.close()


def measure_product(bench: Bench, tmp: Path, nameserver: str) -> int:
    """mtls-milter serve on each transport vs the null pymilter milter, unix socket."""
    began = time.monotonic()
    milters = {
        "null pymilter": bench.start_null("null", f"unix:{tmp}/null.sock", False),
        "serve pymilter": bench.start_ours("serve-py", f"unix:{tmp}/py.sock", nameserver),
        "serve asyncio": bench.start_ours(
            "serve-aio", f"unix:{tmp}/aio.sock", nameserver, "asyncio"
        ),
    }
    for milter in milters.values():
        _, _, failures, header = bench.run(milter, 1, 0.5, count=20)
        if failures or not header:
            print(f"{milter.label}: warm-up failed: {failures} header={header!r}")
            return 1
    plan = [(c, label) for c in (1, 8) for label in milters]
    figures = {key: Figure() for key in plan}
    for _ in range(ROUNDS):
        for concurrency, label in plan:
            rate, cpu_us, failures, _ = bench.run(milters[label], concurrency, RUN_SECONDS)
            figure = figures[(concurrency, label)]
            figure.failures.extend(failures)
            if not math.isnan(rate):
                figure.rates.append(rate)
                figure.cpu_us.append(cpu_us)
    print("\nthe product, unix socket, warm DNS cache, mtls=pass checked; median of rounds")
    print(f"{'milter':<15} {'conc':>4} {'msg/s':>8} {'vs null':>8} {'CPU µs/msg':>11}")
    for concurrency in (1, 8):
        base = figures[(concurrency, "null pymilter")].median
        for label in milters:
            figure = figures[(concurrency, label)]
            print(f"{label:<15} {concurrency:>4} {fmt(figure.median):>8} "
                  f"{ratio(figure.median, base):>8} {figure.cpu:>11,.0f}")  # fmt: skip
    for key, figure in figures.items():
        for failure in sorted(set(figure.failures))[:5]:
            print(f"FAILURE {key}: {failure}")
    print(f"product bench time {time.monotonic() - began:.1f} s")
    return 0


def measure(bench: Bench, tmp: Path, began: float) -> int:
    shim, missing = build_nodelay_shim(tmp)
    if shim is None:
        print(f"TCP rows without client-side TCP_NODELAY ({missing}): expect ~40 ms stalls")
    tcp_null, tcp_ours = f"inet:{free_port()}@127.0.0.1", f"inet:{free_port()}@127.0.0.1"
    milters = {
        ("unix", "pymilter"): bench.start_null("pymilter-unix", f"unix:{tmp}/n.sock", False),
        ("unix", "inbound"): start_inbound(bench, "inbound-unix", f"unix:{tmp}/i.sock"),
        ("tcp", "pymilter"): bench.start_null("pymilter-tcp", tcp_null, nodelay=True),
        ("tcp", "inbound"): start_inbound(bench, "inbound-tcp", tcp_ours),
    }
    for milter in milters.values():
        _, _, failures, header = bench.run(milter, 1, 0.3, count=20)
        if failures or header != "1":
            print(f"{milter.label}: warm-up failed: {failures} header={header!r}")
            return 1
    plan = [
        (t, c, kind) for t in ("unix", "tcp") for c in (1, 8) for kind in ("pymilter", "inbound")
    ]
    figures = {key: Figure() for key in plan}
    for round_no in range(ROUNDS):
        if round_no and time.monotonic() - began > TOTAL_BUDGET:
            print(f"time budget reached: {round_no} round(s) measured")
            break
        for transport, concurrency, kind in plan:
            milter = milters[(transport, kind)]
            preload = shim if transport == "tcp" else None
            rate, cpu_us, failures, _ = bench.run(milter, concurrency, RUN_SECONDS, preload=preload)
            figure = figures[(transport, concurrency, kind)]
            figure.failures.extend(failures)
            if not math.isnan(rate):
                figure.rates.append(rate)
                figure.cpu_us.append(cpu_us)
    print(f"miltertest, one connection per message, {ROUNDS} interleaved rounds, median shown")
    print(f"{'transport':<6} {'conc':>4} {'pymilter msg/s':>15} {'inbound msg/s':>14} "
          f"{'ratio':>6} {'CPU µs/msg pymilter/inbound':>28}")  # fmt: skip
    for transport in ("unix", "tcp"):
        for concurrency in (1, 8):
            base = figures[(transport, concurrency, "pymilter")]
            ours = figures[(transport, concurrency, "inbound")]
            cpu = f"{base.cpu:,.0f} / {ours.cpu:,.0f}"
            print(f"{transport:<6} {concurrency:>4} {fmt(base.median):>15} {fmt(ours.median):>14} "
                  f"{ratio(ours.median, base.median):>6} {cpu:>28}")  # fmt: skip
    for key, figure in figures.items():
        for failure in sorted(set(figure.failures))[:5]:
            print(f"FAILURE {key}: {failure}")
    print(f"total bench time {time.monotonic() - began:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
