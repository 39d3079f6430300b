"""The verdict and header memo (inbound/verdict_memo.py): reused for identical inputs, emptied by
a reload, never keeping a verdict that rests on more than its key."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from support.dnsserver import TestDnsServer
from support.pki import TestPki

from mtls_milter.config import config_from_mapping
from mtls_milter.engine import Engine
from mtls_milter.inbound.session import EngineHolder, MilterSession, Outcome
from mtls_milter.inbound.verdict_memo import Memo

TRUSTED = {
    "{tls_version}": "TLSv1.3",
    "{cert_subject}": "out.sender.test",
    "{cert_issuer}": "Test Intermediate CA",
}


def test_memo_is_emptied_for_a_new_owner_and_when_full() -> None:
    memo: Memo[str] = Memo(max_entries=2)
    first, second = object(), object()
    memo.put(first, "a", "A")
    assert memo.get(first, "a") == "A"
    assert memo.get(second, "a") is None  # another engine never sees the first one's values
    memo.put(second, "b", "B")
    assert memo.get(first, "a") is None and memo.get(second, "b") == "B"
    memo.put(second, "c", "C")
    memo.put(second, "d", "D")  # full: emptied, then kept
    assert (memo.get(second, "b"), memo.get(second, "d")) == (None, "D")


def _engine(zone: TestDnsServer, pki: TestPki, **tls: Any) -> Engine:
    raw: dict[str, dict[str, Any]] = {
        "milter": {"authserv_id": "mx.receiver.test"},
        "dns": {"nameservers": [zone.nameserver], "timeout": 1.0, "budget": 2.0},
        "tls": {"trust": [str(pki.root_path)], **tls},
    }
    return Engine.from_config(config_from_mapping(raw))


def _message(holder: EngineHolder, pool: ThreadPoolExecutor, sender: str) -> Outcome:
    session = MilterSession(holder, pool)
    session.connect("192.0.2.25", "41000")
    session.helo("out.sender.test", {**TRUSTED, "{cert_subject}": "*.sender.test"})
    session.mail(sender, {})
    session.data()
    return session.eom({"i": "Q1"})


def test_a_reload_is_judged_afresh_with_the_same_inputs(
    dns_server: TestDnsServer, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    """A wildcard certificate name matches only with [tls] allow_wildcards: the same message
    (same sender, TLS facts and Client MX answer) before and after a reload that turns it off
    gets a different result, not the kept one."""
    caplog.set_level(logging.INFO, logger="mtls_milter")
    dns_server.add("sender.test", 265, "10 out.sender.test.")
    holder = EngineHolder(_engine(dns_server, pki, allow_wildcards=True))
    with ThreadPoolExecutor(2) as pool:
        before = [_message(holder, pool, "<a@sender.test>") for _ in range(3)]
        holder.engine = _engine(dns_server, pki, allow_wildcards=False)
        after = [_message(holder, pool, "<a@sender.test>") for _ in range(2)]
    values = [o.headers[-1].value.replace("\n\t", " ") for o in (*before, *after)]
    assert len(set(values[:3])) == 1 and "mtls=pass" in values[0]
    assert len(set(values[3:])) == 1 and "mtls=fail" in values[3]
