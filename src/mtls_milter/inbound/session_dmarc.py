"""DMARC at end of message for :class:`~.session.MilterSession` (docs/dmarc.md).

With ``[dmarc] enabled`` a transaction collects the From and Authentication-Results fields (and
the raw message when DKIM is verified here); at end of message, after the mtls verdict, DMARC is
evaluated within what is left of the DNS budget. DMARC never weakens the mtls action: it acts
(reject or quarantine) only when the mtls decision lets the message through.
"""

from __future__ import annotations

import time
from typing import Any

from mtls_milter.config import Config
from mtls_milter.core.dmarc import DmarcAction
from mtls_milter.core.dmarc_message import DmarcOutcome, MessageCollector
from mtls_milter.core.evaluate import Verdict
from mtls_milter.core.quote import clip
from mtls_milter.inbound.session_evidence import Transaction


def collector_for(config: Config) -> MessageCollector | None:
    """What a new transaction collects for DMARC; None when DMARC is off."""
    if not config.dmarc.enabled:
        return None
    return MessageCollector(keep_message=config.dmarc.dkim == "verify")


def wants_body(config: Config) -> bool:
    """Whether the MTA must send the body: only for DKIM verified here."""
    return config.dmarc.enabled and config.dmarc.dkim == "verify"


def dmarc_outcome(
    tx: Transaction, collector: MessageCollector, verdict: Verdict, eom_started: float
) -> DmarcOutcome:
    """DMARC for the message, within the DNS budget left after the mtls evaluation."""
    engine = tx.engine
    spent = time.monotonic() - eom_started
    remaining = max(engine.config.dns.budget - spent, 0.0)
    facts = collector.facts(tx.client_addr, tx.mail_from, tx.helo)
    return engine.dmarc(facts, verdict, budget_seconds=remaining)


def combined_action(mtls_action: str, dmarc: DmarcOutcome | None) -> str:
    """The message's action: an mtls reject or tempfail stands; otherwise DMARC's."""
    if mtls_action != "accept" or dmarc is None:
        return mtls_action
    if dmarc.decision.action is DmarcAction.REJECT:
        return "reject"
    if dmarc.decision.action is DmarcAction.QUARANTINE:
        return "quarantine"
    return mtls_action


def log_object(dmarc: DmarcOutcome) -> dict[str, Any]:
    """The verdict log line's ``dmarc`` object."""
    result = dmarc.result
    return {
        "result": result.result,
        "policy": result.policy or None,
        "domain": clip(result.domain) or None,
        "aligned": list(result.aligned),
        "reason": clip(result.reason),
        "action": dmarc.decision.action.value,
        "why": clip(dmarc.decision.why),
    }
