"""Milter transport figures: mtls-milter vs a null pymilter milter, full conversations per second.

Run: ``.venv/bin/python bench/bench_milter.py`` (or via ``bench/run_all.py``). Prints figures and
ratios only, never asserts timings (docs/performance.md has the reference figures).

The MTA side is Debian's ``miltertest`` running ``bench/lua/conversation.lua``: one connection
per message (connect, conninfo, helo, Postfix TLS macros at MAIL for a trusted client
certificate, MAIL FROM, headers, end of message, check that the header was inserted and the
reply is accept, disconnect). Concurrency N = N miltertest processes in parallel, all stopping
at the same wall-clock second. Every configuration is measured in several interleaved rounds;
the table shows the median round.

Measured in the same run:
1. unix socket, concurrency 1 and 8: ``mtls-milter serve`` on its default asyncio transport
   (which asks for "no reply" before end of message on a unix socket) with ``[milter] workers``
   = 1 and = 2 (warm DNS cache: an in-process DNS server serves the Client MX record with a
   one-hour TTL) vs two baselines: ``bench/null_milter.py`` as stock pymilter, and the same
   null milter negotiating "no reply" too (``--no-reply``);
2. inet 127.0.0.1: the null milter as stock pymilter (Nagle/delayed-ACK stall expected), the
   null milter with TCP_NODELAY forced on its listener, the same with "no reply" (what "no
   reply" costs over TCP), and mtls-milter (which sets TCP_NODELAY and answers every step over
   TCP); each with miltertest as shipped and with TCP_NODELAY forced on miltertest's socket too
   (an LD_PRELOAD ``connect`` wrapper compiled here with cc, when a C compiler exists).
   miltertest writes the MAIL-stage macros and MAIL FROM as two small writes without waiting
   for a reply between them, so without NODELAY on the client side every message also stalls
   ~40 ms on the client's Nagle + the milter's delayed ACK, whatever the milter does.

Milter CPU per message comes from /proc/PID/stat (all threads, user + system) around each run,
summed over the milter's process tree (the workers of ``workers = 2``).

``--rss``: instead of the rates, each worker's resident memory after 1,000 and after 20,000
messages (``workers`` = 1 and 2): flat means no per-message growth.

If ``miltertest`` is missing, it is installed with apt-get when running as root; otherwise the
bench prints why it skips and exits 0.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchpath  # noqa: F401  (tests/ on sys.path for support.*)
from support.dnsserver import TestDnsServer
from support.ports import free_port

HERE = Path(__file__).resolve().parent
LUA = HERE / "lua" / "conversation.lua"
NULL_MILTER = HERE / "null_milter.py"
OURS_HEADER = "Authentication-Results"
NULL_HEADER = "X-Null"
AUTHSERV_ID = "mx.bench.test"
EXPECTED_OURS = re.compile(r"^mx\.bench\.test;\s+mtls=pass\b.*smtp\.mailfrom=sender\.test", re.S)

ROUNDS = 3  # interleaved rounds per configuration
MAX_MESSAGES = 100_000  # per miltertest process and run (the time bound normally hits first)
RUN_SECONDS = 0.7  # each run ends at the first whole second at least this far away
PROCESS_GRACE = 20.0  # seconds past a run's deadline before its miltertest processes are killed
START_TIMEOUT = 15.0  # seconds for a milter to accept connections
TOTAL_BUDGET = 110.0  # seconds; later rounds are dropped past this


@dataclass
class MilterProc:
    """A milter subprocess under test."""

    label: str
    spec: str
    header: str
    process: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        """User + system CPU of the process and its children so far (0 if unreadable)."""
        return sum(_cpu_seconds(pid) for pid in process_tree(self.process.pid))

    def rss_kib(self) -> dict[int, int]:
        """Resident memory (KiB) of every process of the tree that serves (the workers, or
        the process itself when it has no children)."""
        tree = process_tree(self.process.pid)
        serving = tree[1:] or tree
        return {pid: _rss_kib(pid) for pid in serving}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _stat_fields(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    if not fields:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc's parent ids), root first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@dataclass
class Figure:
    """One configuration: message rates of its rounds."""

    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # milter CPU per message
    failures: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else math.nan

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_us) if self.cpu_us else math.nan


NODELAY_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

/* Set TCP_NODELAY on every TCP socket before it connects (bench_milter.py). */
int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    int type = 0, one = 1;
    socklen_t size = sizeof type;
    if (!real)
        real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    if (addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6)
        && getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) == 0 && type == SOCK_STREAM)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return real(fd, addr, len);
}
"""


