"""The verdict log line: what was decided, from what evidence, and how long each part took.

One line per judged message (docs/operations.md lists the fields): the result and reason, the
host names compared with (at most ten, plus their count), the Client MX TTL when the lookup
reports one, where the certificate fingerprint came from, and ``timings_ms`` for the DNS
lookup, the chain fetch and the whole message. :class:`JsonText` encodes the fields only when a
text formatter asks for them; ``--log-format json`` writes them as members of the line's object.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from dataclasses import dataclass

from mtls_milter.core.evaluate import Verdict
from mtls_milter.core.lookups import HostLookup
from mtls_milter.core.quote import clip
from mtls_milter.inbound.session_evidence import Transaction

MAX_LOGGED_HOSTS = 10
MAX_DETAIL = 400  # the chain detail is our text around quotes of at most 200 characters
_ENCODER = json.JSONEncoder(separators=(",", ":"))


@dataclass
class MessageClock:
    """When one message's lookups finished, for the log line's ``timings_ms`` (0: not yet)."""

    dns_done: float = 0.0  # the Client MX answer arrived (stays 0 when it was cached)
    chain_started: float = 0.0
    chain_done: float = 0.0

    def dns_finished(self, future: object) -> None:
        self.dns_done = time.monotonic()

    def chain_finished(self, future: object) -> None:
        self.chain_done = time.monotonic()


class JsonText:
    """Encodes its fields only if a formatter asks for the text (the text log format)."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, object]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return _ENCODER.encode(self.fields)


def log_fields(
    tx: Transaction,
    verdict: Verdict,
    action: str,
    dry_run: bool,
    clock: MessageClock,
    decided: float,
) -> dict[str, object]:
    """The verdict line: what was decided, from what, and how long each part took."""
    hosts = [clip(h) for h in verdict.hosts[:MAX_LOGGED_HOSTS]]
    held = _answer(tx.prefetch)
    ttl = getattr(held, "ttl", None)
    return {
        "queue_id": clip(tx.macros.get("i") or ""),
        "client": clip(tx.client_addr),
        "helo": clip(tx.helo),
        "domain": verdict.domain,
        "result": verdict.result.value,
        "reason": verdict.reason,
        "evidence": verdict.evidence.value,
        "names": list(verdict.names),
        "matched": verdict.matched,
        "hosts": hosts,
        "hosts_count": len(verdict.hosts),
        "ttl": ttl if isinstance(ttl, int) else None,
        "fingerprint_source": _fingerprint_source(tx),
        "chain": clip(tx.chain_detail, MAX_DETAIL),
        "action": action,
        "dry_run": dry_run,
        "elapsed_ms": round((decided - tx.started) * 1000, 2),
        "timings_ms": _timings_ms(tx, clock, decided),
    }


def _answer(prefetch: Future[HostLookup] | None) -> HostLookup | None:
    """The Client MX answer if the lookup finished with one (not failed, not cancelled)."""
    if prefetch is None or not prefetch.done() or prefetch.cancelled():
        return None
    if prefetch.exception() is not None:
        return None
    return prefetch.result()


def _fingerprint_source(tx: Transaction) -> str:
    """Where the client certificate's fingerprint came from: ``macro`` (Sendmail's
    {cert_fp}/{cert_md5}), ``policy_service`` (Postfix's policy request) or ``none``."""
    macro = tx.macro_session
    if macro is not None and (macro.fingerprint or macro.fingerprint_md5):
        return "macro"
    if tx.session is not None and (tx.session.fingerprint or tx.session.fingerprint_md5):
        return "policy_service"
    return "none"


def _timings_ms(tx: Transaction, clock: MessageClock, decided: float) -> dict[str, float]:
    """``dns``: MAIL FROM to the Client MX answer (0 when cached or not looked up; up to the
    decision when it never came); ``chain``: the chain fetch; ``total``: MAIL FROM to the
    decision."""
    dns = 0.0
    if tx.prefetch is not None and not clock.dns_done and not tx.prefetch.done():
        dns = decided - tx.started
    elif clock.dns_done:
        dns = clock.dns_done - tx.started
    chain = 0.0
    if clock.chain_started:
        chain = (clock.chain_done or decided) - clock.chain_started
    return {
        "dns": round(max(dns, 0.0) * 1000, 2),
        "chain": round(max(chain, 0.0) * 1000, 2),
        "total": round((decided - tx.started) * 1000, 2),
    }
