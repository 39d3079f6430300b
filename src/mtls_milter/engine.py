"""The engine: the core wired to real collaborators (resolver, validator, clock) for one config.

Adapters build one Engine at start-up (and a new one on reload) and call :meth:`evaluate`.
Building is where the trust store is read and the resolver set up, so nothing of that happens
per message.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtls_milter.config import Config
from mtls_milter.core.certs import ChainValidator, load_trust_anchors
from mtls_milter.core.clock import Clock, SystemClock
from mtls_milter.core.dns import DnsResolver, MxResolver
from mtls_milter.core.evaluate import Transaction, Verdict, evaluate
from mtls_milter.core.evidence import Evidence


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

    def evaluate(self, transaction: Transaction, evidence: Evidence) -> Verdict:
        """Evaluate one transaction with this engine's collaborators."""
        return evaluate(
            transaction, evidence, self.config, self.resolver, self.validator, self.clock
        )
