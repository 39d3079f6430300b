"""The asyncio adapter (``SessionHandler``) behind the real asyncio milter server, driven with raw
milter frames over a unix socket: the same decisions as the pymilter adapter, and end of message
off the event loop (a slow chain fetch for one client does not hold up another client)."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from support.dnsserver import TestDnsServer
from support.milter_client import (
    P_NR_BODY,
    P_NR_CONN,
    P_NR_DATA,
    P_NR_EOH,
    P_NR_HDR,
    P_NR_HELO,
    P_NR_MAIL,
    P_NR_RCPT,
    Address,
    EomResult,
    MilterClient,
)
from support.pki import TestPki

from mtls_milter.config import config_from_mapping
from mtls_milter.core.certs import fingerprint_sha256
from mtls_milter.engine import Engine
from mtls_milter.inbound import session as session_module
from mtls_milter.inbound.asyncio_driver import MilterServer
from mtls_milter.inbound.asyncio_handler import OPTIONS, handler_factory, options_for
from mtls_milter.inbound.chain_fetch import ChainFetcher
from mtls_milter.inbound.session import EngineHolder, MilterSession
from mtls_milter.inbound.wire import NO_REPLY_FLAGS, ProtocolFlag
from mtls_milter.net.starttls import StartTlsResult

AUTHSERV_ID = "mx.receiver.test"


def frame(command: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload) + 1) + command + payload


def strings(command: bytes, *parts: bytes) -> bytes:
    return frame(command, b"".join(p + b"\0" for p in parts))


def macros(stage: bytes, values: dict[str, str]) -> bytes:
    pairs = (x for k, v in values.items() for x in (k.encode(), v.encode()))
    return frame(b"D", stage + b"".join(x + b"\0" for x in pairs))


def conversation(
    tls: dict[str, str], sender: bytes = b"<a@sender.test>", headers: tuple[bytes, ...] = ()
) -> bytes:
    """Postfix's order: macros before each command, every step the milter asked for."""
    parts = [
        frame(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)),
        frame(b"C", b"out.sender.test\x004" + struct.pack(">H", 41000) + b"93.184.216.34\0"),
        macros(b"H", {"j": AUTHSERV_ID, **tls}),
        strings(b"H", b"out.sender.test"),
        macros(b"M", {"i": "Q1"}),
        strings(b"M", sender),
        frame(b"T"),
        *(strings(b"L", b"Authentication-Results", h) for h in headers),
        strings(b"L", b"Subject", b"\xe9t\xe9"),  # Latin-1: decoded, not refused
        frame(b"N"),
        frame(b"E"),
        frame(b"Q"),
    ]
    return b"".join(parts)


