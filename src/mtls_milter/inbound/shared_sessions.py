"""The policy service's session table, read by pre-forked workers through their parent.

With ``[milter] workers`` > 1 the parent runs the Postfix policy service and holds the one
:class:`~.policy_service.SessionTable`; Postfix's policy request and its milter conversation may
be served by different processes. A worker's milter session asks the parent over the worker's
channel (:class:`~mtls_milter.runtime.worker_link.WorkerLink`): the request is the client's
address, port and the session's start, the reply the recorded facts or nothing.

``since`` crosses the process boundary as a number: both sides read ``time.monotonic()``, which
on Linux is CLOCK_MONOTONIC, one clock for the whole system, so a worker's session start and the
parent's record time compare. A lookup that fails (no reply within :data:`LOOKUP_TIMEOUT` in
all, a broken channel, a reply that does not parse) raises
:class:`~.policy_service.PolicyTableUnavailable`, which is not "no record": the session may
have had a fingerprint, so a verdict that could rest on its absence becomes ``temperror``
(:func:`.session_evidence.verdict_for`). It is logged at most once per 10 s. The wait is short
because the lookup runs on the worker's event loop; the parent answers on a loop that a reload
never holds up (the reload is checked in a thread, :mod:`mtls_milter.runtime.prefork`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, fields
from typing import Any

from mtls_milter.core.quote import clip
from mtls_milter.inbound.policy_service import PolicyFacts, PolicyTableUnavailable, SessionTable
from mtls_milter.runtime.stream_service import RateLimitedLog
from mtls_milter.runtime.worker_link import WorkerLink

log = logging.getLogger("mtls_milter.policy_service")

LOOKUP_TIMEOUT = 0.25  # seconds; the parent answers in microseconds unless it is stuck
_FACT_FIELDS = {f.name: f.type for f in fields(PolicyFacts)}


def encode_request(address: str, port: str, since: float | None) -> bytes:
    return json.dumps([address, port, since]).encode()


def answer_lookup(table: SessionTable, request: bytes) -> bytes:
    """The parent's side: one worker's request -> the facts as JSON, or ``null``."""
    try:
        address, port, since = json.loads(request)
        facts = table.get(str(address), str(port), since=None if since is None else float(since))
    except (ValueError, TypeError):
        log.warning("policy lookup from a worker not understood: %s", clip(repr(request[:100])))
        facts = None
    return b"null" if facts is None else json.dumps(asdict(facts)).encode()


def decode_facts(reply: bytes) -> PolicyFacts | None:
    """The parent's reply -> facts; ValueError when it is not a reply of ours."""
    data: Any = json.loads(reply)
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) != set(_FACT_FIELDS):
        raise ValueError("unexpected reply")
    if not all(isinstance(data[name], str) for name in _FACT_FIELDS if name != "recorded"):
        raise ValueError("unexpected reply")
    return PolicyFacts(**{**data, "recorded": float(data["recorded"])})


class RemoteSessionTable(SessionTable):
    """A worker's view of the parent's table: :meth:`get` asks the parent, :meth:`now` is the
    system-wide monotonic clock. Recording happens in the parent only."""

    def __init__(self, link: WorkerLink, timeout: float = LOOKUP_TIMEOUT) -> None:
        super().__init__(size=1)
        self._link = link
        self._timeout = timeout
        self._failures = RateLimitedLog(log)

    def now(self) -> float:
        return time.monotonic()

    def record(self, address: str, port: str, facts: PolicyFacts) -> None:
        raise NotImplementedError("the parent records policy facts")  # never called in a worker

    def get(self, address: str, port: str, *, since: float | None = None) -> PolicyFacts | None:
        """The parent's record; PolicyTableUnavailable when the parent cannot be asked."""
        reply = self._link.request(encode_request(address, port, since), self._timeout)
        if reply is None:
            problem = f"no answer from the parent within {self._timeout:g} s"
        else:
            try:
                return decode_facts(reply)
            except (ValueError, TypeError):
                problem = "unreadable answer from the parent"
        self._failures.warning("policy lookup: %s; policy table unavailable", problem)
        raise PolicyTableUnavailable(problem)