def build_nodelay_shim(tmp: Path) -> tuple[Path | None, str]:
    """Compile the LD_PRELOAD shim; (path, "") or (None, why not)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc/gcc) to build the LD_PRELOAD TCP_NODELAY shim"
    source, library = tmp / "nodelay.c", tmp / "nodelay.so"
    source.write_text(NODELAY_SHIM_C)
    command = [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        return None, "cannot build the TCP_NODELAY shim: " + result.stderr.strip()[:200]
    return library, ""


def ensure_miltertest() -> str | None:
    """Path to miltertest, installing the Debian package as root; None if unavailable."""
    found = shutil.which("miltertest")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("SKIP: miltertest not found; install the Debian package 'miltertest' (as root:")
        print("      apt-get install -y --no-install-recommends miltertest)")
        return None
    print("installing miltertest (apt-get) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", "miltertest"]
    try:
        result = subprocess.run(command, env=env, capture_output=True, timeout=300, check=False)
        if result.returncode != 0:  # stale package lists: update once and retry
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
            result = subprocess.run(command, env=env, capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        print("SKIP: apt-get install miltertest timed out")
        return None
    found = shutil.which("miltertest")
    if not found:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
        print("SKIP: could not install miltertest: " + " | ".join(tail))
    return found


def write_config(
    tmp: Path, name: str, spec: str, nameserver: str, transport: str = "asyncio", workers: int = 1
) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(
        "[milter]\n"
        f'socket = "{spec}"\n'
        f'authserv_id = "{AUTHSERV_ID}"\n'
        f'transport = "{transport}"\n'
        f"workers = {workers}\n"
        "\n[dns]\n"
        f'nameservers = ["{nameserver}"]\n'
    )
    return path


class Bench:
    """Owns every subprocess; ``close`` kills whatever is still running."""

    def __init__(self, miltertest: str, tmp: Path) -> None:
        self.miltertest = miltertest
        self.tmp = tmp
        self.processes: list[subprocess.Popen[Any]] = []
        self.invocation: list[str] = []

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 5
        for process in self.processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def _spawn(self, command: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as sink:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
            )
        self.processes.append(process)
        return process

    def start_null(
        self, label: str, spec: str, nodelay: bool, no_reply: bool = False
    ) -> MilterProc:
        log = self.tmp / f"{label}.log"
        command = [sys.executable, str(NULL_MILTER), "--socket", spec]
        if nodelay:
            command.append("--nodelay")
        if no_reply:
            command.append("--no-reply")
        return MilterProc(label, spec, NULL_HEADER, self._spawn(command, log), log)

    def start_ours(
        self,
        label: str,
        spec: str,
        nameserver: str,
        transport: str = "asyncio",
        workers: int = 1,
    ) -> MilterProc:
        log = self.tmp / f"{label}.log"
        config = write_config(self.tmp, label, spec, nameserver, transport, workers)
        command = [sys.executable, "-m", "mtls_milter", "serve", "--config", str(config)]
        return MilterProc(label, spec, OURS_HEADER, self._spawn(command, log), log)

    def worker_command(
        self, milter: MilterProc, deadline: int, count: int, show: bool
    ) -> list[str]:
        command = [
            self.miltertest,
            "-D",
            f"sock={milter.spec}",
            "-D",
            f"count={count}",
            "-D",
            f"deadline={deadline}",
            "-D",
            f"header={milter.header}",
            "-D",
            f"retries={int(START_TIMEOUT / 0.05)}",
            "-s",
            str(LUA),
        ]
        if show:
            command[1:1] = ["-D", "show=1"]
        return command

    def run(
        self,
        milter: MilterProc,
        concurrency: int,
        seconds: float,
        count: int = MAX_MESSAGES,
        preload: Path | None = None,
    ) -> tuple[float, float, list[str], str]:
        """Messages per second over ``concurrency`` parallel miltertest processes.

        Returns (rate, milter CPU µs per message, failures, header value shown by worker 0).
        """
        if milter.process.poll() is not None:
            exited = [f"{milter.label} exited with {milter.process.returncode}"]
            return math.nan, math.nan, exited, ""
        env = dict(os.environ)
        if preload is not None:
            env["LD_PRELOAD"] = str(preload)
        deadline = math.ceil(time.time() + seconds)
        commands = [
            self.worker_command(milter, deadline, count, show=(n == 0)) for n in range(concurrency)
        ]
        self.invocation = commands[0]
        cpu_before = milter.cpu_seconds()
        start = time.perf_counter()
        workers = [
            subprocess.Popen(
                c, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=env
            )
            for c in commands
        ]
        self.processes.extend(workers)
        outputs: list[str] = []
        failures: list[str] = []
        for worker in workers:
            timeout = max(deadline + PROCESS_GRACE - time.time(), 1.0)
            try:
                out, _ = worker.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                worker.kill()
                out, _ = worker.communicate()
                failures.append("miltertest killed after its time bound")
            outputs.append(out)
            if worker.returncode not in (0, None):
                failures.append(f"miltertest exited with {worker.returncode}")
        elapsed = time.perf_counter() - start
        cpu = milter.cpu_seconds() - cpu_before
        done = 0
        header = ""
        for out in outputs:
            for line in out.splitlines():
                if line.startswith("DONE "):
                    done += int(line.split()[1])
                elif line.startswith("FAIL "):
                    failures.append(line[5:])
                elif line.startswith("HEADER ") and not header:
                    header = line[7:]
        cpu_us = cpu / done * 1e6 if done else math.nan
        return done / elapsed, cpu_us, failures, header


def warm_up(bench: Bench, milter: MilterProc) -> str:
    """First conversations (connects when the milter is up, fills the DNS cache); header value."""
    rate, _, failures, header = bench.run(milter, 1, 0.3, count=20)
    if failures or math.isnan(rate):
        raise RuntimeError(f"{milter.label}: warm-up failed: {'; '.join(failures)}")
    return header


def log_findings(milter: MilterProc) -> list[str]:
    """Errors, warnings and tracebacks in a milter's log, plus a verdict summary for ours."""
    text = milter.log_text()
    bad = [
        line
        for line in text.splitlines()
        if re.match(r"(ERROR|WARNING|CRITICAL)\b", line) or "Traceback" in line
    ]
    findings = [f"{milter.label}: {line}" for line in bad[:10]]
    if len(bad) > 10:
        findings.append(f"{milter.label}: ... {len(bad) - 10} more such lines")
    verdicts = re.findall(r'"result":"([a-z]+)"', text)
    if verdicts:
        counts = {r: verdicts.count(r) for r in sorted(set(verdicts))}
        findings.append(f"{milter.label}: verdicts logged {counts}")
    return findings


