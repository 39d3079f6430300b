"""Reading the milter's verdict log line back: ``... verdict {json}`` → :class:`LoggedVerdict`.

The daemon writes one line per judged message (``INFO mtls_milter: verdict {...}``); journald,
syslog or a log file put their own prefix in front. Everything in such a line is outside data
(an attacker chooses the MAIL FROM, the HELO name and the certificate names it records), so this
parser checks every field it uses and raises :class:`InputError` with a one-line reason for
anything else: it never lets another exception out.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from mtls_milter.core.evaluate import Result
from mtls_milter.core.evidence import EvidenceKind
from mtls_milter.core.quote import clip, quote
from mtls_milter.errors import InputError

MARKER = "verdict {"  # --log-format text: "INFO mtls_milter: verdict {...}"
# --log-format json: one object per record, the verdict's fields are its members
_JSON_MARKER = re.compile(r'"message"\s*:\s*"verdict"')
MAX_LINE = 256 * 1024  # characters; a verdict line is a few hundred

# The time a log writer puts first: RFC 3339 (journalctl -o short-iso, rsyslog's high-precision
# format) or the traditional syslog "Mon DD HH:MM:SS".
_TIME = re.compile(
    r"\s*(?:<\d{1,3}>)?"
    r"(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?"
    r"|[A-Z][a-z]{2} [ \d]\d \d{2}:\d{2}:\d{2})(?=\s)"
)


@dataclass(frozen=True, slots=True)
class LoggedVerdict:
    """The fields of one verdict line that ``explain`` uses (defaults: not in the line)."""

    domain: str
    result: Result
    reason: str
    time: str = ""  # as the log writer spelled it, "" when the line has no time
    queue_id: str = ""
    client: str = ""
    helo: str = ""
    evidence: EvidenceKind = EvidenceKind.NONE
    names: tuple[str, ...] = ()
    matched: str = ""
    chain: str = ""
    action: str = ""
    dry_run: bool = False
    hosts: tuple[str, ...] | None = None  # None: the line does not record the published hosts
    hosts_count: int | None = None  # how many there were (the line lists the first ten)
    ttl: int | None = None
    fingerprint_source: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    dmarc: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with every outside value clipped to printable ASCII."""
        return {
            "time": self.time or None,
            "queue_id": clip(self.queue_id),
            "client": clip(self.client),
            "helo": clip(self.helo),
            "domain": clip(self.domain),
            "result": self.result.value,
            "reason": clip(self.reason, 400),
            "evidence": self.evidence.value,
            "names": [clip(n) for n in self.names],
            "matched": clip(self.matched) or None,
            "chain": clip(self.chain) or None,
            "action": clip(self.action) or None,
            "dry_run": self.dry_run,
            "hosts": None if self.hosts is None else [clip(h) for h in self.hosts],
            "hosts_count": self.hosts_count,
            "ttl": self.ttl,
            "fingerprint_source": clip(self.fingerprint_source) or None,
            "timings_ms": dict(self.timings_ms),
        }


def has_verdict(line: str) -> bool:
    """Whether ``line`` looks like a verdict line (cheap; :func:`parse_verdict_line` decides)."""
    return MARKER in line or _JSON_MARKER.search(line) is not None


def parse_verdict_line(line: str) -> LoggedVerdict:
    """The verdict in one log line; :class:`InputError` (one line of text) for anything else.

    Both log formats: ``verdict {...}`` (``--log-format text``) and one JSON object whose
    ``message`` is ``verdict`` with the fields as members (``--log-format json``).
    """
    if len(line) > MAX_LINE:
        raise InputError(f"the line is longer than {MAX_LINE} characters")
    start = line.find(MARKER)
    if start >= 0:
        record = _json_object(line, start + len(MARKER) - 1)
    else:
        start = line.find("{")
        if start < 0 or not _JSON_MARKER.search(line):
            raise InputError("no 'verdict {' in the line: not a verdict line of mtls-milter")
        record = _json_object(line, start)
        if record.get("message") != "verdict":
            raise InputError("the line's JSON object is not a verdict (message is not 'verdict')")
    time_match = _TIME.match(line[:start])
    return _from_record(record, time_match.group(1) if time_match else "")


def _json_object(line: str, start: int) -> dict[str, Any]:
    try:
        record, end = json.JSONDecoder().raw_decode(line, start)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        why = clip(str(exc), 120)
        raise InputError(f"the verdict's JSON is broken or cut off: {why}") from None
    if line[end:].strip():
        raise InputError(f"text after the verdict's JSON: {quote(line[end:].strip(), 60)}")
    if not isinstance(record, dict):
        raise InputError("the verdict is not a JSON object")
    return record


def _from_record(record: dict[str, Any], time: str) -> LoggedVerdict:
    result = _text(record, "result", required=True)
    try:
        outcome = Result(result)
    except ValueError:
        raise InputError(f"'result' is not an mtls result: {quote(result, 40)}") from None
    evidence = _text(record, "evidence") or EvidenceKind.NONE.value
    try:
        kind = EvidenceKind(evidence)
    except ValueError:
        raise InputError(f"'evidence' is not chain, mta or none: {quote(evidence, 40)}") from None
    hosts = _texts(record, "hosts") if record.get("hosts") is not None else None
    return LoggedVerdict(
        domain=_text(record, "domain", required=True),
        result=outcome,
        reason=_text(record, "reason", required=True),
        time=time,
        queue_id=_text(record, "queue_id"),
        client=_text(record, "client"),
        helo=_text(record, "helo"),
        evidence=kind,
        names=_texts(record, "names"),
        matched=_text(record, "matched"),
        chain=_text(record, "chain"),
        action=_text(record, "action"),
        dry_run=_flag(record, "dry_run"),
        hosts=hosts,
        hosts_count=_count(record, "hosts_count"),
        ttl=_count(record, "ttl"),
        fingerprint_source=_text(record, "fingerprint_source"),
        timings_ms=_timings(record),
        dmarc=_object(record, "dmarc"),
    )


def _text(record: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        missing = "missing" if value is None else "not a string"
        raise InputError(f"the verdict's '{key}' is {missing}")
    return value


def _texts(record: dict[str, Any], key: str) -> tuple[str, ...]:
    value = record.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"the verdict's '{key}' is not a list of strings")
    return tuple(value)


def _flag(record: dict[str, Any], key: str) -> bool:
    value = record.get(key, False)
    if not isinstance(value, bool):
        raise InputError(f"the verdict's '{key}' is not true or false")
    return value


def _number(value: object) -> TypeGuard[int | float]:
    """A finite JSON number (Python's json also reads NaN and Infinity)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float: no count or timing we wrote
        return False


def _count(record: dict[str, Any], key: str) -> int | None:
    value = record.get(key)
    if value is None:
        return None
    if not _number(value) or value < 0:
        raise InputError(f"the verdict's '{key}' is not a number")
    return int(value)


def _timings(record: dict[str, Any]) -> dict[str, float]:
    value = _object(record, "timings_ms")
    if not all(_number(v) for v in value.values()):
        raise InputError("the verdict's 'timings_ms' holds a value that is not a number")
    return {clip(k, 40): float(v) for k, v in value.items()}


def _object(record: dict[str, Any], key: str) -> dict[str, Any]:
    value = record.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"the verdict's '{key}' is not a JSON object")
    return value
