"""The milter adapter (``MtlsMilter``) driven without an MTA.

pymilter's ``Milter.testctx.TestCtx`` does not fit this adapter: its ``setsymlist`` refuses more
than 5 macro names (libmilter has no such limit; we request 10 at HELO), its connect passes the
client address as a bare string instead of libmilter's ``(ip, port)`` tuple, ``addheader``
ignores the index (appends at the bottom) and ``chgheader(name, idx, "")`` deletes *every* field
of that name. So :class:`FakeCtx` stands in for libmilter's context instead: macros per protocol
stage (``getsymval`` sees every stage's values, as libmilter's does), the message's header
fields with libmilter's index semantics (``chgheader``: 1-based among fields of that name,
case-insensitive; ``addheader`` with an index: insert at that position), and every action
recorded. :class:`Conversation` plays the MTA, calling the same entry points libmilter does
(``envfrom_bytes``, ``header_bytes``; see ``serve._register_callbacks``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import Milter
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.dnsserver import TestDnsServer
from support.pki import TestPki

from mtls_milter.config import config_from_mapping
from mtls_milter.core.evaluate import Transaction, Verdict
from mtls_milter.core.evidence import Evidence
from mtls_milter.engine import Engine
from mtls_milter.inbound import session as session_module
from mtls_milter.inbound.milter import (
    ENVFROM_MACROS,
    EOM_MACROS,
    HELO_MACROS,
    EngineHolder,
    MtlsMilter,
)
from mtls_milter.inbound.observer import NULL_OBSERVER
from mtls_milter.inbound.session import MilterSession

AR = "Authentication-Results"
AUTHSERV_ID = "mx.receiver.test"
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL

Macros = Mapping[str, str | None]

POSTFIX_NO_CERT: Macros = {"{tls_version}": "TLSv1.3"}
POSTFIX_TRUSTED: Macros = {
    "{tls_version}": "TLSv1.3",
    "{cert_subject}": "out.sender.test",
    "{cert_issuer}": "Test Intermediate CA",
}
POSTFIX_OTHER_CN: Macros = {**POSTFIX_TRUSTED, "{cert_subject}": "out.other.test"}
SENDMAIL_OK: Macros = {
    "{tls_version}": "TLSv1.3",
    "{verify}": "OK",
    "{cn_subject}": "out.sender.test",
    "{cert_subject}": "/C=XX/O=Test/CN=out.sender.test",
}

PASS_VALUE = (
    f"{AUTHSERV_ID}; mtls=pass (evidence=mta; matched out.sender.test in client-mx) "
    "smtp.mailfrom=sender.test"
)
FORGED_OURS = f"{AUTHSERV_ID}; mtls=pass smtp.mailfrom=sender.test"
THEIRS = "mx.elsewhere.test; mtls=pass smtp.mailfrom=sender.test"

STAGE_ORDER = (
    Milter.M_CONNECT,
    Milter.M_HELO,
    Milter.M_ENVFROM,
    Milter.M_ENVRCPT,
    Milter.M_DATA,
    Milter.M_EOH,
    Milter.M_EOM,
)


# ---------------------------------------------------------------------------------------------
# The fake libmilter context and the MTA side of the conversation


class FakeCtx:
    """A stand-in for pymilter's ``milterContext`` with libmilter's semantics, recording calls."""

    def __init__(self) -> None:
        self._priv: Any = None
        self.stage_macros: dict[int, dict[str, str | None]] = {}
        self.symlists: dict[int, str] = {}
        self.headers: list[tuple[str, str]] = []  # the current message's fields, top first
        self.calls: list[tuple[Any, ...]] = []  # ("addheader", ...), ("chgheader", ...)
        self.reply: tuple[str, ...] | None = None
        self.fake_seconds = 0.0  # time spent in this fake's header actions, not the milter's

    def getpriv(self) -> Any:
        return self._priv

    def setpriv(self, priv: Any) -> None:
        self._priv = priv

    def getsymval(self, name: str) -> str | None:
        for stage in STAGE_ORDER:
            macros = self.stage_macros.get(stage, {})
            if name in macros:
                return macros[name]
        return None

    def setsymlist(self, stage: int, macros: str) -> None:
        if not isinstance(macros, str) or stage in self.symlists:
            raise ValueError("setsymlist: one string, once per stage")
        self.symlists[stage] = macros

    def setreply(self, rcode: str, xcode: str, *msg: str) -> None:
        self.reply = (rcode, xcode, *msg)

    def addheader(self, field: str, value: str, idx: int = -1) -> None:
        self.calls.append(("addheader", field, value, idx))
        if idx < 0:
            self.headers.append((field, value))
        else:
            self.headers.insert(idx, (field, value))

    def chgheader(self, field: str, idx: int, value: str) -> None:
        started = time.perf_counter()
        self.calls.append(("chgheader", field, idx, value))
        positions = [i for i, (n, _) in enumerate(self.headers) if n.lower() == field.lower()]
        if 1 <= idx <= len(positions):  # the MTA ignores an index past the last such field
            if value == "":
                del self.headers[positions[idx - 1]]
            else:
                self.headers[positions[idx - 1]] = (field, value)
        self.fake_seconds += time.perf_counter() - started

    # -- test helpers --

    def set_stage(self, stage: int, macros: Macros) -> None:
        self.stage_macros[stage] = dict(macros)

    def new_transaction(self) -> None:
        """What libmilter does at MAIL (and abort): forget the message stages' macros."""
        for stage in STAGE_ORDER[2:]:
            self.stage_macros.pop(stage, None)
        self.headers = []
        self.calls = []
        self.reply = None

    def deletions(self) -> list[int]:
        return [call[2] for call in self.calls if call[0] == "chgheader" and call[3] == ""]

    def added(self) -> list[tuple[str, str, int]]:
        return [(c[1], _unfold(c[2]), c[3]) for c in self.calls if c[0] == "addheader"]


def _unfold(value: str) -> str:
    return value.replace("\n\t", " ")


