"""DMARC policy records (RFC 9989): a strict tag-value parser that never raises.

A TXT record is a DMARC policy record only if it starts with ``v=DMARC1`` (RFC 9989 policy
discovery discards every other TXT record at ``_dmarc.<domain>``). Within a DMARC record, tags we
do not know are ignored and a known tag with an invalid value falls back to its default, as RFC
9989 asks; each such case is noted in ``warnings`` so ``check`` can show it. A missing or invalid
``p=`` is treated as ``p=none``. Why a parser of our own instead of a library: see
docs/design.md ("DMARC").
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import StrEnum

from mtls_milter.core.quote import quote

__all__ = ["MAX_RECORD_LEN", "DmarcRecord", "Policy", "is_dmarc_record", "parse_record"]

MAX_RECORD_LEN = 4096
"""Longer records are parsed up to this many characters (a warning says so); no real record
comes near it, and the bound keeps a 64 kB TXT answer from costing more than a short one."""
MAX_WARNINGS = 8
CACHED_RECORD_LEN = 512  # shorter records' parses are kept (1024 of them: at most 512 kB)

_VERSION = re.compile(rb"\s*v\s*=\s*DMARC1\s*(?:;|$)")
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_KNOWN_IGNORED = frozenset({"rua", "ruf", "fo", "rf", "ri", "pct"})  # reports; pct is RFC 7489's


class Policy(StrEnum):
    """What a domain owner asks receivers to do with failing mail."""

    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """The tags of one DMARC policy record that decide a result and an action."""

    p: Policy = Policy.NONE
    sp: Policy | None = None  # None: inherit p
    np: Policy | None = None  # None: inherit sp, then p
    psd: str = "u"  # "y" public suffix domain, "n" organizational domain, "u" unknown
    testing: bool = False  # t=y
    adkim: str = "r"
    aspf: str = "r"
    warnings: tuple[str, ...] = ()


def is_dmarc_record(raw: bytes) -> bool:
    """Whether a TXT record's text starts with the DMARC version tag ``v=DMARC1``."""
    return _VERSION.match(raw) is not None


def parse_record(raw: bytes) -> DmarcRecord | None:
    """The record's tags, or None when ``raw`` is not a DMARC record. Never raises."""
    if len(raw) <= CACHED_RECORD_LEN:
        return _parse_cached(raw)  # the same few records come with every message
    return _parse(raw)


@functools.lru_cache(maxsize=1024)
def _parse_cached(raw: bytes) -> DmarcRecord | None:
    return _parse(raw)


def _parse(raw: bytes) -> DmarcRecord | None:
    if not is_dmarc_record(raw):
        return None
    warnings: list[str] = []
    if len(raw) > MAX_RECORD_LEN:
        warnings.append(f"record of {len(raw)} bytes read up to {MAX_RECORD_LEN}")
    text = raw[:MAX_RECORD_LEN].decode("ascii", errors="replace")
    tags: dict[str, str] = {}
    for spec in text.split(";")[1:]:
        if not spec.strip():
            continue  # a trailing or doubled ";"
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not sep or not _TAG_NAME.fullmatch(name):
            warnings.append(f"malformed tag {quote(spec.strip(), 40)} ignored")
            continue
        name = name.lower()
        if name in tags:
            warnings.append(f"repeated tag {name}= ignored")
            continue
        tags[name] = value.strip()
    return _record_from_tags(tags, warnings)


def _record_from_tags(tags: dict[str, str], warnings: list[str]) -> DmarcRecord:
    def choice(name: str, allowed: tuple[str, ...], default: str) -> str:
        value = tags.pop(name, None)
        if value is None:
            return default
        if value.lower() in allowed:
            return value.lower()
        warnings.append(f"invalid {name}={quote(value, 40)} ignored")
        return default

    policies = tuple(item.value for item in Policy)
    p = choice("p", policies, "none")
    sp = choice("sp", policies, "")
    np = choice("np", policies, "")
    record = DmarcRecord(
        p=Policy(p),
        sp=Policy(sp) if sp else None,
        np=Policy(np) if np else None,
        psd=choice("psd", ("y", "n", "u"), "u"),
        testing=choice("t", ("y", "n"), "n") == "y",
        adkim=choice("adkim", ("r", "s"), "r"),
        aspf=choice("aspf", ("r", "s"), "r"),
    )
    unknown = sorted(set(tags) - _KNOWN_IGNORED)
    if unknown:
        warnings.append("unknown tags ignored: " + ", ".join(quote(t, 20) for t in unknown[:5]))
    if not warnings:
        return record
    return DmarcRecord(
        record.p,
        record.sp,
        record.np,
        record.psd,
        record.testing,
        record.adkim,
        record.aspf,
        tuple(warnings[:MAX_WARNINGS]),
    )