def fmt(rate: float) -> str:
    return "-" if math.isnan(rate) else f"{rate:,.0f}"


def ratio(ours: float, base: float) -> str:
    if math.isnan(ours) or math.isnan(base) or base == 0:
        return "-"
    return f"{ours / base:.2f}x"


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A temporary directory with a short path (unix socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="mb-", dir="/tmp") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    miltertest = ensure_miltertest()
    if miltertest is None:
        return 0
    began = time.monotonic()
    with short_tmpdir() as tmp, TestDnsServer() as dns_server:
        dns_server.add("sender.test", 265, "10 out.sender.test.", ttl=3600)
        bench = Bench(miltertest, tmp)
        try:
            if "--rss" in args:
                return measure_rss(bench, tmp, dns_server)
            return measure(bench, tmp, dns_server, began)
        finally:
            bench.close()


Key = tuple[str, int, str]  # (client mode, concurrency, milter label)
CLIENT_STOCK, CLIENT_NODELAY, UNIX = "miltertest stock", "miltertest NODELAY", "unix"
UNIX_LABELS = ("null-unix", "null-unix-nr", "ours-unix-w1", "ours-unix-w2")
TCP_LABELS = ("null-tcp-stock", "null-tcp-nodelay", "null-tcp-nr", "ours-tcp")


