"""The Postfix policy-delegation listener: always DUNNO, records TLS facts per client session."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtls_milter.inbound.policy_service import (
    DUNNO,
    MAX_ATTRIBUTES,
    MAX_LINE,
    PolicyFacts,
    PolicyService,
    PolicyServiceThread,
    SessionTable,
    facts_from_request,
    parse_request,
)

FP = ":".join(["AB"] * 32)


def request(**attrs: str) -> bytes:
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": "192.0.2.25",
        "client_port": "41000",
        "helo_name": "out.sender.test",
        "encryption_protocol": "TLSv1.3",
        "ccert_subject": "",
        "ccert_issuer": "",
        "ccert_fingerprint": FP,
        "ccert_pubkey_fingerprint": "CD:" * 31 + "CD",
    }
    base.update(attrs)
    return b"".join(f"{k}={v}\n".encode() for k, v in base.items()) + b"\n"


# -- pure parts ----------------------------------------------------------------------------------


def test_parse_request_first_value_wins_and_ignores_lines_without_equals() -> None:
    attrs = parse_request([b"a=1", b"junk", b"a=2", b"=x", b"b=c=d", b"\xff\xfe=\xff"])
    assert attrs["a"] == "1"
    assert attrs["b"] == "c=d"
    assert "" not in attrs


def test_facts_from_request_decodes_xtext_and_needs_address_and_port() -> None:
    attrs = parse_request(request(ccert_subject="out+2Esender.test").splitlines())
    found = facts_from_request(attrs)
    assert found is not None
    address, port, facts = found
    assert (address, port) == ("192.0.2.25", "41000")
    assert facts.fingerprint == FP
    assert facts.subject == "out.sender.test"
    assert facts.protocol == "TLSv1.3"
    assert facts_from_request({"client_address": "192.0.2.1"}) is None
    assert facts_from_request({"client_address": "192.0.2.1", "client_port": "x"}) is None


def test_table_is_bounded_and_expires() -> None:
    now = [100.0]
    table = SessionTable(size=2, ttl=10.0, clock=lambda: now[0])
    table.record("192.0.2.1", "1", PolicyFacts(fingerprint="a"))
    table.record("192.0.2.1", "2", PolicyFacts(fingerprint="b"))
    table.record("192.0.2.1", "3", PolicyFacts(fingerprint="c"))
    assert len(table) == 2
    assert table.get("192.0.2.1", "1") is None  # the oldest went first
    facts = table.get("192.0.2.1", "3")
    assert facts is not None and facts.fingerprint == "c"
    now[0] += 11
    assert table.get("192.0.2.1", "3") is None


def test_table_gives_a_session_only_its_own_record() -> None:
    now = [100.0]
    table = SessionTable(clock=lambda: now[0])
    table.record("192.0.2.1", "41000", PolicyFacts(fingerprint="earlier"))
    now[0] += 5
    connected = table.now()  # a later SMTP session from the same address and port connects
    assert table.get("192.0.2.1", "41000", since=connected) is None
    facts = table.get("192.0.2.1", "41000")  # without a session start: any record (older API)
    assert facts is not None and facts.fingerprint == "earlier"
    now[0] += 1
    table.record("192.0.2.1", "41000", PolicyFacts(fingerprint="this session"))
    facts = table.get("192.0.2.1", "41000", since=connected)
    assert facts is not None and facts.fingerprint == "this session"


def test_table_normalizes_addresses() -> None:
    table = SessionTable()
    table.record("IPv6:2001:DB8::1", "25", PolicyFacts(fingerprint="x"))
    assert table.get("2001:db8::1", "25") is not None
    assert table.get("[2001:db8::1]", " 25") is not None


def test_table_is_thread_safe() -> None:
    table = SessionTable(size=500)

    def work(n: int) -> None:
        for i in range(2000):
            table.record("192.0.2.1", str(n * 10_000 + i), PolicyFacts(fingerprint=str(i)))
            table.get("192.0.2.1", str(n * 10_000 + i))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(table) == 500


# -- the live service ----------------------------------------------------------------------------


@pytest.fixture
def service() -> Iterator[PolicyService]:
    svc = PolicyService("inet:0@127.0.0.1", SessionTable())
    runner = PolicyServiceThread(svc)
    runner.start()
    yield svc
    runner.stop()


def talk(svc: PolicyService, data: bytes, *, replies: int = 1, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", svc.port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        deadline = time.monotonic() + timeout
        while got.count(DUNNO) < replies and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        return got


def test_request_is_answered_dunno_and_recorded(service: PolicyService) -> None:
    assert talk(service, request()) == DUNNO
    facts = service.table.get("192.0.2.25", "41000")
    assert facts is not None
    assert facts.fingerprint == FP
    assert facts.pubkey_fingerprint.startswith("CD:")
    assert facts.helo == "out.sender.test"


def test_many_requests_on_one_connection(service: PolicyService) -> None:
    data = b"".join(request(client_port=str(40000 + i)) for i in range(20))
    assert talk(service, data, replies=20) == DUNNO * 20
    assert all(service.table.get("192.0.2.25", str(40000 + i)) for i in range(20))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"garbage without equals\n\n", id="no-equals"),
        pytest.param(b"\x00\xff\xfe\x16\x03\x01=\x00\n\n", id="binary"),
        pytest.param(b"client_address=192.0.2.9\n\n", id="no-port"),
        pytest.param(b"\n\n\nclient_port=1\nclient_address=192.0.2.9\n\n", id="odd-order"),
        pytest.param(request(protocol_state="END-OF-MESSAGE"), id="other-state"),
        pytest.param(request(request="something_else"), id="other-request"),
        pytest.param(b"a=b\r\nc=d\r\n\r\n", id="crlf"),
    ],
)
def test_malformed_or_unexpected_requests_get_dunno(service: PolicyService, data: bytes) -> None:
    assert talk(service, data) == DUNNO
    assert talk(service, request()) == DUNNO  # and the service still works


def test_oversized_line_gets_dunno_and_close(service: PolicyService) -> None:
    data = b"ccert_subject=" + b"x" * (MAX_LINE * 4) + b"\n\n"
    assert talk(service, data) == DUNNO
    assert talk(service, request()) == DUNNO


def test_too_many_attributes_gets_dunno_and_close(service: PolicyService) -> None:
    data = b"".join(f"a{i}=1\n".encode() for i in range(MAX_ATTRIBUTES + 5)) + b"\n"
    assert talk(service, data) == DUNNO
    assert talk(service, request()) == DUNNO


def test_client_closing_mid_request_is_harmless(service: PolicyService) -> None:
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
        sock.sendall(b"client_address=192.0.2.1\nclient_po")
    assert talk(service, request()) == DUNNO


def test_later_request_replaces_facts(service: PolicyService) -> None:
    talk(service, request(ccert_fingerprint=""))
    talk(service, request())
    facts = service.table.get("192.0.2.25", "41000")
    assert facts is not None and facts.fingerprint == FP


def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    svc = PolicyService(f"unix:{path}", SessionTable(), socket_mode="0600")
    runner = PolicyServiceThread(svc)
    runner.start()
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(request())
            assert sock.recv(100) == DUNNO
    finally:
        runner.stop()


def test_unusable_socket_fails_start() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        runner = PolicyServiceThread(PolicyService(f"inet:{port}@127.0.0.1", SessionTable()))
        with pytest.raises(OSError):
            runner.start()


# -- configuration -------------------------------------------------------------------------------


def test_config_sections() -> None:
    from mtls_milter.config import ConfigError, config_from_mapping

    default = config_from_mapping({})
    assert default.policy_service.socket == ""  # off by default
    assert default.chain_fetch.enabled and default.chain_fetch.port == 25
    assert default.chain_fetch.timeout == 3.0 and default.chain_fetch.max_concurrent == 16
    assert not default.chain_fetch.allow_private
    config = config_from_mapping(
        {"policy_service": {"socket": "unix:/run/p.sock"}, "chain_fetch": {"timeout": 1}}
    )
    assert config.policy_service.socket == "unix:/run/p.sock"
    assert config.chain_fetch.timeout == 1.0
    for bad in ({"policy_service": {"socket": "tcp:1"}}, {"chain_fetch": {"port": 0}}):
        with pytest.raises(ConfigError):
            config_from_mapping(bad)
