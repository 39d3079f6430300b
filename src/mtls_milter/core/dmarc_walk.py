"""The RFC 9989 DNS tree walk: policy discovery and the organizational domain, without a PSL.

From a domain, the walk queries ``_dmarc.<domain>``, then (if the name has more than
:data:`MAX_LABELS` labels) jumps to its last seven labels, then removes one label at a time up
to the top-level domain: at most :data:`MAX_WALK_QUERIES` queries. It stops early at a record
with ``psd=n``. TXT records that are not DMARC records are discarded; several DMARC records at
one name are all discarded (RFC 9989). Answers come from the injected resolver (whose cache keeps
them for their TTL) inside the message's DNS budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtls_milter.core.clock import Clock
from mtls_milter.core.dmarc_record import DmarcRecord, is_dmarc_record, parse_record
from mtls_milter.core.lookups import LookupStatus, TxtResolver

__all__ = [
    "MAX_LABELS",
    "MAX_WALK_QUERIES",
    "Budget",
    "Found",
    "Walk",
    "organizational_domain",
    "tree_walk",
    "walk_targets",
]

MAX_LABELS = 7
MAX_WALK_QUERIES = 8


class Budget:
    """Seconds of DNS time left for one message, measured on the injected clock."""

    __slots__ = ("_clock", "_deadline")

    def __init__(self, clock: Clock, seconds: float) -> None:
        self._clock = clock
        self._deadline = clock.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left (≤ 0 when spent)."""
        return self._deadline - self._clock.monotonic()


@dataclass(frozen=True, slots=True)
class Found:
    """A DMARC policy record and the domain it was published for."""

    domain: str
    record: DmarcRecord


@dataclass(frozen=True, slots=True)
class Walk:
    """The records met on the way up, nearest first; ``error`` is a DNS failure's detail."""

    domain: str
    found: tuple[Found, ...] = ()
    error: str = ""
    queries: int = 0


def walk_targets(domain: str) -> list[str]:
    """The domains a walk from ``domain`` may query, in order (at most MAX_WALK_QUERIES)."""
    labels = domain.split(".")
    targets = [domain]
    if len(labels) > MAX_LABELS + 1:
        labels = labels[-MAX_LABELS:]
        targets.append(".".join(labels))
    else:
        labels = labels[1:]
        if labels:
            targets.append(".".join(labels))
    while len(labels) > 1:
        labels = labels[1:]
        targets.append(".".join(labels))
    return targets


def tree_walk(domain: str, resolver: TxtResolver, budget: Budget) -> Walk:
    """Walk from ``domain`` up; stop at ``psd=n`` or the top. Never raises."""
    found: list[Found] = []
    queries = 0
    for target in walk_targets(domain):
        queries += 1
        lookup = resolver.txt("_dmarc." + target, budget.remaining())
        if lookup.status is LookupStatus.TEMPFAIL:
            return Walk(domain, tuple(found), f"_dmarc.{target}: {lookup.detail}", queries)
        if lookup.status is not LookupStatus.OK:
            continue
        candidates = [raw for raw in lookup.records if is_dmarc_record(raw)]
        if len(candidates) != 1:
            continue  # none, or several: all discarded
        record = parse_record(candidates[0])
        if record is None:
            continue
        found.append(Found(target, record))
        if record.psd == "n":
            break
    return Walk(domain, tuple(found), "", queries)


def organizational_domain(walk: Walk) -> str:
    """The organizational domain of ``walk.domain`` (RFC 9989): the record with the fewest
    labels; one label below it when that record says ``psd=y``; the domain itself when no
    record was found."""
    if not walk.found:
        return walk.domain
    top = walk.found[-1]
    if top.record.psd != "y":
        return top.domain
    if top.domain == walk.domain:
        return walk.domain  # the domain is itself a public suffix domain
    depth = top.domain.count(".") + 2  # labels of the name one below the PSD
    return ".".join(walk.domain.split(".")[-depth:])