def start_milters(bench: Bench, tmp: Path, ns: str) -> dict[str, MilterProc]:
    return {
        "null-unix": bench.start_null("null-unix", f"unix:{tmp}/null.sock", nodelay=False),
        "null-unix-nr": bench.start_null(
            "null-unix-nr", f"unix:{tmp}/null-nr.sock", nodelay=False, no_reply=True
        ),
        "ours-unix-w1": bench.start_ours("ours-unix-w1", f"unix:{tmp}/ours1.sock", ns),
        "ours-unix-w2": bench.start_ours("ours-unix-w2", f"unix:{tmp}/ours2.sock", ns, workers=2),
        "null-tcp-stock": bench.start_null(
            "null-tcp-stock", f"inet:{free_port()}@127.0.0.1", nodelay=False
        ),
        "null-tcp-nodelay": bench.start_null(
            "null-tcp-nodelay", f"inet:{free_port()}@127.0.0.1", nodelay=True
        ),
        "null-tcp-nr": bench.start_null(
            "null-tcp-nr", f"inet:{free_port()}@127.0.0.1", nodelay=True, no_reply=True
        ),
        "ours-tcp": bench.start_ours("ours-tcp", f"inet:{free_port()}@127.0.0.1", ns),
    }


def measure(bench: Bench, tmp: Path, dns_server: TestDnsServer, began: float) -> int:
    shim, shim_missing = build_nodelay_shim(tmp)
    milters = start_milters(bench, tmp, dns_server.nameserver)
    headers = {label: warm_up(bench, m) for label, m in milters.items()}
    dns_queries_after_warmup = len(dns_server.queries)
    print(
        f"miltertest: {bench.miltertest}; one connection per message; up to {ROUNDS} "
        "interleaved rounds, median shown"
    )
    print("invocation (per worker process; N in parallel for concurrency N):")
    print("  " + " ".join(bench.invocation))
    if shim is not None:
        print(f"  client-side TCP_NODELAY rows: same, with LD_PRELOAD={shim.name}")
    else:
        print(f"  client-side TCP_NODELAY rows skipped: {shim_missing}")
    for label in ("ours-unix-w1", "ours-unix-w2", "ours-tcp"):
        value = headers[label]
        state = "ok" if EXPECTED_OURS.match(value.replace("\\n", "\n")) else "UNEXPECTED"
        print(f"{label} inserted {OURS_HEADER}: {value!r} [{state}]")

    clients = [CLIENT_STOCK] + ([CLIENT_NODELAY] if shim is not None else [])
    plan: list[Key] = [
        (UNIX, concurrency, label) for concurrency in (1, 8) for label in UNIX_LABELS
    ] + [
        (client, concurrency, label)
        for client in clients
        for concurrency in (1, 8)
        for label in TCP_LABELS
    ]
    figures = {key: Figure() for key in plan}
    for round_no in range(ROUNDS):
        if round_no and time.monotonic() - began > TOTAL_BUDGET - 1.5 * len(plan):
            print(f"time budget reached: {round_no} round(s) measured")
            break
        for key in plan:
            client, concurrency, label = key
            preload = shim if client == CLIENT_NODELAY else None
            rate, cpu_us, failures, _ = bench.run(
                milters[label], concurrency, RUN_SECONDS, preload=preload
            )
            if not math.isnan(rate):
                figures[key].rates.append(rate)
                figures[key].cpu_us.append(cpu_us)
            figures[key].failures.extend(failures)
    report(figures, clients)

    print()
    print(
        f"DNS queries seen by the in-process server: {dns_queries_after_warmup} after warm-up, "
        f"{len(dns_server.queries)} at the end (warm cache: should not grow)"
    )
    failures = [
        f"{key[0]} c={key[1]} {key[2]}: {f}"
        for key, figure in figures.items()
        for f in figure.failures
    ]
    for failure in sorted(set(failures))[:20]:
        print(f"FAILURE {failure}")
    findings = [f for m in milters.values() for f in log_findings(m)]
    for milter in milters.values():
        if milter.process.poll() is not None:
            findings.append(f"{milter.label}: exited early with {milter.process.returncode}")
    print("milter logs:" if findings else "milter logs: no errors or warnings")
    for finding in findings:
        print(f"  {finding}")
    print(f"total bench time {time.monotonic() - began:.1f} s")
    return 0


