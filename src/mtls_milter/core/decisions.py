"""The decisions a front end needs around an evaluation, made once for every front end.

A transport (pymilter, the asyncio milter) only reads the MTA's facts, asks these functions and
applies what they say: which SMTP action a verdict gets under the policy, and whether fetching the
client's certificate chain could change the verdict at all (so the fetch is skipped when it
cannot).
"""

from __future__ import annotations

from enum import StrEnum

from mtls_milter.config import Config, FailAction, PolicyConfig, TemperrorAction
from mtls_milter.core.certs import name_matches
from mtls_milter.core.evaluate import Result, Verdict
from mtls_milter.core.evidence import TlsSession
from mtls_milter.core.lookups import HostLookup, LookupStatus


class Action(StrEnum):
    """What the MTA is told to do with the message."""

    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


def action_for(verdict: Verdict, policy: PolicyConfig) -> Action:
    """The action ``verdict`` gets under ``policy`` (``[policy] on_fail`` / ``on_temperror``)."""
    if verdict.result is Result.FAIL and policy.on_fail is not FailAction.ANNOTATE:
        return Action(policy.on_fail.value)
    if verdict.result is Result.TEMPERROR and policy.on_temperror is TemperrorAction.TEMPFAIL:
        return Action.TEMPFAIL
    return Action.ACCEPT


def chain_could_change(client_mx: HostLookup | None, session: TlsSession, config: Config) -> bool:
    """Whether the client's own chain could change the verdict.

    ``client_mx`` is the sender domain's Client MX answer (None when there is no usable domain:
    then only the evidence matters). A chain cannot help when the domain has not opted in
    (without the server-MX fallback), when its Client MX is unusable or null, or when the
    certificate the MTA verified already names a published host.
    """
    if client_mx is not None:
        if client_mx.status is LookupStatus.NOT_FOUND:
            if not config.policy.server_mx_fallback:
                return False  # not opted in: no evidence changes "none"
        elif client_mx.status is not LookupStatus.OK or client_mx.null:
            return False
        elif session.mta_verified and session.mta_cn:
            wildcards = config.tls.allow_wildcards
            return not any(
                name_matches(session.mta_cn, host, allow_wildcards=wildcards)
                for host in client_mx.hosts
            )
    return not (session.mta_verified and session.mta_cn)