def replies(stream: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while stream:
        (size,) = struct.unpack(">I", stream[:4])
        out.append((stream[4:5], stream[5 : 4 + size]))
        stream = stream[4 + size :]
    return out


class SlowHost:
    """The chain fetch: hangs (blocking, in the fetcher's thread) for ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, address: str, port: int, sni: str, **kwargs: Any) -> StartTlsResult:
        time.sleep(self.seconds)
        return StartTlsResult(connected=True, error="timed out")


@pytest.fixture
def zone(dns_server: TestDnsServer) -> TestDnsServer:
    dns_server.add("sender.test", 265, "10 out.sender.test.")
    return dns_server


@pytest.fixture
def pools() -> Iterator[tuple[ThreadPoolExecutor, ThreadPoolExecutor]]:
    prefetch, eom = ThreadPoolExecutor(4), ThreadPoolExecutor(4)
    yield prefetch, eom
    prefetch.shutdown(cancel_futures=True)
    eom.shutdown(cancel_futures=True)


def engine(zone: TestDnsServer, pki: TestPki, **policy: Any) -> Engine:
    raw: dict[str, dict[str, Any]] = {
        "milter": {"authserv_id": AUTHSERV_ID},
        "dns": {"nameservers": [zone.nameserver], "timeout": 1.0, "budget": 2.0},
        "tls": {"trust": [str(pki.root_path)]},
        "chain_fetch": {"timeout": 3.0},
        "policy": policy,
    }
    return Engine.from_config(config_from_mapping(raw))


def serve(
    tmp_path: Path,
    eng: Engine,
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
    fetcher: ChainFetcher | None = None,
) -> MilterServer:
    holder = EngineHolder(eng)

    def make_session() -> MilterSession:
        return MilterSession(holder, pools[0], fetcher=fetcher)

    factory = handler_factory(make_session, pools[1])
    return MilterServer(f"unix:{tmp_path / 'm.sock'}", factory, OPTIONS)


async def talk(server: MilterServer, stream: bytes) -> tuple[list[tuple[bytes, bytes]], float]:
    started = time.monotonic()
    reader, writer = await asyncio.open_unix_connection(server.spec[5:])
    writer.write(stream)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return replies(data), time.monotonic() - started


def run_one(server: MilterServer, stream: bytes) -> list[tuple[bytes, bytes]]:
    async def main() -> list[tuple[bytes, bytes]]:
        await server.start()
        try:
            return (await talk(server, stream))[0]
        finally:
            await server.aclose()

    return asyncio.run(main())


SENDMAIL_OK = {"{tls_version}": "TLSv1.3", "{verify}": "OK", "{cn_subject}": "out.sender.test"}
SENDMAIL_OTHER = {**SENDMAIL_OK, "{cn_subject}": "out.other.test"}


def test_pass_inserts_our_field_and_deletes_a_forged_one(
    tmp_path: Path, zone: TestDnsServer, pki: TestPki, pools: Any
) -> None:
    forged = f"{AUTHSERV_ID}; mtls=pass smtp.mailfrom=sender.test".encode()
    server = serve(tmp_path, engine(zone, pki), pools)
    got = run_one(server, conversation(SENDMAIL_OK, headers=(forged,)))
    commands = [c for c, _ in got]
    assert commands[0] == b"O" and commands[-1] == b"a"
    assert (b"m", b"\0\0\0\x01Authentication-Results\0\0") in got  # the forged one, deleted
    inserted = [p for c, p in got if c == b"i"]
    assert len(inserted) == 1 and inserted[0].startswith(b"\0\0\0\0Authentication-Results\0")
    assert b"mtls=pass (evidence=mta; matched out.sender.test" in inserted[0].replace(b"\n\t", b" ")


def test_fail_rejects_with_our_reply_text(
    tmp_path: Path, zone: TestDnsServer, pki: TestPki, pools: Any
) -> None:
    server = serve(tmp_path, engine(zone, pki, on_fail="reject"), pools)
    got = run_one(server, conversation(SENDMAIL_OTHER))
    reply = [p for c, p in got if c == b"y"]
    assert len(reply) == 1 and reply[0].startswith(b"550 5.7.1 mtls=fail: ")
    assert any(c == b"i" and b"mtls=fail" in p for c, p in got)


def test_mta_without_header_actions_gets_the_decision_and_one_warning(
    tmp_path: Path,
    zone: TestDnsServer,
    pki: TestPki,
    pools: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Degraded mode: the MTA offers no ADDHDRS/CHGHDRS; the conversation goes on, the policy
    still applies (a reject), nothing asks for a header change, one warning explains why."""
    session_module._warned.discard("header")
    offer = frame(b"O", struct.pack(">III", 6, 0x1FF & ~0x11, 0x1FFFFF))
    stream = conversation(SENDMAIL_OTHER).replace(
        frame(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF)), offer, 1
    )
    server = serve(tmp_path, engine(zone, pki, on_fail="reject"), pools)
    got = run_one(server, stream)
    commands = [c for c, _ in got]
    assert b"i" not in commands and b"m" not in commands and b"h" not in commands
    assert [p[:9] for c, p in got if c == b"y"] == [b"550 5.7.1"]
    warnings = [
        r.getMessage() for r in caplog.records if "withholds header actions" in r.getMessage()
    ]
    assert warnings == [
        "MTA withholds header actions (ADDHDRS CHGHDRS): results will be logged only, "
        "no Authentication-Results field is added or removed"
    ]


def test_header_fields_are_answered() -> None:
    """Without an answer per header field, Sendmail over inet: waits ~40 ms more per message
    (measured by tests/e2e/test_milter_e2e.py::test_inet_timing: 132 ms instead of 88 ms from
    MAIL to end of message)."""
    assert not OPTIONS.protocol & ProtocolFlag.NR_HDR
    assert not OPTIONS.protocol & (ProtocolFlag.NODATA | ProtocolFlag.NOEOH | ProtocolFlag.NOHDRS)


def test_slow_chain_fetch_does_not_delay_another_client(
    tmp_path: Path, zone: TestDnsServer, pki: TestPki, pools: Any
) -> None:
    leaf = pki.leaves["server"]
    slow_tls = {**SENDMAIL_OTHER, "{verify}": "FAIL", "{cert_fp}": fingerprint_sha256(leaf.cert)}
    fetcher = ChainFetcher(fetch=SlowHost(2.0), ehlo_name=AUTHSERV_ID)
    server = serve(tmp_path, engine(zone, pki), pools, fetcher)

    async def main() -> tuple[float, float, float]:
        await server.start()
        try:
            await talk(server, conversation(SENDMAIL_OK))  # warm the DNS cache
            _, alone = await talk(server, conversation(SENDMAIL_OK))
            slow = asyncio.ensure_future(talk(server, conversation(slow_tls)))
            await asyncio.sleep(0.2)  # the slow client is now waiting for its chain
            _, beside = await talk(server, conversation(SENDMAIL_OK))
            _, slow_elapsed = await slow
            return alone, beside, slow_elapsed
        finally:
            await server.aclose()
            fetcher.shutdown()

    alone, beside, slow_elapsed = asyncio.run(main())
    assert slow_elapsed >= 1.9  # it really waited for its chain fetch
    assert beside - alone < 0.05, (alone, beside)


# ---------------------------------------------------------------------------------------------
# "No reply" steps on a unix socket


