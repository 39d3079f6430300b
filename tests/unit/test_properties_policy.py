"""Properties of the two Postfix-facing request parsers: policy delegation and the socketmap.

Policy delegation (``check_policy_service``): any bytes on the connection are answered with
``action=DUNNO`` only, one per complete request, and what is recorded is bounded. Socketmap
(``smtp_tls_policy_maps``): any request payload gets exactly one well-formed reply - ``OK``,
``NOTFOUND``, ``TEMP`` or ``PERM`` - on one line of printable ASCII, whatever DNS says.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mtls_milter.config import PolicyMapConfig
from mtls_milter.core.lookups import AddressLookup, HostLookup, LookupStatus, query_name
from mtls_milter.inbound.policy_service import (
    DUNNO,
    MAX_VALUE,
    PolicyService,
    SessionTable,
    facts_from_request,
    parse_request,
)
from mtls_milter.outbound.policy_map import PolicyMapService

SETTINGS = settings(max_examples=150, deadline=None)
PRINTABLE = re.compile(r"[ -~]*")

# --- policy delegation: name=value lines -------------------------------------------------------

attr_name = st.one_of(
    st.sampled_from(
        [
            "request",
            "client_address",
            "client_port",
            "ccert_fingerprint",
            "ccert_pubkey_fingerprint",
            "ccert_subject",
            "ccert_issuer",
            "encryption_protocol",
            "helo_name",
        ]
    ),
    st.from_regex(r"[a-z_]{1,20}", fullmatch=True),
)
attr_value = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=60),
    st.from_regex(r"[0-9]{1,5}", fullmatch=True),
    st.sampled_from(["127.0.0.1", "2001:db8::1", "TLSv1.3", "mx+2Eexample+2Enet"]),
    st.builds(lambda n: "A" * n, st.integers(0, 1500)),
)
attributes = st.dictionaries(attr_name, attr_value, max_size=12)
raw_lines = st.lists(
    st.one_of(st.binary(max_size=80), st.text(max_size=40).map(str.encode)), max_size=20
)


def request_lines(attrs: dict[str, str]) -> list[bytes]:
    return [f"{name}={value}".encode() for name, value in attrs.items()]


@SETTINGS
@given(attributes)
def test_parse_request_round_trips(attrs: dict[str, str]) -> None:
    assert parse_request(request_lines(attrs)) == attrs


@SETTINGS
@given(raw_lines)
@example([b"=x", b"a", b"\xff=\xfe", b"a=1", b"a=2"])
def test_parse_request_never_raises_and_first_value_wins(lines: list[bytes]) -> None:
    parsed = parse_request(lines)
    for name, value in parsed.items():
        assert name and "=" not in name
        first = next(
            line for line in lines if line.decode("utf-8", "replace").startswith(name + "=")
        )
        assert first.decode("utf-8", "replace").rstrip("\r").partition("=")[2] == value


@SETTINGS
@given(st.dictionaries(attr_name, st.one_of(attr_value, st.text(max_size=300)), max_size=12))
def test_facts_are_bounded_or_none(attrs: dict[str, str]) -> None:
    found = facts_from_request(attrs)
    if found is None:
        return
    address, port, facts = found
    assert address and len(address) <= 100 and port.isdigit()
    for value in (facts.fingerprint, facts.pubkey_fingerprint, facts.protocol, facts.subject):
        assert len(value) <= MAX_VALUE
    assert len(facts.issuer) <= MAX_VALUE and len(facts.helo) <= MAX_VALUE


class _Writer:
    """What serve_connection needs of an asyncio.StreamWriter, collecting the bytes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None


