"""Properties of a whole evaluation on hostile input: MAIL FROM, HELO, macros and DNS answers.

The parsers' properties compose here: whatever the client and its DNS say, the evaluation gives
a verdict (never an exception) whose reason is a bounded printable line and whose header field
parses back; ``pass`` needs a verified name that is one of the published hosts; and a failing
collaborator gives ``temperror``, never ``fail``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import authres
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mtls_milter.config import Config
from mtls_milter.core.certs import TrustAnchors
from mtls_milter.core.chain import ChainValidator
from mtls_milter.core.clock import FixedClock
from mtls_milter.core.evaluate import Result, Transaction, evaluate
from mtls_milter.core.evidence import Evidence, session_from_macros
from mtls_milter.core.header import render_value
from mtls_milter.core.lookups import AddressLookup, HostLookup, LookupStatus
from mtls_milter.engine import Engine

SETTINGS = settings(max_examples=150, deadline=None)
PRINTABLE = re.compile(r"[ -~]*")
REASON_MAX = 1000  # fixed words and a few quotes of at most 200 characters
CONFIG = Config()


def _root() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Property Test Root")])
    start = datetime(2024, 1, 1, tzinfo=UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


VALIDATOR = ChainValidator(TrustAnchors((_root(),), ("generated",)))
CLOCK = FixedClock(datetime(2025, 1, 1, tzinfo=UTC))

host = st.from_regex(r"[a-z0-9]{1,8}\.(sender|other)\.test", fullmatch=True)
host_lookup = st.one_of(
    st.builds(
        HostLookup,
        st.just(LookupStatus.OK),
        st.lists(host, min_size=1, max_size=4, unique=True).map(tuple),
    ),
    st.builds(HostLookup, st.just(LookupStatus.OK), null=st.just(True)),
    st.builds(
        HostLookup,
        st.sampled_from(list(LookupStatus)),
        detail=st.from_regex(r"[ -~]{0,120}", fullmatch=True),
    ),
)
hostile = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        ["<>", "<a@sender.test>", "<@r.test:a@Sender.Test.>", "<a@[192.0.2.1]>", "a@é.test"]
    ),
    st.builds(lambda n: "<a@" + "é" * n + ">", st.integers(0, 600)),
)
macro_value = st.one_of(st.none(), st.just(""), st.text(max_size=60), host, host.map(str.upper))
macros = st.fixed_dictionaries(
    {},
    optional={
        "{tls_version}": st.sampled_from(["TLSv1.3", "", "x"]),
        "{cert_subject}": macro_value,
        "{cert_issuer}": macro_value,
        "{verify}": st.sampled_from(["OK", "NO", "FAIL", "NONE", ""]),
        "{cn_subject}": macro_value,
        "{cert_fp}": macro_value,
    },
)


class _Resolver:
    def __init__(self, client: HostLookup, server: HostLookup) -> None:
        self.client, self.server = client, server

    def client_mx(self, domain: str, budget: float) -> HostLookup:
        return self.client

    def server_mx(self, domain: str, budget: float) -> HostLookup:
        return self.server

    def addresses(self, host: str, budget: float) -> AddressLookup:
        return AddressLookup(LookupStatus.NOT_FOUND)

    def cached_client_mx(self, domain: str) -> HostLookup | None:
        return None


class _Broken(_Resolver):
    def client_mx(self, domain: str, budget: float) -> HostLookup:
        raise RuntimeError("resolver bug\r\nX-Injected: yes")


@SETTINGS
@given(hostile, hostile, macros, host_lookup, host_lookup)
@example(
    "<a@sender.test>",
    "",
    {"{tls_version}": "TLSv1.3", "{cert_issuer}": "CA", "{cert_subject}": "a.sender.test"},
    HostLookup(LookupStatus.OK, ("a.sender.test",)),
    HostLookup(LookupStatus.NOT_FOUND),
)
def test_any_input_gives_a_verdict_that_renders(
    mail_from: str, helo: str, values: dict[str, str | None], client: HostLookup, server: HostLookup
) -> None:
    session = session_from_macros(values)
    verdict = evaluate(
        Transaction(mail_from, helo),
        Evidence(session),
        CONFIG,
        _Resolver(client, server),
        VALIDATOR,
        CLOCK,
    )
    assert verdict.result in set(Result)
    assert PRINTABLE.fullmatch(verdict.reason) and len(verdict.reason) <= REASON_MAX, (
        verdict.reason[:300]
    )
    if verdict.result is Result.PASS:
        assert session.mta_verified and verdict.matched == session.mta_cn
        assert verdict.matched in verdict.hosts
    value = render_value(verdict.header_field("mx.receiver.test"))
    parsed = authres.AuthenticationResultsHeader.parse_value(value)
    assert str(parsed.results[0].result) == verdict.result.value


@SETTINGS
@given(hostile, macros)
def test_a_failing_collaborator_gives_temperror_never_fail(
    mail_from: str, values: dict[str, str | None]
) -> None:
    engine = Engine(
        CONFIG, _Broken(HostLookup(LookupStatus.OK), HostLookup(LookupStatus.OK)), VALIDATOR, CLOCK
    )
    verdict = engine.evaluate(Transaction(mail_from), Evidence(session_from_macros(values)))
    assert verdict.result is not Result.FAIL
    assert "\n" not in verdict.reason and "\r" not in verdict.reason
