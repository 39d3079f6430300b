"""Metrics figures: what the dashboard shows for a real run, and what the metrics cost per message.

Run: ``.venv/bin/python bench/bench_metrics.py [--png PATH] [--seconds N]`` (or via
``bench/run_all.py``). Prints figures only, never asserts timings.

1. Picture run: ``mtls-milter serve`` with ``[metrics] listen`` on loopback, an in-process DNS
   server (short TTLs, a few milliseconds of answer delay), and 64 client threads speaking the
   milter protocol (tests/support/milter_client.py) at a steady rate with a mix of senders:
   pass (a certificate naming the Client MX host), fail (a certificate naming another host; no
   TLS), none (no Client MX record), temperror (the domain's name server fails). In the middle
   third the DNS server answers the main sender domain only after the ``[dns] timeout``: a
   resolver outage. ``/metrics`` is scraped every second; the main dashboard panels are drawn
   from the scrapes with matplotlib (the ``bench`` extra) into docs/img/dashboard.png.
2. Cost run: the same daemon with and without ``[metrics] listen``, the same warm-cache mix of
   messages one after the other, several interleaved rounds; the daemon's CPU (user + system,
   all threads and child processes, from /proc) per message, and the difference on - off.

Without ``[metrics]`` in this build's configuration the bench says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import benchpath  # noqa: F401  (tests/ on sys.path for support.*)
from metrics_plot import Recording, Scraper, draw, totals
from support.daemon import MilterDaemon
from support.dnsserver import TestDnsServer
from support.milter_client import MilterClient, Reply
from support.ports import free_port

from mtls_milter.config import Config

ROOT = Path(__file__).resolve().parents[1]
PNG = ROOT / "docs" / "img" / "dashboard.png"
AUTHSERV_ID = "mx.bench.test"
DNS_TIMEOUT = 0.4  # seconds; the outage phase answers later than this
CLIENTS = 64  # client threads in the picture run: enough to keep RATE through the outage
RATE = 40.0  # messages per second in the picture run
# messages per cost round: CPU time comes in clock ticks (10 ms), so 3000 messages resolve
# 3.3 µs per round and the mean of all rounds about 1 µs
COST_MESSAGES = 3000
COST_ROUNDS = 3

CERT_MACROS = {
    "{tls_version}": "TLSv1.3",
    "{cert_subject}": "out.sender.test",
    "{cert_issuer}": "Bench CA",
}


@dataclass(frozen=True)
class Kind:
    """One kind of message in the mix: its sender, whether the MTA saw a certificate, weight."""

    name: str
    sender: str
    tls: bool
    weight: int


MIX = (
    Kind("pass", "a@sender.test", True, 70),
    Kind("fail: certificate names another host", "a@impostor.test", True, 8),
    Kind("fail: no TLS", "a@sender.test", False, 5),
    Kind("none: no Client MX", "a@plain.test", True, 14),
    Kind("temperror: name server fails", "a@broken.test", True, 3),
)


def mix_sequence() -> list[Kind]:
    """One cycle of the mix, interleaved (every kind spread over the cycle)."""
    slots = [(i / k.weight, k) for k in MIX for i in range(k.weight)]
    return [kind for _, kind in sorted(slots, key=lambda slot: slot[0])]


def serve_zone(dns_server: TestDnsServer, ttl: int, delay: float) -> None:
    dns_server.add("sender.test", 265, "10 out.sender.test.", ttl=ttl)
    dns_server.add("impostor.test", 265, "10 mx.impostor.test.", ttl=ttl)
    dns_server.add("plain.test", "MX", "10 mx.plain.test.", ttl=ttl)
    dns_server.servfail("broken.test")
    for name in ("sender.test", "impostor.test", "plain.test"):
        if delay:
            dns_server.delay(name, delay)


def send(address: tuple[str, int], kind: Kind, number: int) -> str:
    """One message from connect to QUIT; the final reply command (a, r, t, ...)."""
    with MilterClient.connect(address, timeout=10.0) as client:
        client.optneg()
        client.macro(b"C", {"j": "mx.bench.test", "{daemon_name}": "smtpd"})
        client.connect_info("out.sender.test", "192.0.2.25")
        client.helo("out.sender.test")
        macros = dict(CERT_MACROS) if kind.tls else {}
        client.macro(b"M", {**macros, "i": f"Q{number}", "{mail_addr}": kind.sender})
        steps: list[Callable[[], Reply | None]] = [
            lambda: client.mail(f"<{kind.sender}>"),
            lambda: client.rcpt("<b@receiver.test>"),
            client.data,
            lambda: client.header("From", kind.sender),
            client.eoh,
            lambda: client.body(b"hello\r\n"),
        ]
        for step in steps:
            reply = step()
            if reply is not None and reply.command in (b"r", b"t", b"y", b"d", b"a"):
                return reply.command.decode()
        final = client.eom().final.command.decode()
        client.quit()
        return final


# --- the runs ----------------------------------------------------------------------------------


def metrics_supported() -> bool:
    return any(f.name == "metrics" for f in dataclasses.fields(Config))


def daemon_config(nameserver: str, metrics_port: int | None) -> dict[str, dict[str, Any]]:
    config: dict[str, dict[str, Any]] = {
        "milter": {"authserv_id": AUTHSERV_ID},
        "dns": {"nameservers": [nameserver], "timeout": DNS_TIMEOUT, "budget": 1.0},
        "policy": {"on_fail": "reject", "on_temperror": "tempfail"},
    }
    if metrics_port is not None:
        config["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    return config


def picture_run(tmp: Path, seconds: float) -> Recording:
    """The daemon under a steady mixed load with a DNS outage in the middle third."""
    recording = Recording()
    port = free_port()
    with TestDnsServer() as dns_server:
        serve_zone(dns_server, ttl=1, delay=0.004)
        daemon = MilterDaemon(tmp / "picture", daemon_config(dns_server.nameserver, port))
        with daemon:
            scraper = Scraper(f"http://127.0.0.1:{port}/metrics", recording)
            scraper.start()
            address = ("127.0.0.1", daemon.port)
            sequence = mix_sequence()
            start_outage, end_outage = seconds / 3, 2 * seconds / 3
            recording.outage = (start_outage, end_outage)
            recording.length = seconds
            began = scraper.began
            outage_on = outage_off = False
            with ThreadPoolExecutor(CLIENTS) as pool:
                number = 0
                while (now := time.monotonic() - began) < seconds:
                    if now >= start_outage and not outage_on:
                        dns_server.delay("sender.test", DNS_TIMEOUT * 3)
                        outage_on = True
                    if now >= end_outage and not outage_off:
                        dns_server.delay("sender.test", 0.004)
                        outage_off = True
                    pool.submit(send, address, sequence[number % len(sequence)], number)
                    number += 1
                    time.sleep(max(began + number / RATE - time.monotonic(), 0.0))
            time.sleep(1.5)  # one more scrape after the last message
            scraper.stopping.set()
            scraper.join()
    return recording


def process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (0 when unreadable)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        child = int(stat.parent.name)
        parents[child] = int(fields[1])
        ticks[child] = int(fields[11]) + int(fields[12])
    tree, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def cost_round(daemon: MilterDaemon, count: int) -> float:
    """CPU µs per message of ``count`` messages of the mix (4 client threads)."""
    assert daemon.pid is not None
    address = ("127.0.0.1", daemon.port)
    sequence = mix_sequence()
    before = process_tree_cpu(daemon.pid)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: send(address, sequence[n % len(sequence)], n), range(count)))
    time.sleep(0.2)  # let the daemon finish logging the last message
    return (process_tree_cpu(daemon.pid) - before) / count * 1e6


def cost_run(tmp: Path, rounds: int) -> tuple[list[float], list[float]]:
    """Interleaved rounds, metrics off and on: CPU µs per message of each round."""
    off: list[float] = []
    on: list[float] = []
    with TestDnsServer() as dns_server:
        serve_zone(dns_server, ttl=3600, delay=0.0)
        ns = dns_server.nameserver
        without = MilterDaemon(tmp / "off", daemon_config(ns, None))
        with_metrics = MilterDaemon(tmp / "on", daemon_config(ns, free_port()))
        with without, with_metrics:
            for daemon in (without, with_metrics):
                cost_round(daemon, 300)  # warm up: caches, imports, first connections
            for _ in range(rounds):
                off.append(cost_round(without, COST_MESSAGES))
                on.append(cost_round(with_metrics, COST_MESSAGES))
    return off, on


def updates_cost(workers: int, iterations: int = 40_000) -> float:
    """CPU µs of one message's metric updates in this process: the observer's verdict call,
    two DNS hook calls (a cache hit and a lookup) and a share of the tally's flush into the
    metrics (one per 100 messages), minus the same loop without them."""
    from mtls_milter.core.evaluate import Result, Verdict
    from mtls_milter.core.evidence import EvidenceKind
    from mtls_milter.inbound.metrics_observer import DaemonMetrics
    from mtls_milter.inbound.session import EngineHolder
    from mtls_milter.runtime import metrics

    observer = DaemonMetrics(metrics.enable(workers), cast(EngineHolder, None))
    verdicts = [
        Verdict(Result.PASS, "certificate name a.test matches", evidence=EvidenceKind.MTA),
        Verdict(Result.FAIL, "no certificate name matches Client MX", evidence=EvidenceKind.MTA),
        Verdict(Result.NONE, "plain.test does not publish Client MX"),
        Verdict(Result.TEMPERROR, "Client MX lookup failed: SERVFAIL from 192.0.2.1:53"),
    ]
    dns = observer.dns

    def loop(update: bool) -> float:
        start = time.process_time()
        for number in range(iterations):
            verdict = verdicts[number & 3]
            if update:
                observer.verdict(verdict, "accept", None, 0.002, 0.010)
                dns("client_mx", 0.0, True)
                dns("mx", 0.003, False)
                if number % 100 == 99:  # a scrape a second at 100 messages a second
                    observer.flush()
        return time.process_time() - start

    loop(True)  # warm up: label children created once each
    # the least of five: other processes on the machine only ever add time
    return min(loop(True) - loop(False) for _ in range(5)) / iterations * 1e6


def updates_cost_in_subprocess(workers: int) -> float:
    """:func:`updates_cost` in a fresh process (multiprocess mode is process-wide)."""
    command = [sys.executable, __file__, "--updates-cost", str(workers)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"updates cost ({workers} workers) failed: {done.stderr.strip()[-300:]}")
        return math.nan


# --- report ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--png", type=Path, default=PNG, help=f"picture path ({PNG})")
    parser.add_argument("--seconds", type=float, default=45.0, help="picture run length")
    parser.add_argument("--rounds", type=int, default=COST_ROUNDS, help="cost rounds (0: none)")
    parser.add_argument("--updates-cost", type=int, metavar="WORKERS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.updates_cost:
        print(f"{updates_cost(args.updates_cost):.3f}")
        return 0
    if not metrics_supported():
        print("SKIP: this build has no [metrics] section (no /metrics to scrape)")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as name:
        tmp = Path(name)
        recording = picture_run(tmp, args.seconds)
        print(
            f"picture run: {args.seconds:g} s at {RATE:g} messages/s, {len(recording.scrapes)}"
            f" scrapes; DNS outage {recording.outage[0]:.0f}-{recording.outage[1]:.0f} s"
        )
        if len(recording.scrapes) < 3:
            print("FAIL: /metrics could not be scraped")
            return 1
        print("\n".join(totals(recording)))
        try:
            draw(recording, args.png)
            print(f"picture: {args.png}")
        except ImportError:
            print("picture skipped: matplotlib missing (pip install -e '.[bench]')")
        single, multi = updates_cost_in_subprocess(1), updates_cost_in_subprocess(2)
        print(
            f"metric updates of one message, in process: {single:.2f} µs single-process, "
            f"{multi:.2f} µs in multiprocess mode (workers > 1); target ≤ 5 µs"
        )
        if args.rounds > 0:
            report_cost(*cost_run(tmp, args.rounds))
    return 0


def report_cost(off: list[float], on: list[float]) -> None:
    """Per-round figures, and the mean over all rounds (the finer figure: more ticks)."""
    rounds = " ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(off, on, strict=True))
    mean_off, mean_on = statistics.fmean(off), statistics.fmean(on)
    print(
        f"CPU per message (daemon process tree, user + system), {len(off)} interleaved rounds "
        f"of {COST_MESSAGES} messages; off/on µs per round: {rounds}"
    )
    for label, figures, mean in (("off", off, mean_off), ("on: ", on, mean_on)):
        median = statistics.median(figures)
        print(f"  metrics {label} {mean:.1f} µs per message (mean), median round {median:.1f}")
    print(f"  cost of metrics: {mean_on - mean_off:+.1f} µs per message; target ≤ 5 µs")


if __name__ == "__main__":
    raise SystemExit(main())