NO_REPLY_STEPS = (
    P_NR_CONN | P_NR_HELO | P_NR_MAIL | P_NR_RCPT | P_NR_DATA | P_NR_HDR | P_NR_EOH | P_NR_BODY
)


def _engine_on(spec: str, zone: TestDnsServer, pki: TestPki, **policy: Any) -> Engine:
    raw: dict[str, dict[str, Any]] = {
        "milter": {"authserv_id": AUTHSERV_ID, "socket": spec},
        "dns": {"nameservers": [zone.nameserver], "timeout": 1.0, "budget": 2.0},
        "tls": {"trust": [str(pki.root_path)]},
        "policy": policy,
    }
    return Engine.from_config(config_from_mapping(raw))


def _one_message(address: Address) -> tuple[int, EomResult]:
    """A Sendmail-like message with a verified certificate; (negotiated flags, EOM result)."""
    with MilterClient.connect(address) as client:
        protocol = client.optneg().protocol
        client.connect_info("out.sender.test", "93.184.216.34", 41000)
        client.macro(b"H", {"j": AUTHSERV_ID, **SENDMAIL_OK})
        client.helo("out.sender.test")
        client.macro(b"M", {"i": "Q1"})
        client.mail("<a@sender.test>")
        client.data()
        client.header("Subject", "hello")
        client.eoh()
        result = client.eom()
        client.quit()
        return protocol, result


def _serving(spec: str, eng: Engine, pools: Any) -> tuple[MilterServer, str]:
    holder = EngineHolder(eng)
    factory = handler_factory(lambda: MilterSession(holder, pools[0]), pools[1])
    server = MilterServer(spec, factory, lambda: options_for(holder.engine.config))
    return server, spec[5:]


def _run_client(server: MilterServer, unix_path: str | None) -> tuple[int, EomResult]:
    """One message against ``server`` (at ``unix_path``, else its TCP port)."""

    async def main() -> tuple[int, EomResult]:
        await server.start()
        try:
            address: Address = unix_path or ("127.0.0.1", server.port)
            return await asyncio.to_thread(_one_message, address)
        finally:
            await server.aclose()

    return asyncio.run(main())


def test_unix_socket_asks_for_no_reply_and_answers_only_the_end_of_message(
    tmp_path: Path, zone: TestDnsServer, pki: TestPki, pools: Any
) -> None:
    """Every step before end of message goes unanswered: the first packet after the option
    negotiation is end of message's header insertion, then accept (a stray CONTINUE for an
    earlier step would be read here as the final reply)."""
    spec = f"unix:{tmp_path / 'nr.sock'}"
    server, address = _serving(spec, _engine_on(spec, zone, pki), pools)
    protocol, result = _run_client(server, address)
    assert protocol & NO_REPLY_STEPS == NO_REPLY_STEPS
    assert result.final.command == b"a"
    [field_value] = result.header_values("Authentication-Results")
    assert "mtls=pass" in field_value


def test_inet_socket_asks_for_no_no_reply_step(
    zone: TestDnsServer, pki: TestPki, pools: Any
) -> None:
    """Over TCP every step is answered (the MTA's next small write would otherwise wait under
    Nagle for our delayed ACK)."""
    eng = _engine_on("inet:10025@127.0.0.1", zone, pki)
    server, _ = _serving("inet:0@127.0.0.1", eng, pools)
    protocol, result = _run_client(server, None)
    assert protocol & NO_REPLY_FLAGS == 0
    assert result.final.command == b"a"
    assert "mtls=pass" in result.header_values("Authentication-Results")[0]


def test_internal_network_skipped_at_connect_is_accepted_at_the_end_without_a_field(
    tmp_path: Path, zone: TestDnsServer, pki: TestPki, pools: Any
) -> None:
    """With no reply at connect the MTA keeps talking: the skip decided there is the end of
    message's answer (accept, nothing added)."""
    spec = f"unix:{tmp_path / 'nr.sock'}"
    eng = _engine_on(spec, zone, pki)
    eng = Engine.from_config(
        replace(
            eng.config,
            policy=replace(eng.config.policy, internal_networks=(ip_network("93.184.216.0/24"),)),
        )
    )
    server, address = _serving(spec, eng, pools)
    protocol, result = _run_client(server, address)
    assert protocol & P_NR_CONN
    assert result.final.command == b"a"
    assert result.actions == []


def test_a_tcp_listener_never_asks_for_no_reply_even_when_the_options_do(
    tmp_path: Path, zone: TestDnsServer, pki: TestPki, pools: Any
) -> None:
    """The configuration says unix (a reload that changed the socket, which only a restart
    applies) while the server listens on TCP: the server drops the no-reply steps."""
    eng = _engine_on(f"unix:{tmp_path / 'later.sock'}", zone, pki)
    assert options_for(eng.config).protocol & NO_REPLY_FLAGS
    server, _ = _serving("inet:0@127.0.0.1", eng, pools)
    protocol, result = _run_client(server, None)
    assert protocol & NO_REPLY_FLAGS == 0
    assert result.final.command == b"a"