class Conversation:
    """The MTA's side: one SMTP connection, callbacks in libmilter's order."""

    def __init__(
        self, engine: Engine, executor: ThreadPoolExecutor, observer: Any = NULL_OBSERVER
    ) -> None:
        self.ctx = FakeCtx()
        session = MilterSession(EngineHolder(engine), executor, observer=observer)
        self.milter = MtlsMilter(session)
        self.milter._setctx(self.ctx)

    def negotiate(self) -> int:
        opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
        rc: int = self.milter.negotiate(opts)
        return rc

    def connect(self, address: str = "192.0.2.25", port: int = 41000) -> int:
        rc: int = self.milter.connect("client.example", 2, (address, port))
        return rc

    def helo(self, name: str = "out.sender.test", macros: Macros | None = None) -> int:
        self.ctx.set_stage(Milter.M_HELO, macros or {})
        rc: int = self.milter.hello(name)
        return rc

    def mail(self, sender: str | bytes, macros: Macros | None = None) -> int:
        self.ctx.new_transaction()
        self.ctx.set_stage(Milter.M_ENVFROM, macros or {})
        raw = sender.encode() if isinstance(sender, str) else sender
        rc: int = self.milter.envfrom_bytes(raw)
        return rc

    def header(self, name: str, value: str | bytes) -> int:
        raw = value.encode() if isinstance(value, str) else value
        self.ctx.headers.append((name, raw.decode("utf-8", "surrogateescape")))
        rc: int = self.milter.header_bytes(name, raw)
        return rc

    def eom(self, macros: Macros | None = None) -> int:
        self.ctx.set_stage(Milter.M_EOM, macros or {"i": "4XyZ1"})
        rc: int = self.milter.eom()
        return rc

    def message(
        self,
        sender: str | bytes = "<alice@sender.test>",
        macros: Macros | None = None,
        headers: Sequence[tuple[str, str | bytes]] | None = None,
    ) -> int:
        """MAIL FROM … end of message; the first non-CONTINUE answer ends it early."""
        rc = self.mail(sender, macros)
        if rc != CONTINUE:
            return rc
        for name, value in headers or [("Subject", "hello")]:
            rc = self.header(name, value)
            if rc != CONTINUE:
                return rc
        return self.eom()

    def start(self, helo_macros: Macros | None = None) -> Conversation:
        assert self.negotiate() == CONTINUE
        assert self.connect() == CONTINUE
        assert self.helo(macros=helo_macros) == CONTINUE
        return self

    def header_value(self) -> str:
        """Our added field (unfolded); fails unless exactly one was added, at index 0."""
        added = self.ctx.added()
        assert len(added) == 1, added
        name, value, index = added[0]
        assert (name, index) == (AR, 0)
        assert self.ctx.headers[0] == (AR, self.ctx.calls[-1][2])
        return value


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def zone(dns_server: TestDnsServer) -> TestDnsServer:
    dns_server.add("sender.test", 265, "10 out.sender.test.")
    dns_server.add("other.test", 265, "10 out.other.test.")
    dns_server.add("xn--bcher-kva.test", 265, "10 out.sender.test.")
    dns_server.add("plain.test", "A", "192.0.2.1")  # exists, no Client MX
    dns_server.servfail("broken.test")
    return dns_server


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(4, thread_name_prefix="test-prefetch")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


class Factory:
    """Builds engines and conversations for one test."""

    def __init__(self, zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor) -> None:
        self.zone = zone
        self.pki = pki
        self.executor = executor

    def engine(self, **sections: dict[str, Any]) -> Engine:
        raw: dict[str, dict[str, Any]] = {
            "milter": {"authserv_id": AUTHSERV_ID},
            "dns": {"nameservers": [self.zone.nameserver], "timeout": 1.0, "budget": 2.0},
            "tls": {"trust": [str(self.pki.root_path)]},
        }
        for name, values in sections.items():
            raw[name] = {**raw.get(name, {}), **values}
        return Engine.from_config(config_from_mapping(raw))

    def conversation(self, **sections: dict[str, Any]) -> Conversation:
        return Conversation(self.engine(**sections), self.executor)

    def started(
        self, helo_macros: Macros | None = None, **sections: dict[str, Any]
    ) -> Conversation:
        return self.conversation(**sections).start(helo_macros)


@pytest.fixture
def make(zone: TestDnsServer, pki: TestPki, executor: ThreadPoolExecutor) -> Factory:
    return Factory(zone, pki, executor)


def _verdict_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for record in caplog.records:
        message = record.getMessage()
        if record.name == "mtls_milter" and message.startswith("verdict "):
            lines.append(json.loads(message.removeprefix("verdict ")))
    return lines


