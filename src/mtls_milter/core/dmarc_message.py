"""DMARC for one message: gather the inputs the configuration asks for, evaluate, decide.

This is the one call a transport makes at end of message (after the mtls verdict), and the one
``check --message`` makes offline. Inputs per ``[dmarc] spf`` / ``[dmarc] dkim``: ``verify``
(pyspf / dkimpy through the resolver), ``trusted-results`` (Authentication-Results fields of
``trusted_authserv_ids``), ``off``. The mtls verdict is an identifier when it is about the MAIL
FROM domain (not the HELO fallback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtls_milter.config import Config
from mtls_milter.core.clock import Clock
from mtls_milter.core.dkim_input import verify_dkim
from mtls_milter.core.dmarc import (
    DmarcDecision,
    DmarcResult,
    Identifier,
    decide,
    dmarc_method,
    evaluate_dmarc,
    identifier_method,
)
from mtls_milter.core.dmarc_walk import Budget
from mtls_milter.core.evaluate import Verdict
from mtls_milter.core.header import METHOD, MethodResult
from mtls_milter.core.spf_input import SpfResolver, verify_spf
from mtls_milter.core.trusted_results import trusted_identifiers

__all__ = [
    "MAX_DKIM_MESSAGE",
    "DmarcOutcome",
    "MessageCollector",
    "MessageFacts",
    "dmarc_for_message",
    "our_methods",
]


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What DMARC needs from one message besides the mtls verdict."""

    from_fields: list[str | bytes]  # values of every From field, in order
    results_fields: list[str] = field(default_factory=list)  # existing Authentication-Results
    raw_message: bytes = b""  # header + body as received, for DKIM "verify" (else unused)
    client_ip: str = ""  # for SPF "verify"; empty: SPF is not checked
    mail_from: str = ""
    helo: str = ""


@dataclass(frozen=True, slots=True)
class DmarcOutcome:
    """The DMARC result, the header results to add after ``mtls=``, and the action."""

    result: DmarcResult
    decision: DmarcDecision
    methods: tuple[MethodResult, ...] = ()  # for MtlsField.more
    spf: Identifier | None = None  # verified here
    dkim: tuple[Identifier, ...] = ()  # verified here

    def as_dict(self) -> dict[str, Any]:
        """The ``check --json`` ``dmarc`` object."""
        out: dict[str, Any] = self.result.as_dict()
        out["action"] = self.decision.action.value
        if self.spf is not None:
            out["spf"] = {"result": self.spf.result, "domain": self.spf.domain}
        if self.dkim:
            out["dkim"] = [
                {"result": d.result, "domain": d.domain, "selector": d.selector} for d in self.dkim
            ]
        return out


def our_methods(config: Config) -> frozenset[str]:
    """The methods our field carries, so forged fields claiming our id with them are deleted."""
    if not config.dmarc.enabled:
        return frozenset({METHOD})
    verified = {m for m in ("spf", "dkim") if getattr(config.dmarc, m) == "verify"}
    return frozenset({METHOD, "dmarc", *verified})


def dmarc_for_message(
    facts: MessageFacts,
    verdict: Verdict,
    config: Config,
    resolver: SpfResolver,
    clock: Clock,
    *,
    budget_seconds: float,
    internal: bool = False,
) -> DmarcOutcome:
    """Evaluate DMARC for a message; ``internal``: the client is in ``internal_networks``."""
    budget = Budget(clock, budget_seconds)
    identifiers: list[Identifier] = []
    if verdict.identity == "mailfrom" and verdict.domain:
        identifiers.append(Identifier("mtls", verdict.result.value, verdict.domain))
    spf, dkim_ids = _verified(facts, config, resolver, budget)
    identifiers += ([spf] if spf else []) + list(dkim_ids)
    trusted_methods = frozenset(
        m for m in ("spf", "dkim") if getattr(config.dmarc, m) == "trusted-results"
    )
    if trusted_methods:
        identifiers += trusted_identifiers(
            facts.results_fields, config.dmarc.trusted_authserv_ids, trusted_methods
        )
    result = evaluate_dmarc(
        facts.from_fields, tuple(identifiers), resolver, clock, max(budget.remaining(), 0.0)
    )
    decision = decide(
        result, enforce=config.dmarc.enforce, dry_run=config.policy.dry_run or internal
    )
    methods = [identifier_method(i) for i in ([spf] if spf else []) + list(dkim_ids)]
    methods.append(dmarc_method(result))
    return DmarcOutcome(result, decision, tuple(methods), spf, dkim_ids)


def _verified(
    facts: MessageFacts, config: Config, resolver: SpfResolver, budget: Budget
) -> tuple[Identifier | None, tuple[Identifier, ...]]:
    spf = None
    if config.dmarc.spf == "verify" and facts.client_ip:
        spf = verify_spf(facts.client_ip, facts.mail_from, facts.helo, resolver, budget)
    dkim_ids: tuple[Identifier, ...] = ()
    if config.dmarc.dkim == "verify" and facts.raw_message:
        dkim_ids = verify_dkim(facts.raw_message, resolver, budget)
    return spf, dkim_ids


MAX_DKIM_MESSAGE = 4 * 1024 * 1024
"""Messages larger than this (header + body) are not DKIM-verified: their signatures give no
identifier, so DMARC rests on SPF and mtls. Bounds the memory a message can hold."""


class MessageCollector:
    """Collects what DMARC needs from a transport's header and body callbacks.

    ``header`` gets each field as the MTA passes it (the value without the blank after the
    colon, folded lines with "\\n"); the raw message for DKIM is rebuilt as ``Name: value``
    with CRLF line ends. This matches relaxed header canonicalization exactly; a signature
    with ``simple`` header canonicalization over a field whose spacing differs may fail.
    """

    def __init__(self, *, keep_message: bool) -> None:
        self.from_fields: list[str | bytes] = []
        self.results_fields: list[str] = []
        self._keep = keep_message
        self._parts: list[bytes] = []
        self._size = 0
        self._in_body = False

    def header(self, name: str, value: str) -> None:
        """One header field (``value`` may hold surrogate escapes for bytes not UTF-8)."""
        lower = name.lower()
        if lower == "from":
            self.from_fields.append(value)
        elif lower == "authentication-results":
            self.results_fields.append(value)
        if self._keep:
            line = f"{name}: {value}".replace("\r\n", "\n").replace("\n", "\r\n") + "\r\n"
            self._add(line.encode("utf-8", "surrogateescape"))

    def body(self, chunk: bytes) -> None:
        """A piece of the body, as the MTA sends it (CRLF line ends)."""
        if self._keep:
            if not self._in_body:
                self._in_body = True
                self._add(b"\r\n")  # the empty line between header and body
            self._add(chunk)

    def _add(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_DKIM_MESSAGE:
            self._keep = False
            self._parts = []
        else:
            self._parts.append(data)

    def facts(self, client_ip: str, mail_from: str, helo: str) -> MessageFacts:
        """The facts for :func:`dmarc_for_message` / ``Engine.dmarc``."""
        raw = b"".join(self._parts) if self._keep else b""
        if raw and not self._in_body:
            raw += b"\r\n"  # a message without a body still ends its header
        return MessageFacts(
            list(self.from_fields), list(self.results_fields), raw, client_ip, mail_from, helo
        )
