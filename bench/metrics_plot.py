"""Scrapes of ``/metrics`` and the dashboard picture drawn from them (bench/bench_metrics.py).

A :class:`Scraper` thread reads the endpoint once a second into a :class:`Recording`; the
picture computes from consecutive scrapes what the dashboard's queries compute in Prometheus:
``sum by (label) (rate(counter))`` and ``histogram_quantile`` over the bucket increases of the
last few scrapes. matplotlib (the ``bench`` extra) is imported only to draw.
"""

from __future__ import annotations

import math
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Grafana's palette for the values an operator reads at a glance; other series cycle.
COLORS = {
    "pass": "#73BF69",
    "fail": "#F2495C",
    "reject": "#F2495C",
    "temperror": "#FF9830",
    "tempfail": "#FF9830",
    "dns": "#FF9830",
    "none": "#8AB8FF",
    "permerror": "#B877D9",
    "quarantine": "#FADE2A",
    "hit": "#73BF69",
    "miss": "#FF9830",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """One /metrics scrape as {(sample name, labels): value}; empty when unreachable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            text = response.read().decode()
    except OSError:
        return {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def summed(samples: Samples, name: str, by: str, **match: str) -> dict[str, float]:
    """``sum by (by) (name{match})`` over one scrape."""
    out: dict[str, float] = {}
    for (sample, labels), value in samples.items():
        label = dict(labels)
        if sample == name and all(label.get(k) == v for k, v in match.items()):
            out[label.get(by, "")] = out.get(label.get(by, ""), 0.0) + value
    return out


def quantile(q: float, buckets: dict[float, float]) -> float:
    """``histogram_quantile``: linear interpolation in cumulative buckets (upper bound → count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            share = (rank - below) / (buckets[bound] - below) if buckets[bound] > below else 0
            return lower + (bound - lower) * share
        lower, below = bound, buckets[bound]
    return lower


def bucket_deltas(
    new: Samples, old: Samples, name: str, by: str | None
) -> dict[str, dict[float, float]]:
    """Per group (value of label ``by``, "" without): cumulative bucket count increases."""
    groups: dict[str, dict[float, float]] = {}
    for (sample, labels), value in new.items():
        if sample != f"{name}_bucket":
            continue
        label = dict(labels)
        group = label.get(by, "") if by else ""
        bound = float(label["le"])
        increase = value - old.get((sample, labels), 0.0)
        groups.setdefault(group, {})[bound] = groups.get(group, {}).get(bound, 0.0) + increase
    return groups


@dataclass
class Recording:
    """Scrapes taken once a second during the picture run."""

    times: list[float] = field(default_factory=list)
    scrapes: list[Samples] = field(default_factory=list)
    outage: tuple[float, float] = (0.0, 0.0)
    length: float = 0.0  # seconds of load (the scrapes after it show the load ending)


class Scraper(threading.Thread):
    def __init__(self, url: str, recording: Recording) -> None:
        super().__init__(daemon=True)
        self.url, self.recording, self.began = url, recording, time.monotonic()
        self.stopping = threading.Event()

    def run(self) -> None:
        tick = self.began
        while not self.stopping.is_set():
            samples = scrape(self.url)
            if samples:
                self.recording.times.append(time.monotonic() - self.began)
                self.recording.scrapes.append(samples)
            tick += 1.0
            self.stopping.wait(max(tick - time.monotonic(), 0.0))


def totals(recording: Recording) -> Iterator[str]:
    """The counters of the last scrape, one line per family."""
    last = recording.scrapes[-1]
    for label, name, by in (
        ("verdicts", "mtls_milter_verdicts_total", "result"),
        ("reason classes", "mtls_milter_verdicts_total", "reason_class"),
        ("actions", "mtls_milter_actions_total", "action"),
        ("DNS cache", "mtls_milter_dns_cache_lookups_total", "outcome"),
    ):
        counts = summed(last, name, by)
        yield f"  {label}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(counts.items()))


# --- the picture ------------------------------------------------------------------------------


def series(
    recording: Recording, value: Callable[[Samples, Samples, float], dict[str, float]]
) -> tuple[list[float], dict[str, list[float]]]:
    """Per scrape interval: x (seconds) and {legend: values} computed from consecutive scrapes."""
    xs: list[float] = []
    lines: dict[str, list[float]] = {}
    pairs = zip(recording.scrapes, recording.scrapes[1:], strict=False)
    for index, (old, new) in enumerate(pairs):
        elapsed = recording.times[index + 1] - recording.times[index]
        values = value(new, old, elapsed)
        for legend in values.keys() - lines.keys():
            lines[legend] = [math.nan] * len(xs)
        xs.append(recording.times[index + 1])
        for legend, line in lines.items():
            line.append(values.get(legend, 0.0))
    return xs, lines


def rates(name: str, by: str, skip: str = "", **match: str) -> Callable[..., dict[str, float]]:
    def compute(new: Samples, old: Samples, elapsed: float) -> dict[str, float]:
        now, before = summed(new, name, by, **match), summed(old, name, by, **match)
        return {k: (v - before.get(k, 0.0)) / elapsed for k, v in now.items() if k != skip}

    return compute


def windowed_quantiles(
    recording: Recording, name: str, by: str | None, window: int = 3
) -> tuple[list[float], dict[str, list[float]]]:
    """p50/p99 over the last ``window`` scrapes (like rate(...[3s])), milliseconds."""
    xs: list[float] = []
    lines: dict[str, list[float]] = {}
    for index in range(window, len(recording.scrapes)):
        groups = bucket_deltas(
            recording.scrapes[index], recording.scrapes[index - window], name, by
        )
        xs.append(recording.times[index])
        for group, buckets in groups.items():
            for q in (0.5, 0.99):
                legend = f"p{int(q * 100)} {group}".strip()
                lines.setdefault(legend, [math.nan] * (len(xs) - 1))
                lines[legend].append(quantile(q, buckets) * 1000)
        for line in lines.values():
            line.extend([math.nan] * (len(xs) - len(line)))
    return xs, lines


Lines = tuple[list[float], dict[str, list[float]]]  # x values, legend → y values
Panel = tuple[str, str, Lines, bool]  # title, unit ("(log)": log scale), lines, stacked


def panels(recording: Recording) -> list[Panel]:
    """The main dashboard panels, as the dashboard's queries would compute them."""
    verdicts, actions = "mtls_milter_verdicts_total", "mtls_milter_actions_total"
    per_second = "messages/s"
    return [
        ("Verdicts by result", per_second, series(recording, rates(verdicts, "result")), True),
        (
            "Why not pass (reason class)",
            per_second,
            series(recording, rates(verdicts, "reason_class", skip="ok")),
            True,
        ),
        (
            "Actions taken",
            per_second,
            series(recording, rates(actions, "action", skip="accept")),
            True,
        ),
        (
            "DNS lookup latency by record type",
            "ms (log)",
            windowed_quantiles(recording, "mtls_milter_dns_lookup_seconds", "rrtype"),
            False,
        ),
        ("Evaluation and message time", "ms (log)", _time_panel(recording), False),
        (
            "DNS cache lookups",
            "lookups/s",
            series(recording, rates("mtls_milter_dns_cache_lookups_total", "outcome")),
            True,
        ),
    ]


def draw(recording: Recording, png: Path) -> None:
    """The six main panels into ``png``, the outage shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.style.use("dark_background")
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(3, 2, figsize=(14, 11), constrained_layout=True)
    figure.suptitle("mtls-milter: bench/bench_metrics.py (a resolver outage in the shaded part)")
    for ax, (title, unit, (xs, lines), stacked) in zip(axes.flat, panels(recording), strict=True):
        ax.set_title(title, loc="left")
        ax.set_ylabel(unit)
        ax.set_xlabel("seconds")
        ax.axvspan(*recording.outage, color="tab:red", alpha=0.12)
        if recording.length:
            ax.set_xlim(0, recording.length)
        ax.grid(alpha=0.2)
        # a series that never moved (a label child created in advance) is left out
        names = sorted(n for n, line in lines.items() if any(v > 0 for v in line))
        if stacked and names:
            colors = [COLORS.get(n, cycle[i % len(cycle)]) for i, n in enumerate(names)]
            ax.stackplot(xs, [lines[n] for n in names], labels=names, colors=colors, alpha=0.85)
        else:
            for name in names:
                ax.plot(xs, lines[name], label=name, linewidth=1.2)
            if unit.endswith("(log)"):
                ax.set_yscale("log")
        if names:
            ax.legend(loc="upper left", fontsize=7, ncol=2, framealpha=0.4)
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=80)
    plt.close(figure)


def _time_panel(recording: Recording) -> Lines:
    xs, evaluation = windowed_quantiles(recording, "mtls_milter_evaluation_seconds", None)
    _, message = windowed_quantiles(recording, "mtls_milter_message_seconds", None)
    lines = {f"evaluation {k}": v for k, v in evaluation.items()}
    lines |= {f"message {k}": v for k, v in message.items()}
    return xs, lines
