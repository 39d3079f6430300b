"""The engine: the core wired to real collaborators (resolver, validator, clock) for one config.

Adapters build one Engine at start-up (and a new one on reload) and call :meth:`evaluate`.
Building is where the trust store is read and the resolver set up, so nothing of that happens
per message. :meth:`Engine.evaluate` is the one boundary where an unexpected exception inside
the evaluation becomes a verdict: ``temperror``, never ``fail``, so a defect cannot reject mail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

from mtls_milter.config import Config
from mtls_milter.core.chain import ChainValidator
from mtls_milter.core.clock import Clock, SystemClock
from mtls_milter.core.dmarc import DmarcResult, decide, dmarc_method
from mtls_milter.core.dmarc_message import DmarcOutcome, MessageFacts, dmarc_for_message
from mtls_milter.core.evaluate import Result, Transaction, Verdict, evaluate
from mtls_milter.core.evidence import Evidence
from mtls_milter.core.lookups import HostLookup, MxResolver
from mtls_milter.core.names import SenderKind, parse_mail_from
from mtls_milter.core.spf_input import SpfResolver
from mtls_milter.net.dns import DnsResolver
from mtls_milter.net.trust import load_trust_anchors

log = logging.getLogger("mtls_milter.engine")


@dataclass(frozen=True, slots=True)
class Engine:
    """A configuration together with the resolver, validator and clock it implies."""

    config: Config
    resolver: MxResolver
    validator: ChainValidator
    clock: Clock
    trust_sources: tuple[str, ...] = ()  # for logs: where the trust anchors came from

    @classmethod
    def from_config(cls, config: Config, clock: Clock | None = None) -> Engine:
        """Read the trust anchors and set up the resolver; raises on unusable trust sources."""
        anchors = load_trust_anchors(config.tls.trust)
        return cls(
            config=config,
            resolver=DnsResolver.from_config(config.dns),
            validator=ChainValidator(anchors, config.tls.eku, min_rsa_bits=config.tls.min_rsa_bits),
            clock=clock or SystemClock(),
            trust_sources=anchors.sources,
        )

    def evaluate(
        self, transaction: Transaction, evidence: Evidence, *, client_mx: HostLookup | None = None
    ) -> Verdict:
        """Evaluate one transaction with this engine's collaborators. Never raises.

        An unexpected exception (a bug, or a collaborator that failed) gives
        ``temperror`` with reason ``internal error: <exception type>`` and one log line with
        the traceback.
        """
        try:
            return evaluate(
                transaction,
                evidence,
                self.config,
                self.resolver,
                self.validator,
                self.clock,
                client_mx=client_mx,
            )
        except Exception as exc:
            verdict = internal_error(exc, transaction)
            log.error("internal error evaluating a transaction: %s", verdict.reason, exc_info=True)
            return verdict

    def dmarc(
        self,
        facts: MessageFacts,
        verdict: Verdict,
        *,
        budget_seconds: float | None = None,
        internal: bool = False,
    ) -> DmarcOutcome:
        """DMARC for one message after its mtls ``verdict`` (docs/dmarc.md). Never raises: an
        unexpected exception gives ``dmarc=temperror`` (no action) and one log line."""
        budget = self.config.dns.budget if budget_seconds is None else budget_seconds
        try:
            if not hasattr(self.resolver, "txt"):
                raise TypeError("the resolver has no TXT lookups")
            resolver = cast(SpfResolver, self.resolver)
            return dmarc_for_message(
                facts,
                verdict,
                self.config,
                resolver,
                self.clock,
                budget_seconds=budget,
                internal=internal,
            )
        except Exception as exc:
            log.error("internal error evaluating DMARC: %s", type(exc).__name__, exc_info=True)
            result = DmarcResult("temperror", reason=f"internal error: {type(exc).__name__}")
            decision = decide(result, enforce=False, dry_run=True)
            return DmarcOutcome(result, decision, (dmarc_method(result),))


def internal_error(exc: BaseException, transaction: Transaction) -> Verdict:
    """The verdict for an evaluation that failed inside the product: ``temperror``."""
    reason = f"internal error: {type(exc).__name__}"
    try:
        sender = parse_mail_from(transaction.mail_from)
    except Exception:  # the verdict must not depend on the code that may be at fault
        return Verdict(Result.TEMPERROR, reason)
    domain = sender.domain if sender.kind is SenderKind.DOMAIN else ""
    return Verdict(Result.TEMPERROR, reason, domain)