RSS_EARLY, RSS_LATE = 1_000, 20_000  # messages


def measure_rss(bench: Bench, tmp: Path, dns_server: TestDnsServer) -> int:
    """Each worker's RSS after 1,000 and after 20,000 messages (4 parallel clients)."""
    ns = dns_server.nameserver
    print(f"RSS per serving process after {RSS_EARLY:,} and {RSS_LATE:,} messages (KiB)")
    for workers in (1, 2):
        label = f"ours-unix-w{workers}"
        milter = bench.start_ours(label, f"unix:{tmp}/rss{workers}.sock", ns, workers=workers)
        warm_up(bench, milter)
        sent = 20
        rows: list[str] = []
        for target in (RSS_EARLY, RSS_LATE):
            per_client = max((target - sent) // 4, 1)
            _, _, failures, _ = bench.run(milter, 4, 3600, count=per_client)
            sent += 4 * per_client
            rss = milter.rss_kib()
            rows.append(f"after {sent:>6,} messages: " + ", ".join(f"{v:,}" for v in rss.values()))
            for failure in failures[:3]:
                rows.append(f"  FAILURE {failure}")
        print(f"{label}:")
        for row in rows:
            print(f"  {row}")
        milter.process.terminate()
        milter.process.wait(10)
    return 0


def report(figures: dict[Key, Figure], clients: list[str]) -> None:
    def med(client: str, concurrency: int, label: str) -> float:
        figure = figures.get((client, concurrency, label))
        return figure.median if figure else math.nan

    print()
    head = f"{'unix socket':<34} {'conc':>4} {'msg/s':>8} {'vs null':>8} {'vs null NR':>10}"
    print(head)
    print("-" * len(head))
    for concurrency in (1, 8):
        null = med(UNIX, concurrency, "null-unix")
        null_nr = med(UNIX, concurrency, "null-unix-nr")
        for label in UNIX_LABELS:
            rate = med(UNIX, concurrency, label)
            print(
                f"{label:<34} {concurrency:>4} {fmt(rate):>8} {ratio(rate, null):>8} "
                f"{ratio(rate, null_nr):>10}"
            )
    print("(target: ours >= 0.80x the null pymilter milter at concurrency 1 and 8)")
    print()
    head = f"{'transport':<48} {'conc':>4} {'null msg/s':>11} {'ours msg/s':>11} {'ratio':>7}"
    print(head)
    print("-" * len(head))
    for client in clients:
        for concurrency in (1, 8):
            ours = med(client, concurrency, "ours-tcp")
            for label, null_kind in (
                ("null-tcp-stock", "stock"),
                ("null-tcp-nodelay", "NODELAY"),
                ("null-tcp-nr", "NODELAY + no reply"),
            ):
                null = med(client, concurrency, label)
                name = f"inet, {client}, null {null_kind}"
                print(
                    f"{name:<48} {concurrency:>4} {fmt(null):>11} {fmt(ours):>11} "
                    f"{ratio(ours, null):>7}"
                )

    print()
    print("per-round rates (msg/s) and median milter CPU per message (process tree):")
    for key, figure in figures.items():
        rounds = ", ".join(fmt(r) for r in figure.rates)
        cpu = "-" if math.isnan(figure.cpu) else f"{figure.cpu:,.0f} µs CPU/msg"
        print(f"  {key[0]:<18} c={key[1]} {key[2]:<17} {rounds:<24} {cpu}")

    print()
    for client in clients:
        for concurrency in (1, 8):
            nodelay = med(client, concurrency, "null-tcp-nodelay")
            no_reply = med(client, concurrency, "null-tcp-nr")
            print(
                f"{client}, c={concurrency}: null with no reply / null answering every step "
                f"over TCP: {ratio(no_reply, nodelay)}; per connection "
                f"{fmt(no_reply / concurrency)} vs {fmt(nodelay / concurrency)} msg/s"
            )


if __name__ == "__main__":
    raise SystemExit(main())
