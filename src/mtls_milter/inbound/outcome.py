"""What a session answers at end of message: the action's outcome and our header field.

:class:`Outcome` is the transport-neutral answer; :func:`action_outcome` turns the decided
actions into it, :func:`guarded_headers` the verdict into header changes (forged fields of ours
deleted, ours inserted on top). The rendered value of our field is kept per (verdict,
authserv-id) while the engine stays (inbound/verdict_memo.py): the same sender over the same
TLS facts gets the same text.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, replace

from mtls_milter.core.dmarc_message import DmarcOutcome, our_methods
from mtls_milter.core.evaluate import Verdict
from mtls_milter.core.header import HEADER_NAME, fields_to_delete, render_folded
from mtls_milter.inbound.session_dmarc import combined_action
from mtls_milter.inbound.session_evidence import Transaction, reply_text
from mtls_milter.inbound.verdict_memo import HEADER_VALUES

log = logging.getLogger("mtls_milter")

REPLY_REJECT = ("550", "5.7.1")
REPLY_TEMPFAIL = ("451", "4.7.0")


@dataclass(frozen=True)
class HeaderChange:
    """One header change: delete the ``index``-th (from 1) field called ``name``, or insert a
    field at position ``index`` (0: at the top)."""

    name: str
    index: int
    value: str = ""
    delete: bool = False


@dataclass(frozen=True)
class Outcome:
    """A transport-neutral answer: ``continue``, ``accept``, ``reject`` or ``tempfail``; for the
    last two an SMTP reply (code, enhanced code, text); header changes in the order to apply;
    ``quarantine``: put the accepted message on hold with this reason (DMARC)."""

    action: str = "continue"
    reply: tuple[str, str, str] | None = None
    headers: tuple[HeaderChange, ...] = ()
    quarantine: str = ""


CONTINUE = Outcome()
ACCEPT = Outcome("accept")


def action_outcome(mtls_action: str, verdict: Verdict, dmarc: DmarcOutcome | None) -> Outcome:
    """The answer for the decided actions: the mtls reject or tempfail, else DMARC's."""
    if mtls_action != "accept":
        code, xcode = REPLY_REJECT if mtls_action == "reject" else REPLY_TEMPFAIL
        return Outcome(mtls_action, (code, xcode, reply_text(verdict)))
    action = combined_action(mtls_action, dmarc)
    if action == "reject" and dmarc is not None:
        return Outcome("reject", dmarc.decision.reply)
    if action == "quarantine" and dmarc is not None:
        return Outcome("accept", quarantine=dmarc.decision.why)
    return ACCEPT


def guarded_headers(
    tx: Transaction, verdict: Verdict, dmarc: DmarcOutcome | None = None
) -> tuple[HeaderChange, ...]:
    """Forged fields to delete (descending, so earlier indexes stay valid), then ours on top."""
    try:
        config = tx.engine.config
        authserv_id = config.milter.authserv_id or tx.macros.get("j") or socket.gethostname()
        forged = fields_to_delete(
            tx.ar_values,
            authserv_id,
            delete_all_ours=config.milter.delete_all_own_results,
            methods=our_methods(config),
        )
        value = _rendered(tx, verdict, authserv_id, dmarc)
    except Exception:
        log.exception("rewriting the header fields failed; the decision stands")
        return ()
    deletions = tuple(HeaderChange(HEADER_NAME, i, delete=True) for i in forged)
    return (*deletions, HeaderChange(HEADER_NAME, 0, value))


def _rendered(
    tx: Transaction, verdict: Verdict, authserv_id: str, dmarc: DmarcOutcome | None
) -> str:
    """Our field's folded value; kept per (verdict, authserv-id) when DMARC adds nothing."""
    if dmarc is not None:
        return render_folded(replace(verdict.header_field(authserv_id), more=dmarc.methods))
    key = (verdict, authserv_id)
    value = HEADER_VALUES.get(tx.engine, key)
    if value is None:
        value = render_folded(verdict.header_field(authserv_id))
        HEADER_VALUES.put(tx.engine, key, value)
    return value


def with_headers(outcome: Outcome, headers: tuple[HeaderChange, ...]) -> Outcome:
    """``outcome`` with these header changes (without dataclasses.replace's generic cost)."""
    return Outcome(outcome.action, outcome.reply, headers, outcome.quarantine)