def _one_verdict(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    lines = _verdict_lines(caplog)
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtls_milter")


# ---------------------------------------------------------------------------------------------
# Negotiation


def test_negotiate_requests_macros_per_stage(make: Factory) -> None:
    conv = make.conversation()
    assert conv.negotiate() == CONTINUE
    assert conv.ctx.symlists == {
        Milter.M_HELO: " ".join(HELO_MACROS),
        Milter.M_ENVFROM: " ".join(ENVFROM_MACROS),
        Milter.M_EOM: " ".join(EOM_MACROS),
    }
    assert "{tls_version}" in conv.ctx.symlists[Milter.M_ENVFROM]  # client may skip 2nd EHLO
    assert "{auth_type}" in conv.ctx.symlists[Milter.M_ENVFROM]


# ---------------------------------------------------------------------------------------------
# Postfix macros


@pytest.mark.parametrize(
    ("sender", "macros", "expected"),
    [
        pytest.param(
            "<alice@sender.test>",
            {},
            f'{AUTHSERV_ID}; mtls=fail reason="no TLS" (evidence=none) smtp.mailfrom=sender.test',
            id="no-tls",
        ),
        pytest.param(
            "<alice@sender.test>",
            POSTFIX_NO_CERT,
            f'{AUTHSERV_ID}; mtls=fail reason="no client certificate verified by the MTA" '
            "(evidence=none) smtp.mailfrom=sender.test",
            id="tls-no-verified-cert",
        ),
        pytest.param("<alice@sender.test>", POSTFIX_TRUSTED, PASS_VALUE, id="trusted-pass"),
        pytest.param(
            "<alice@sender.test>",
            POSTFIX_OTHER_CN,
            f'{AUTHSERV_ID}; mtls=fail reason="no certificate name matches Client MX" '
            "(evidence=mta; names=out.other.test) smtp.mailfrom=sender.test",
            id="cn-not-published",
        ),
        pytest.param(
            "<bob@plain.test>",
            POSTFIX_TRUSTED,
            f'{AUTHSERV_ID}; mtls=none reason="plain.test does not publish Client MX" '
            "(evidence=none) smtp.mailfrom=plain.test",
            id="not-opted-in",
        ),
        pytest.param(
            "<>",
            POSTFIX_TRUSTED,
            f'{AUTHSERV_ID}; mtls=none reason="null sender (MAIL FROM:<>)" (evidence=none)',
            id="null-sender",
        ),
    ],
)
def test_postfix_macros(
    make: Factory,
    caplog: pytest.LogCaptureFixture,
    sender: str,
    macros: Macros,
    expected: str,
) -> None:
    conv = make.started()
    assert conv.message(sender, macros) == ACCEPT
    assert conv.header_value() == expected
    assert conv.ctx.deletions() == []
    assert conv.ctx.reply is None
    line = _one_verdict(caplog)
    assert line["action"] == "accept"
    assert line["dry_run"] is False
    assert line["client"] == "192.0.2.25"
    assert line["queue_id"] == "4XyZ1"


def test_postfix_servfail_is_temperror(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    conv = make.started()
    assert conv.message("<carol@broken.test>", POSTFIX_TRUSTED) == ACCEPT
    value = conv.header_value()
    assert value.startswith(
        f'{AUTHSERV_ID}; mtls=temperror reason="Client MX lookup failed: SERVFAIL from '
    )
    assert value.endswith("smtp.mailfrom=broken.test")
    line = _one_verdict(caplog)
    assert (line["result"], line["domain"]) == ("temperror", "broken.test")


# ---------------------------------------------------------------------------------------------
# Sendmail macros


@pytest.mark.parametrize(
    ("macros", "result", "reason"),
    [
        pytest.param(SENDMAIL_OK, "pass", "", id="verify-ok"),
        pytest.param(
            {"{verify}": "NO", "{tls_version}": "TLSv1.3", "{cn_subject}": ""},
            "fail",
            "no client certificate",
            id="verify-no",
        ),
        pytest.param(
            {**SENDMAIL_OK, "{verify}": "FAIL"},
            "fail",
            "certificate not trusted by the MTA and no chain available",
            id="verify-fail",
        ),
        pytest.param(
            {**SENDMAIL_OK, "{cn_subject}": "BadCertificateUnknown"},
            "fail",
            "the MTA-verified certificate has no usable CN and no chain is available",
            id="cn-sentinel",
        ),
        pytest.param(
            {**SENDMAIL_OK, "{cn_subject}": "out+2Esender+2Etest"},  # xtext-encoded dots
            "pass",
            "",
            id="cn-xtext",
        ),
    ],
)
def test_sendmail_macros(
    make: Factory, caplog: pytest.LogCaptureFixture, macros: Macros, result: str, reason: str
) -> None:
    conv = make.started()
    assert conv.message("<alice@sender.test>", macros) == ACCEPT
    value = conv.header_value()
    if result == "pass":
        assert value == PASS_VALUE
    else:
        assert value.startswith(f'{AUTHSERV_ID}; mtls={result} reason="{reason}" (evidence=')
    line = _one_verdict(caplog)
    assert (line["result"], line["reason"] if reason else "") == (result, reason)


# ---------------------------------------------------------------------------------------------
# Where the TLS macros arrive


def test_tls_macros_at_helo_or_at_mail_evaluate_the_same(make: Factory) -> None:
    # The client re-EHLOs after STARTTLS: the second HELO carries the TLS macros.
    reehlo = make.conversation()
    reehlo.negotiate()
    reehlo.connect()
    reehlo.helo(macros={})
    reehlo.helo(macros=POSTFIX_TRUSTED)
    assert reehlo.message("<alice@sender.test>", {}) == ACCEPT
    # The client skipped the second EHLO: only the MAIL stage has them.
    skipped = make.started(helo_macros={})
    assert skipped.message("<alice@sender.test>", POSTFIX_TRUSTED) == ACCEPT
    assert reehlo.header_value() == skipped.header_value() == PASS_VALUE


# ---------------------------------------------------------------------------------------------
# Transactions on one connection


def test_two_messages_get_independent_results(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    first = [(AR, FORGED_OURS), ("Subject", "one")]
    assert conv.message("<alice@sender.test>", {}, first) == ACCEPT
    assert conv.header_value() == PASS_VALUE
    assert conv.ctx.deletions() == [1]

    assert conv.message("<dave@other.test>", {}, [("Subject", "two")]) == ACCEPT
    assert conv.header_value() == (
        f'{AUTHSERV_ID}; mtls=fail reason="no certificate name matches Client MX" '
        "(evidence=mta; names=out.sender.test) smtp.mailfrom=other.test"
    )
    assert conv.ctx.deletions() == []  # the first message's forged field did not leak
    lines = _verdict_lines(caplog)
    assert [(x["domain"], x["result"]) for x in lines] == [
        ("sender.test", "pass"),
        ("other.test", "fail"),
    ]


def test_abort_clears_the_transaction(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    assert conv.mail("<alice@sender.test>") == CONTINUE
    conv.header(AR, FORGED_OURS)
    assert conv.milter.abort() == CONTINUE
    assert conv.eom() == ACCEPT  # an end of message after abort has nothing to judge
    assert conv.ctx.calls == []
    assert conv.message("<dave@other.test>", {}, [("Subject", "x")]) == ACCEPT
    assert conv.ctx.deletions() == []
    assert "smtp.mailfrom=other.test" in conv.header_value()
    assert [x["domain"] for x in _verdict_lines(caplog)] == ["other.test"]
    assert conv.milter.close() == CONTINUE


# ---------------------------------------------------------------------------------------------
# Skips


def test_smtp_auth_session_is_skipped(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    conv = make.started(helo_macros=POSTFIX_NO_CERT)
    macros = {**POSTFIX_NO_CERT, "{auth_type}": "PLAIN"}
    assert conv.mail("<alice@sender.test>", macros) == ACCEPT
    # libmilter sends nothing more for this message; were eom called anyway, still nothing.
    conv.header(AR, FORGED_OURS)
    assert conv.eom() == ACCEPT
    assert conv.ctx.calls == []
    assert conv.ctx.reply is None
    assert _verdict_lines(caplog) == []
    assert any("SMTP AUTH" in r.getMessage() for r in caplog.records)
    # The next message on the connection, unauthenticated, is evaluated again.
    assert conv.message("<alice@sender.test>", POSTFIX_NO_CERT) == ACCEPT
    assert "mtls=fail" in conv.header_value()


def test_internal_network_is_skipped(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    policy = {"internal_networks": ["127.0.0.0/8"]}
    conv = make.conversation(policy=policy)
    conv.negotiate()
    assert conv.connect("127.0.0.1", 50000) == ACCEPT
    assert conv.ctx.calls == []
    assert _verdict_lines(caplog) == []
    outside = make.conversation(policy=policy)
    outside.negotiate()
    assert outside.connect("192.0.2.25", 50000) == CONTINUE


# ---------------------------------------------------------------------------------------------
# Policy


def test_on_fail_reject(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    conv = make.started(policy={"on_fail": "reject"})
    assert conv.message("<alice@sender.test>", POSTFIX_OTHER_CN) == REJECT
    assert conv.ctx.reply == (
        "550",
        "5.7.1",
        "mtls=fail: no certificate name matches Client MX",
    )
    assert _one_verdict(caplog)["action"] == "reject"


def test_on_fail_reject_passes_a_pass(make: Factory) -> None:
    conv = make.started(policy={"on_fail": "reject"})
    assert conv.message("<alice@sender.test>", POSTFIX_TRUSTED) == ACCEPT
    assert conv.ctx.reply is None
    assert conv.header_value() == PASS_VALUE


def test_on_fail_tempfail(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    conv = make.started(policy={"on_fail": "tempfail"})
    assert conv.message("<alice@sender.test>", POSTFIX_NO_CERT) == TEMPFAIL
    assert conv.ctx.reply == (
        "451",
        "4.7.0",
        "mtls=fail: no client certificate verified by the MTA",
    )
    assert _one_verdict(caplog)["action"] == "tempfail"


def test_on_temperror_tempfail(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    conv = make.started(policy={"on_temperror": "tempfail"})
    assert conv.message("<carol@broken.test>", POSTFIX_TRUSTED) == TEMPFAIL
    assert conv.ctx.reply is not None
    rcode, xcode, text = conv.ctx.reply
    assert (rcode, xcode) == ("451", "4.7.0")
    assert text.startswith("mtls=temperror: Client MX lookup failed: SERVFAIL")
    assert _one_verdict(caplog)["action"] == "tempfail"


def test_dry_run_changes_nothing(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    conv = make.started(policy={"on_fail": "reject", "dry_run": True})
    headers = [(AR, FORGED_OURS), ("Subject", "x")]
    assert conv.message("<alice@sender.test>", POSTFIX_OTHER_CN, headers) == ACCEPT
    assert conv.ctx.calls == []
    assert conv.ctx.reply is None
    line = _one_verdict(caplog)
    assert (line["dry_run"], line["action"], line["result"]) == (True, "reject", "fail")


# ---------------------------------------------------------------------------------------------
# Forged headers


def test_forged_field_deleted_at_the_right_index(make: Factory) -> None:
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    headers = [
        ("Received", "from a"),
        (AR, THEIRS),  # 1
        ("authentication-results", FORGED_OURS),  # 2: name case does not matter
        (AR, f"{AUTHSERV_ID}; spf=pass smtp.mailfrom=sender.test"),  # 3: ours, no mtls: kept
        (AR, 'MX.Receiver.TEST/12345; mtls=fail reason="x"'),  # 4: case and /jobid
        (AR, "mx.other.test; mtls=pass"),  # 5
    ]
    assert conv.message("<alice@sender.test>", {}, headers) == ACCEPT
    assert conv.ctx.deletions() == [4, 2]
    assert conv.ctx.headers == [
        (AR, conv.ctx.calls[-1][2]),
        ("Received", "from a"),
        (AR, THEIRS),
        (AR, f"{AUTHSERV_ID}; spf=pass smtp.mailfrom=sender.test"),
        (AR, "mx.other.test; mtls=pass"),
    ]
    assert conv.header_value() == PASS_VALUE


def test_delete_all_own_results_option(make: Factory) -> None:
    conv = make.started(helo_macros=POSTFIX_TRUSTED, milter={"delete_all_own_results": True})
    headers = [
        (AR, f"{AUTHSERV_ID}; spf=pass smtp.mailfrom=sender.test"),
        (AR, THEIRS),
        (AR, FORGED_OURS),
    ]
    assert conv.message("<alice@sender.test>", {}, headers) == ACCEPT
    assert conv.ctx.deletions() == [3, 1]


def test_authserv_id_from_j_macro(make: Factory) -> None:
    conv = make.started(
        helo_macros={**POSTFIX_TRUSTED, "j": "mx.jmacro.test"}, milter={"authserv_id": ""}
    )
    headers = [(AR, "mx.jmacro.test; mtls=pass"), (AR, FORGED_OURS)]
    assert conv.message("<alice@sender.test>", {}, headers) == ACCEPT
    assert conv.ctx.deletions() == [1]
    assert conv.header_value().startswith("mx.jmacro.test; mtls=pass ")


def test_many_headers_are_fast(make: Factory) -> None:
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    headers: list[tuple[str, str]] = []
    forged: list[int] = []
    ar_count = 0
    for i in range(5000):
        if i % 5 == 0:
            ar_count += 1
            if ar_count % 2:
                headers.append((AR, f"{AUTHSERV_ID}; mtls=pass smtp.mailfrom=x{i}.test"))
                forged.append(ar_count)
            else:
                headers.append((AR, f"mx{i}.elsewhere.test; mtls=pass"))
        else:
            headers.append((f"X-Filler-{i}", "v" * 40))
    assert ar_count == 1000
    started = time.perf_counter()
    assert conv.message("<alice@sender.test>", {}, headers) == ACCEPT
    elapsed = time.perf_counter() - started - conv.ctx.fake_seconds
    assert conv.ctx.deletions() == sorted(forged, reverse=True)
    assert len(conv.ctx.headers) == 5000 - 500 + 1
    assert not any(v.startswith(AUTHSERV_ID) for _, v in conv.ctx.headers[1:])
    assert elapsed < 0.6, f"{elapsed:.2f} s of milter time for 5,000 header fields"


def test_malformed_authentication_results_values(make: Factory) -> None:
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    headers: list[tuple[str, str]] = [
        (AR, ""),  # 1 kept: claims nothing
        (AR, f"{AUTHSERV_ID}; mtls=pass ("),  # 2 unparseable yet claims us: forged
        (AR, f"(unbalanced {AUTHSERV_ID}; mtls=pass"),  # 3 kept: no authserv-id at all
        (AR, f'"{AUTHSERV_ID}"; mtls=pass'),  # 4 quoted authserv-id: ours
        (AR, f"{AUTHSERV_ID}; mtls=pass " + "(x" * 5000),  # 5 deep comments: forged
        (AR, f"{AUTHSERV_ID}; " + "a" * 10_000),  # 6 longer than the parse limit: forged
        (AR, "\x00\x01\x7f;;; ===="),  # 7 kept
        (AR, f"{AUTHSERV_ID}; mtls=pass\r\n\tsmtp.mailfrom=sender.test"),  # 8 folded: forged
    ]
    assert conv.message("<alice@sender.test>", {}, headers) == ACCEPT
    assert conv.ctx.deletions() == [8, 6, 5, 4, 2]
    assert conv.header_value() == PASS_VALUE


# ---------------------------------------------------------------------------------------------
# Bad input: nothing raises out of a callback, each case has a defined outcome


def test_no_macros_at_all(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    conv = make.conversation()  # no negotiate, connect or HELO: a broken MTA conversation
    assert conv.message("<alice@sender.test>") == ACCEPT
    assert conv.header_value() == (
        f'{AUTHSERV_ID}; mtls=fail reason="no TLS" (evidence=none) smtp.mailfrom=sender.test'
    )
    assert _one_verdict(caplog)["client"] == ""


@pytest.mark.parametrize(
    ("macros", "result"),
    [
        pytest.param({"{tls_version}": "\x00\x01\xff\ufffd"}, "fail", id="binary-version"),
        pytest.param(
            {**POSTFIX_TRUSTED, "{cert_subject}": "out.sender.test\x00.evil.test"}, "fail", id="nul"
        ),
        pytest.param({**POSTFIX_TRUSTED, "{cert_subject}": "x" * 100_000}, "fail", id="100kB-cn"),
        pytest.param(
            {**POSTFIX_TRUSTED, "{cert_issuer}": "\udcff" * 100_000}, "pass", id="100kB-issuer"
        ),
        pytest.param(
            {**SENDMAIL_OK, "{cert_fp}": "zz:" * 40_000, "{cert_md5}": "\x00"}, "pass", id="bad-fp"
        ),
        # An unknown {verify} value is taken as "a certificate, not trusted" (conservative).
        pytest.param({"{verify}": "\x00" * 100_000}, "fail", id="verify-garbage-no-version"),
        pytest.param(
            {"{verify}": "\x00" * 100_000, "{tls_version}": "TLSv1.3"}, "fail", id="verify-garbage"
        ),
        pytest.param({**POSTFIX_TRUSTED, "j": "\x00" * 100_000}, "pass", id="garbage-j"),
    ],
)
def test_garbage_macro_values(
    make: Factory, caplog: pytest.LogCaptureFixture, macros: Macros, result: str
) -> None:
    conv = make.started(milter={"authserv_id": ""})
    assert conv.message("<alice@sender.test>", macros) == ACCEPT
    value = conv.header_value()
    assert f"; mtls={result}" in value
    assert value.isascii() and value.isprintable()
    assert len(value) < 1000
    assert _one_verdict(caplog)["result"] == result


def test_getsymval_that_raises(
    make: Factory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pymilter raises (UnicodeDecodeError) for a macro that is not UTF-8: still one verdict."""
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    real = conv.ctx.getsymval

    def getsymval(name: str) -> str | None:
        if name == "{cert_subject}":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real(name)

    monkeypatch.setattr(conv.ctx, "getsymval", getsymval)
    assert conv.message("<alice@sender.test>", {}, [(AR, FORGED_OURS)]) == ACCEPT
    assert conv.ctx.deletions() == [1]  # the forged field still goes
    assert "mtls=" in conv.header_value()
    assert len(_verdict_lines(caplog)) == 1


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        pytest.param("<>", 'mtls=none reason="null sender (MAIL FROM:<>)"', id="null"),
        pytest.param("<postmaster>", 'mtls=none reason="MAIL FROM has no domain"', id="no-domain"),
        pytest.param(
            "<alice@[192.0.2.1]>",
            'mtls=none reason="MAIL FROM domain is an address literal"',
            id="ip-literal",
        ),
        pytest.param('<"a@b.example"@sender.test>', PASS_VALUE, id="quoted-local-at"),
        pytest.param("<@relay.example,@r2.example:alice@sender.test>", PASS_VALUE, id="route"),
        pytest.param("<alice@sender.test.>", PASS_VALUE, id="trailing-dot"),
        pytest.param("<ALICE@SENDER.TEST>", PASS_VALUE, id="upper-case"),
        pytest.param("alice@sender.test", PASS_VALUE, id="no-brackets"),
        pytest.param(
            "<alice@bücher.test>".encode(),
            "mtls=pass (evidence=mta; matched out.sender.test in client-mx) "
            "smtp.mailfrom=xn--bcher-kva.test",
            id="utf8-domain",
        ),
        pytest.param(
            b"<alice@\xff\xfe.test>",
            'mtls=none reason="MAIL FROM domain is invalid: invalid internationalized name',
            id="invalid-utf8",
        ),
        pytest.param(b"<alice@sender.test\x00>", "mtls=none", id="nul"),
        pytest.param(b"<" + b"a" * 100_000 + b"@sender.test>", PASS_VALUE, id="100kB-local"),
        pytest.param(
            b"<a@" + b"b." * 50_000 + b"test>",
            'mtls=none reason="MAIL FROM domain is invalid: name longer than 253',
            id="100kB-domain",
        ),
    ],
)
def test_mail_from_forms(
    make: Factory, caplog: pytest.LogCaptureFixture, sender: str | bytes, expected: str
) -> None:
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    assert conv.message(sender, {}) == ACCEPT
    value = conv.header_value()
    if expected == PASS_VALUE:
        assert value == PASS_VALUE
    else:
        assert expected in value
    assert value.isascii()
    assert len(_verdict_lines(caplog)) == 1


def test_eom_without_envfrom(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    conv.header(AR, FORGED_OURS)
    assert conv.eom() == ACCEPT
    assert conv.ctx.calls == []
    assert conv.ctx.reply is None
    assert _verdict_lines(caplog) == []


def test_callbacks_with_wrong_arguments_do_not_raise(make: Factory) -> None:
    milter: Any = make.conversation().milter  # Any: deliberately ill-typed calls
    assert milter.connect("x", 1, "/run/socket") == CONTINUE  # AF_UNIX: address is a str
    assert milter.connect(None, 0, None) == CONTINUE
    assert milter.hello(None) == CONTINUE
    assert milter.header(None, None) == CONTINUE
    assert milter.envfrom(None) == CONTINUE
    assert milter.eom() == ACCEPT


def test_too_many_client_mx_hosts_is_permerror(
    make: Factory, zone: TestDnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    zone.add("huge.test", 265, *(f"10 out{i}.huge.test." for i in range(60)))
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    assert conv.message("<alice@huge.test>", {}) == ACCEPT
    value = conv.header_value()
    assert value.startswith(f'{AUTHSERV_ID}; mtls=permerror reason="Client MX unusable: 60 ')
    assert "more than the limit of 10" in value
    assert _one_verdict(caplog)["result"] == "permerror"


def test_malformed_client_mx_rdata_is_permerror(
    make: Factory, zone: TestDnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    zone.add_raw("malformed.test", 265, b"\x00\x0a\x05")
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    assert conv.message("<alice@malformed.test>", {}) == ACCEPT
    value = conv.header_value()
    assert value.startswith(
        f'{AUTHSERV_ID}; mtls=permerror reason="Client MX unusable: rdata malformed: '
    )
    assert _one_verdict(caplog)["result"] == "permerror"


def _boom(self: Engine, transaction: Transaction, evidence: Evidence, **kwargs: object) -> Verdict:
    raise RuntimeError("injected failure")


@pytest.mark.parametrize(
    ("policy", "rc"),
    [
        pytest.param({}, ACCEPT, id="annotate"),
        pytest.param({"on_temperror": "tempfail"}, TEMPFAIL, id="tempfail"),
    ],
)
def test_internal_error_in_the_engine(
    make: Factory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    policy: dict[str, Any],
    rc: int,
) -> None:
    monkeypatch.setattr(Engine, "evaluate", _boom)
    conv = make.started(helo_macros=POSTFIX_TRUSTED, policy=policy)
    assert conv.message("<alice@sender.test>", {}, [(AR, FORGED_OURS)]) == rc
    assert conv.header_value() == (
        f'{AUTHSERV_ID}; mtls=temperror reason="internal error" (evidence=none)'
    )
    assert conv.ctx.deletions() == [1]
    if rc == TEMPFAIL:
        assert conv.ctx.reply == ("451", "4.7.0", "mtls=temperror: internal error")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info is not None
    assert "injected failure" in str(errors[0].exc_info[1])
    line = _one_verdict(caplog)
    assert (line["result"], line["reason"]) == ("temperror", "internal error")


def test_a_client_mx_lookup_that_raised_is_an_internal_error_not_a_lost_header(
    make: Factory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lookup finished (with an exception) before end of message: still one temperror
    verdict with our header, as when it is still running."""
    conv = make.started(helo_macros=POSTFIX_TRUSTED)

    def broken(domain: str, budget: float) -> None:
        raise RuntimeError("injected lookup failure")

    resolver = conv.milter.session._holder.engine.resolver
    monkeypatch.setattr(resolver, "cached_client_mx", lambda domain: None)
    monkeypatch.setattr(resolver, "client_mx", broken)
    assert conv.mail("<alice@sender.test>", {}) == CONTINUE
    prefetch = conv.milter.session._tx.prefetch if conv.milter.session._tx else None
    assert prefetch is not None
    with contextlib.suppress(RuntimeError):
        prefetch.result(timeout=5)  # settled before end of message
    assert conv.eom() == ACCEPT
    assert "mtls=temperror" in conv.header_value()
    assert _one_verdict(caplog)["result"] == "temperror"


def test_failing_header_action_still_logs_and_refuses(
    make: Factory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MTA refusing an action (milter.error) must not turn a reject into an accept."""
    conv = make.started(helo_macros=POSTFIX_OTHER_CN, policy={"on_fail": "reject"})

    def refuse(*args: Any) -> None:
        raise RuntimeError("CHGHDRS not negotiated")

    monkeypatch.setattr(conv.ctx, "addheader", refuse)
    assert conv.message("<alice@sender.test>", {}) == REJECT
    assert conv.ctx.reply is not None and conv.ctx.reply[:2] == ("550", "5.7.1")
    assert _one_verdict(caplog)["action"] == "reject"


# ---------------------------------------------------------------------------------------------
# Prefetch at MAIL FROM


def test_client_mx_lookup_starts_at_mail_from(make: Factory, zone: TestDnsServer) -> None:
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    zone.delay("sender.test", 0.05)
    assert conv.mail("<alice@sender.test>") == CONTINUE
    deadline = time.monotonic() + 2.0
    while ("sender.test", 265) not in zone.queries and time.monotonic() < deadline:
        time.sleep(0.005)
    assert ("sender.test", 265) in zone.queries  # before any header or end of message
    conv.header("Subject", "x")
    assert conv.eom() == ACCEPT
    assert conv.header_value() == PASS_VALUE
    assert zone.queries.count(("sender.test", 265)) == 1  # eom reused the answer


def test_prefetch_without_tls_but_not_without_domain(make: Factory, zone: TestDnsServer) -> None:
    # Without TLS the Client MX answer still decides: an opted-in domain's plain text fails.
    conv = make.started()
    assert conv.message("<>", POSTFIX_TRUSTED) == ACCEPT
    assert zone.queries == []
    assert conv.mail("<alice@sender.test>", {}) == CONTINUE
    deadline = time.monotonic() + 2.0
    while ("sender.test", 265) not in zone.queries and time.monotonic() < deadline:
        time.sleep(0.005)
    assert ("sender.test", 265) in zone.queries  # at MAIL FROM, before end of message
    assert conv.eom() == ACCEPT
    assert 'mtls=fail reason="no TLS"' in conv.header_value()
    assert zone.queries.count(("sender.test", 265)) == 1  # eom reused the answer


@pytest.mark.parametrize("cache_size", [10_000, 0])
def test_unanswered_lookup_is_temperror_within_the_budget(
    make: Factory, zone: TestDnsServer, caplog: pytest.LogCaptureFixture, cache_size: int
) -> None:
    zone.drop("silent.test")
    dns = {"timeout": 0.2, "budget": 0.5, "cache_size": cache_size}
    conv = make.started(helo_macros=POSTFIX_TRUSTED, dns=dns)
    started = time.monotonic()
    assert conv.message("<alice@silent.test>", {}) == ACCEPT
    elapsed = time.monotonic() - started
    value = conv.header_value()
    assert value.startswith(f'{AUTHSERV_ID}; mtls=temperror reason="Client MX lookup ')
    assert value.endswith("smtp.mailfrom=silent.test")
    assert 0.15 < elapsed < 0.5 + 0.1, f"{elapsed:.2f} s"
    assert zone.queries == [("silent.test", 265)]  # the failed answer is not asked for again
    assert _one_verdict(caplog)["result"] == "temperror"


def test_slow_body_after_prefetch_still_uses_its_answer(make: Factory, zone: TestDnsServer) -> None:
    """End of message long after MAIL FROM (slow DATA): the finished lookup is used."""
    conv = make.started(helo_macros=POSTFIX_TRUSTED, dns={"timeout": 0.1, "budget": 0.2})
    assert conv.mail("<alice@sender.test>") == CONTINUE
    time.sleep(0.3)  # longer than the whole DNS budget
    assert conv.eom() == ACCEPT
    assert conv.header_value() == PASS_VALUE


# ---------------------------------------------------------------------------------------------
# Decide, then act, then log: a failing side effect never changes the answer


def _raise_not_utf8(real: Any, broken: str, raw: bytes = b"4Xy\xe9") -> Any:
    """A getsymval that fails like pymilter's for a macro value that is not UTF-8."""

    def getsymval(name: str) -> str | None:
        if name == broken:
            raise UnicodeDecodeError("utf-8", raw, 3, 4, "invalid continuation byte")
        result: str | None = real(name)
        return result

    return getsymval


def test_reject_stands_when_the_queue_id_macro_is_not_utf8(
    make: Factory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    conv = make.started(helo_macros=POSTFIX_OTHER_CN, policy={"on_fail": "reject"})
    monkeypatch.setattr(conv.ctx, "getsymval", _raise_not_utf8(conv.ctx.getsymval, "i"))
    assert conv.message("<alice@sender.test>", {}) == REJECT
    assert conv.ctx.reply == (
        "550",
        "5.7.1",
        "mtls=fail: no certificate name matches Client MX",
    )
    line = _one_verdict(caplog)
    assert (line["result"], line["action"], line["queue_id"]) == ("fail", "reject", "")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "client=192.0.2.25: macro i is not UTF-8, taken as not sent: '4Xy\\xe9'",
        "client=192.0.2.25: macro i is not UTF-8, taken as not sent: '4Xy\\xe9'",
    ]  # read once at MAIL FROM and once at end of message, never again for the log line
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("action", ["addheader", "chgheader"])
def test_reject_stands_when_a_header_action_raises(
    make: Factory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    action: str,
) -> None:
    conv = make.started(helo_macros=POSTFIX_OTHER_CN, policy={"on_fail": "reject"})

    def refuse(*args: Any) -> None:
        raise Milter.error(f"cannot {action}")  # what pymilter raises when libmilter fails

    monkeypatch.setattr(conv.ctx, action, refuse)
    assert conv.message("<alice@sender.test>", {}, [(AR, FORGED_OURS)]) == REJECT
    assert conv.ctx.reply is not None and conv.ctx.reply[:2] == ("550", "5.7.1")
    assert _one_verdict(caplog)["action"] == "reject"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["rewriting the header fields failed; the decision stands"]


def test_tempfail_stands_when_logging_fails(
    make: Factory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_log(*args: Any) -> None:
        raise OSError("log device gone")

    monkeypatch.setattr(MilterSession, "_log", broken_log)
    conv = make.started(helo_macros=POSTFIX_OTHER_CN, policy={"on_fail": "tempfail"})
    assert conv.message("<alice@sender.test>", {}) == TEMPFAIL
    assert conv.ctx.reply is not None and conv.ctx.reply[:2] == ("451", "4.7.0")
    assert "mtls=fail" in conv.header_value()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["logging the verdict failed; the decision stands"]


def test_verdict_line_names_hosts_fingerprint_source_and_timings(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    assert conv.message("<alice@sender.test>", {}) == ACCEPT
    line = _one_verdict(caplog)
    assert (line["result"], line["hosts"], line["hosts_count"]) == ("pass", ["out.sender.test"], 1)
    assert line["fingerprint_source"] == "none"  # Postfix's macros carry no fingerprint
    assert isinstance(line["ttl"], int) and line["ttl"] > 0  # the Client MX answer's TTL
    timings = line["timings_ms"]
    assert set(timings) == {"dns", "chain", "total"}
    assert 0 <= timings["dns"] <= timings["total"] and timings["chain"] == 0


def test_verdict_line_clips_what_the_client_chose(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """HELO is the client's text: at most 200 characters, control characters escaped."""
    conv = make.conversation()
    conv.negotiate()
    conv.connect()
    conv.helo("x\x1b[31m" + "h" * 300, POSTFIX_TRUSTED)
    conv.message("<alice@sender.test>", {})
    helo = _one_verdict(caplog)["helo"]
    assert len(helo) <= 200 and "\x1b" not in helo and helo.startswith("x\\x1b[31m")


def test_verdict_line_fingerprint_from_a_macro(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    macros = {**SENDMAIL_OK, "{cert_fp}": "AB:" * 31 + "AB"}
    conv = make.started(helo_macros=macros)
    conv.message("<alice@sender.test>", {})
    assert _one_verdict(caplog)["fingerprint_source"] == "macro"


def test_verdict_line_lists_every_host_compared_with(
    make: Factory, caplog: pytest.LogCaptureFixture, zone: TestDnsServer
) -> None:
    for n in range(10):  # the most a Client MX may have
        zone.add("many.test", 265, f"10 h{n:02d}.many.test.")
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    conv.message("<alice@many.test>", {})
    line = _one_verdict(caplog)
    assert line["result"] == "fail"
    assert line["hosts"] == [f"h{n:02d}.many.test" for n in range(10)]
    assert line["hosts_count"] == 10


def test_log_after_answer_keeps_the_line_until_the_answer_is_written(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """The asyncio transport writes the answer first and logs after (decide, act, log); a
    conversation that ends before the answer went out still gets its line."""
    session = MilterSession(EngineHolder(make.engine()), make.executor)
    session.log_after_answer = True

    def message() -> None:
        session.connect("192.0.2.25", "41000")
        session.helo("out.sender.test", POSTFIX_TRUSTED)
        session.mail("<alice@sender.test>", {})
        assert session.eom({"i": "Q1"}).action == "accept"

    message()
    assert _verdict_lines(caplog) == []
    session.answered()
    session.answered()  # once only
    assert len(_verdict_lines(caplog)) == 1
    message()
    session.close()  # ended before the answer was written
    assert [line["result"] for line in _verdict_lines(caplog)] == ["pass", "pass"]


class RecordingObserver:
    def __init__(self, fail: bool = False) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.fail = fail

    def verdict(
        self,
        verdict: Verdict,
        action: str,
        dmarc_result: str | None,
        evaluation_seconds: float,
        message_seconds: float,
    ) -> None:
        self.seen.append((verdict, action, dmarc_result, evaluation_seconds, message_seconds))
        if self.fail:
            raise RuntimeError("observer broken")


def test_observer_hears_each_verdict_after_the_log_line(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    observer = RecordingObserver()
    engine = make.engine(policy={"on_fail": "reject"})
    conv = Conversation(engine, make.executor, observer).start(POSTFIX_OTHER_CN)
    assert conv.message("<alice@sender.test>", {}) == REJECT
    [(verdict, action, dmarc_result, evaluation, message)] = observer.seen
    assert (verdict.result.value, action, dmarc_result) == ("fail", "reject", None)
    assert 0 <= evaluation <= message < 5
    assert _one_verdict(caplog)["result"] == "fail"


def test_a_failing_observer_changes_no_decision(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make.engine(policy={"on_fail": "tempfail"})
    conv = Conversation(engine, make.executor, RecordingObserver(fail=True))
    conv.start(POSTFIX_OTHER_CN)
    assert conv.message("<alice@sender.test>", {}) == TEMPFAIL
    assert "mtls=fail" in conv.header_value()
    assert _one_verdict(caplog)["action"] == "tempfail"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["reporting the verdict failed; the decision stands"]


def test_reject_stands_when_the_reply_text_is_refused(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    conv = make.started(helo_macros=POSTFIX_OTHER_CN, policy={"on_fail": "reject"})

    def refuse(*args: Any) -> None:
        raise Milter.error("cannot set reply")

    monkeypatch.setattr(conv.ctx, "setreply", refuse)
    assert conv.message("<alice@sender.test>", {}) == REJECT  # the MTA's own 5xx text then


# ---------------------------------------------------------------------------------------------
# Input that is not UTF-8


def test_latin1_mail_from_and_header_value(make: Factory, caplog: pytest.LogCaptureFixture) -> None:
    conv = make.started(helo_macros=POSTFIX_TRUSTED)
    forged_latin1 = f'{AUTHSERV_ID}; mtls=pass reason="caf\xe9"'.encode("latin-1")
    headers: list[tuple[str, str | bytes]] = [
        ("Subject", "Caf\xe9".encode("latin-1")),
        (AR, forged_latin1),
        (AR, b"mx.elsewhere.test; mtls=pass (\xff\xfe)"),
    ]
    assert conv.mail("<caf\xe9@sender.test>".encode("latin-1")) == CONTINUE
    for name, value in headers:
        assert conv.header(name, value) == CONTINUE
    assert conv.eom() == ACCEPT
    assert conv.header_value() == PASS_VALUE
    assert conv.ctx.deletions() == [1]  # the forged field of ours goes, the other stays
    assert _one_verdict(caplog)["result"] == "pass"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_authserv_id_macro_not_utf8_still_gives_a_header(
    make: Factory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`{j}` that pymilter cannot decode: taken as not sent, the host name is the authserv-id."""
    conv = make.started(helo_macros=POSTFIX_TRUSTED, milter={"authserv_id": ""})
    monkeypatch.setattr(
        conv.ctx, "getsymval", _raise_not_utf8(conv.ctx.getsymval, "j", b"mx.\xe9.test")
    )
    assert conv.message("<alice@sender.test>", {}) == ACCEPT
    value = conv.header_value()
    assert value.startswith(f"{socket.gethostname()}; mtls=pass ")
    assert _one_verdict(caplog)["result"] == "pass"
    assert "macro j is not UTF-8, taken as not sent: 'mx.\\xe9.test'" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(local=st.binary(max_size=40), value=st.binary(max_size=120), cn=st.binary(max_size=40))
def test_any_bytes_give_one_verdict_and_one_header(
    make: Factory, local: bytes, value: bytes, cn: bytes
) -> None:
    """Whatever bytes arrive in MAIL FROM, a header value or a macro, the message gets a
    result header and a defined answer; nothing raises out of a callback."""
    conv = make.started()
    real = conv.ctx.getsymval

    def getsymval(name: str) -> str | None:
        if name == "{cert_subject}":
            return cn.decode()  # raises for invalid UTF-8, as pymilter's does
        return real(name)

    conv.ctx.getsymval = getsymval  # type: ignore[method-assign]
    sender = b"<" + local.replace(b">", b"") + b"@sender.test>"
    rc = conv.message(sender, POSTFIX_TRUSTED, [(AR, value), ("Subject", value)])
    assert rc == ACCEPT
    header = conv.header_value()
    assert header.startswith(f"{AUTHSERV_ID}; mtls=")
    assert header.isascii() and header.isprintable()


# ---------------------------------------------------------------------------------------------
# An MTA that withholds the header actions: results are logged only


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "_warned", set(), raising=False)


@pytest.mark.usefixtures("fresh_warnings")
def test_mta_without_header_actions_logs_only(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make.engine(policy={"on_fail": "reject"})
    withheld = Milter.CURR_ACTS & ~(Milter.ADDHDRS | Milter.CHGHDRS)
    conversations = [Conversation(engine, make.executor) for _ in range(2)]
    for conv in conversations:
        assert conv.milter.negotiate([withheld, 0x1FFFFF, 0, 0]) == CONTINUE
        assert conv.connect() == CONTINUE
        assert conv.helo(macros=POSTFIX_TRUSTED) == CONTINUE
    first, second = conversations
    assert first.message("<alice@sender.test>", {}, [(AR, FORGED_OURS)]) == ACCEPT
    assert first.ctx.calls == []  # neither added nor deleted
    assert second.message("<alice@other.test>", {}, [(AR, FORGED_OURS)]) == REJECT
    assert second.ctx.calls == []
    assert second.ctx.reply is not None and second.ctx.reply[:2] == ("550", "5.7.1")
    assert [(v["result"], v["action"]) for v in _verdict_lines(caplog)] == [
        ("pass", "accept"),
        ("fail", "reject"),
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "MTA withholds header actions (ADDHDRS CHGHDRS): results will be logged only, "
        "no Authentication-Results field is added or removed"
    ]  # once, not per connection or message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.usefixtures("fresh_warnings")
def test_mta_without_symlist_keeps_its_own_macro_lists(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    conv = make.conversation()
    assert (
        conv.milter.negotiate([Milter.CURR_ACTS & ~Milter.SETSYMLIST, 0x1FFFFF, 0, 0]) == CONTINUE
    )
    assert conv.ctx.symlists == {}
    assert "MTA withholds SETSYMLIST" in caplog.text
    assert conv.connect() == CONTINUE
    assert conv.helo(macros=POSTFIX_TRUSTED) == CONTINUE
    assert conv.message("<alice@sender.test>", {}) == ACCEPT
    assert conv.header_value() == PASS_VALUE