def serve_policy(stream: bytes) -> tuple[bytes, SessionTable]:
    table = SessionTable()
    service = PolicyService("inet:0@127.0.0.1", table)

    async def run() -> bytes:
        reader = asyncio.StreamReader(limit=service._limit)
        reader.feed_data(stream)
        reader.feed_eof()
        writer: Any = _Writer()
        await service.serve_connection(reader, writer)
        return bytes(writer.data)

    return asyncio.run(run()), table


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "client_address": st.sampled_from(["192.0.2.1", "2001:db8::7"]),
                "client_port": st.from_regex(r"[0-9]{1,5}", fullmatch=True),
            },
            optional={"ccert_fingerprint": attr_value, "ccert_subject": attr_value},
        ),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from([b"\n", b"\r\n"]),
)
def test_each_request_gets_one_dunno_and_is_recorded(
    requests: list[dict[str, str]], eol: bytes
) -> None:
    stream = b"".join(eol.join(request_lines(r)) + eol + eol for r in requests)
    output, table = serve_policy(stream)
    assert output == DUNNO * len(requests)
    last = requests[-1]
    recorded = table.get(last["client_address"], last["client_port"])
    assert recorded is not None
    assert recorded.fingerprint == last.get("ccert_fingerprint", "").strip()[:MAX_VALUE]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=300), st.sampled_from([b"\n", b"\n\n", b"a=b\n", b"x" * 2100])
        ),
        max_size=12,
    )
)
def test_any_bytes_get_only_dunno_replies(chunks: list[bytes]) -> None:
    stream = b"".join(chunks)
    output, _ = serve_policy(stream)
    assert len(output) % len(DUNNO) == 0 and output == DUNNO * (len(output) // len(DUNNO))
    assert len(output) // len(DUNNO) <= stream.count(b"\n") + 1


# --- socketmap: one reply per payload ----------------------------------------------------------

lookup_status = st.sampled_from(list(LookupStatus))
mx_host = st.from_regex(r"[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){1,2}", fullmatch=True)
host_lookup = st.one_of(
    st.builds(
        HostLookup,
        st.just(LookupStatus.OK),
        st.lists(mx_host, min_size=1, max_size=30, unique=True).map(tuple),
    ),
    st.builds(HostLookup, st.just(LookupStatus.OK), null=st.just(True)),
    # A resolver's detail is its own text (outside data in it already quoted): printable.
    st.builds(HostLookup, lookup_status, detail=st.from_regex(r"[ -~]{0,300}", fullmatch=True)),
    st.builds(
        HostLookup, st.just(LookupStatus.OK), implicit=st.just(True), hosts=st.just(("mx.example",))
    ),
)


LOG_LINE_MAX = 1000  # a few quotes of at most 200 characters and the fixed words


@contextmanager
def log_lines(name: str) -> Iterator[list[str]]:
    """The messages logged on ``name`` (and below) inside the block."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(name)
    handler, level = Collect(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _Resolver:
    """A resolver whose answers the test draws."""

    def __init__(self, client: HostLookup, mx: HostLookup) -> None:
        self.client, self.mx = client, mx

    def client_mx(self, domain: str, budget: float) -> HostLookup:
        return self.client

    def server_mx(self, domain: str, budget: float) -> HostLookup:
        return self.mx

    def addresses(self, host: str, budget: float) -> AddressLookup:
        return AddressLookup(LookupStatus.NOT_FOUND)

    def cached_client_mx(self, domain: str) -> HostLookup | None:
        return None


payload = st.one_of(
    st.binary(max_size=100),
    st.builds(lambda key: b"mtls " + key.encode(), st.one_of(mx_host, st.text(max_size=80))),
    st.sampled_from(
        [
            b"mtls ",
            b"mtls",
            b"other example.com",
            b"mtls [1.2.3.4]:25",
            b"mtls .example.com",
            b"mtls \xff",
        ]
    ),
)


@SETTINGS
@given(payload, host_lookup, host_lookup, st.booleans())
@example(
    b"mtls example.com",
    HostLookup(LookupStatus.TEMPFAIL, detail="x" * 300),
    HostLookup(LookupStatus.OK),
    False,
)
def test_every_socketmap_request_gets_one_well_formed_reply(
    request: bytes, client: HostLookup, mx: HostLookup, report_only: bool
) -> None:
    service = PolicyMapService(
        PolicyMapConfig(report_only=report_only), _Resolver(client, mx), workers=1
    )
    try:
        with log_lines("mtls_milter.policy_map") as lines:
            reply = service.answer(request)
    finally:
        service._executor.shutdown()
    for line in lines:  # outside data (key, DNS detail) only as bounded printable quotes
        assert PRINTABLE.fullmatch(line) and len(line) <= LOG_LINE_MAX, line[:300]
    assert PRINTABLE.fullmatch(reply), reply[:200]
    kind, _, rest = reply.partition(" ")
    assert kind in ("OK", "NOTFOUND", "TEMP", "PERM")
    if kind == "NOTFOUND":
        assert rest == ""
    elif kind == "OK":
        assert not report_only
        match = re.fullmatch(r"secure match=([^ ]+) servername=hostname", rest)
        assert match is not None, reply
        assert all(query_name(host) == host for host in match.group(1).split(":"))
    else:
        assert rest  # a reason Postfix logs
