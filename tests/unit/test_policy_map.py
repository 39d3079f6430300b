"""The socketmap service over real sockets: protocol, ordering, hostile input, report-only."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.dnsserver import TestDnsServer
from support.policy_map import PolicyMapController, socketmap_query
from support.ports import free_port, wait_for_port

from mtls_milter.config import ConfigError, PolicyMapConfig, config_from_mapping
from mtls_milter.net.dns import DnsResolver
from mtls_milter.outbound.netstring import NetstringReader, encode
from mtls_milter.runtime.stream_service import parse_listen_spec

ResolverFactory = Callable[..., DnsResolver]
SECURE = "OK secure match=mx.receiver.test servername=hostname"


@pytest.fixture
def zone(dns_server: TestDnsServer) -> TestDnsServer:
    dns_server.add("receiver.test", 265, "10 out.receiver.test.")
    dns_server.add("receiver.test", "MX", "10 mx.receiver.test.")
    dns_server.add("plain.test", "MX", "10 mx.plain.test.")
    dns_server.servfail("broken.test")
    return dns_server


@pytest.fixture
def service(zone: TestDnsServer, dns_resolver: DnsResolver) -> Iterator[PolicyMapController]:
    with PolicyMapController(dns_resolver) as controller:
        yield controller


def test_answers(service: PolicyMapController) -> None:
    assert service.query("receiver.test") == [SECURE]
    assert service.query("plain.test") == ["NOTFOUND "]
    assert service.query(".receiver.test") == ["NOTFOUND "]
    assert service.query("[127.0.0.1]:25") == ["NOTFOUND "]
    assert service.query("[mx.receiver.test]") == ["NOTFOUND "]
    assert service.query("receiver.test", name="other") == ["NOTFOUND "]
    (temp,) = service.query("broken.test")
    assert temp.startswith("TEMP Client MX lookup for broken.test failed: SERVFAIL")


def test_pipelined_replies_keep_order(zone: TestDnsServer, service: PolicyMapController) -> None:
    zone.delay("slow.test", 0.3)  # the first request is the slowest: it must still come first
    keys = ["slow.test", "receiver.test", "plain.test", ".receiver.test", "broken.test"] * 4
    replies = service.query(*keys)
    expected = {
        "slow.test": "NOTFOUND ",
        "receiver.test": SECURE,
        "plain.test": "NOTFOUND ",
        ".receiver.test": "NOTFOUND ",
    }
    assert len(replies) == len(keys)
    for key, reply in zip(keys, replies, strict=True):
        if key == "broken.test":
            assert reply.startswith("TEMP ")
        else:
            assert reply == expected[key], key


@pytest.mark.parametrize("size", [4096, 128, 16, 1])
def test_requests_split_at_read_sizes(service: PolicyMapController, size: int) -> None:
    stream = b"".join(encode(f"mtls {k}".encode()) for k in ("receiver.test", "plain.test"))
    with socket.create_connection((service.host, service.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(stream), size):
            sock.sendall(stream[i : i + size])
            if size < 16:
                time.sleep(0.001)
        reader = NetstringReader(1000)
        replies: list[bytes] = []
        while len(replies) < 2:
            data = sock.recv(4096)
            assert data
            reader.feed(data)
            while (payload := reader.next_payload()) is not None:
                replies.append(payload)
    assert replies == [SECURE.encode(), b"NOTFOUND "]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"abc:mtls x,", "PERM protocol error: netstring length is not a number"),
        (b"12:mtls receiver;", "PERM protocol error: netstring not terminated by ','"),
        (b"5000:" + b"x" * 5000 + b",", "PERM protocol error: netstring of 5000 bytes"),
        (b"99999999999999999999999", "PERM protocol error: netstring longer than 1000"),
    ],
)
def test_framing_errors_answer_perm_and_close(
    service: PolicyMapController, raw: bytes, expected: str
) -> None:
    # A good request first: it is answered before the error, then the connection closes.
    replies = socketmap_query((service.host, service.port), [b"mtls receiver.test"], 10, raw=raw)
    assert replies[0] == SECURE
    assert replies[1].startswith(expected)
    assert len(replies) == 2  # the server closed the connection


def test_truncated_request_closes_quietly(service: PolicyMapController) -> None:
    with socket.create_connection((service.host, service.port), timeout=10) as sock:
        sock.sendall(b"20:mtls rece")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    assert service.query("receiver.test") == [SECURE]  # the service is still fine


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"mtls", "PERM malformed request"),
        (b"mtls ", "PERM malformed request"),
        (b"mtls \xff\xfe", "PERM request is not UTF-8"),
        (b"mtls " + b"a" * 300 + b".test", "NOTFOUND "),
        (b"mtls receiver.test\r\nQUIT", "NOTFOUND "),
    ],
)
def test_bad_requests(service: PolicyMapController, payload: bytes, expected: str) -> None:
    (reply,) = socketmap_query((service.host, service.port), [payload], 1)
    assert reply.startswith(expected)
    assert service.query("receiver.test") == [SECURE]


def test_every_mx_host_is_pinned(zone: TestDnsServer, service: PolicyMapController) -> None:
    # RFC 5321 sets no limit on MX hosts; only Client MX is limited to 10 names.
    hosts = [f"h{i}.many.test" for i in range(1, 16)]
    zone.add("many.test", 265, "10 out.many.test.")
    zone.add("many.test", "MX", *(f"{i} {host}." for i, host in enumerate(hosts, 1)))
    assert service.query("many.test") == [f"OK secure match={':'.join(hosts)} servername=hostname"]


def test_log_lines_quote_at_most_200_characters_of_dns_data(
    zone: TestDnsServer, service: PolicyMapController, caplog: pytest.LogCaptureFixture
) -> None:
    long_hosts = [f"{'x' * 50}-{i}.long.test" for i in range(40)]
    zone.add("long.test", 265, "10 out.long.test.")
    zone.add("long.test", "MX", *(f"10 {host}." for host in long_hosts))
    zone.add_raw("junk.test", 265, b"\x00\x0a" + b"v=spf1 include:_spf.example.net ~all " * 1600)
    zone.add("junk.test", "MX", "10 mx.junk.test.")
    caplog.set_level(logging.INFO, logger="mtls_milter.policy_map")
    (reply,) = service.query("long.test")
    assert reply == f"OK secure match={':'.join(sorted(long_hosts))} servername=hostname"
    assert service.query("junk.test") == ["OK secure match=mx.junk.test servername=hostname"]
    lines = [r.getMessage() for r in caplog.records if r.name == "mtls_milter.policy_map"]
    assert len(lines) == 2
    for line in lines:  # the reply and the MX list quoted, 200 characters each at most
        assert len(line) <= 600, line
    assert (
        "junk.test: 'OK secure match=mx.junk.test servername=hostname' (junk.test opted in"
        in (lines[1])
    )


def test_report_only(
    zone: TestDnsServer, dns_resolver: DnsResolver, caplog: pytest.LogCaptureFixture
) -> None:
    config = PolicyMapConfig(socket="inet:0@127.0.0.1", report_only=True)
    caplog.set_level(logging.INFO, logger="mtls_milter.policy_map")
    with PolicyMapController(dns_resolver, config=config) as pm:
        assert pm.query("receiver.test", "broken.test") == ["NOTFOUND ", "NOTFOUND "]
    assert f"receiver.test would be {SECURE!r}" in caplog.text
    assert "broken.test would be 'TEMP" in caplog.text


def test_cache_is_the_resolvers(zone: TestDnsServer, resolver_for: ResolverFactory) -> None:
    resolver = resolver_for()
    with PolicyMapController(resolver) as pm:
        assert pm.query("receiver.test") == [SECURE]
        asked = len(zone.queries)
        assert pm.query("receiver.test", "receiver.test") == [SECURE, SECURE]
    assert len(zone.queries) == asked
    assert resolver.cache_stats()["hits"] >= 4


def test_unix_socket(zone: TestDnsServer, dns_resolver: DnsResolver, tmp_path: Path) -> None:
    path = tmp_path / "policy.sock"
    config = PolicyMapConfig(socket=f"unix:{path}")
    with PolicyMapController(dns_resolver, config=config):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(encode(b"mtls receiver.test"))
            assert sock.recv(4096) == encode(SECURE.encode())
        assert path.stat().st_mode & 0o777 == 0o666


def test_parse_listen_spec() -> None:
    assert parse_listen_spec("inet:8899@127.0.0.1") == ("inet", 8899, "127.0.0.1")
    assert parse_listen_spec("inet6:8899@[::1]") == ("inet", 8899, "::1")
    assert parse_listen_spec("unix:/run/x.sock") == ("unix", "/run/x.sock", "")
    for bad in ("inet:127.0.0.1:8899", "tcp:1@h", "unix:relative", "inet:99999@h"):
        with pytest.raises(ValueError):
            parse_listen_spec(bad)


def test_command_runs_and_stops(zone: TestDnsServer, tmp_path: Path) -> None:
    """The real subcommand: start, answer, stop on SIGTERM with status 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "c.toml"
    config.write_text(
        f'[dns]\nnameservers = ["{zone.nameserver}"]\n'
        f'[policy_map]\nsocket = "inet:{port}@127.0.0.1"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtls_milter", "policy-map", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                replies = socketmap_query(("127.0.0.1", port), [b"mtls receiver.test"], 1)
                break
            except OSError:
                assert time.monotonic() < deadline, "policy-map did not start"
                time.sleep(0.05)
        assert replies == [SECURE]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "started: socket=inet:" in err and "stopped" in err
    assert f"receiver.test: {SECURE!r}" in err


def test_command_bad_config_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[policy_map]\nsocket = "inet:127.0.0.1:8899"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "mtls_milter", "policy-map", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "[policy_map] socket" in proc.stderr


def test_policy_map_config_section() -> None:
    config = config_from_mapping(
        {"policy_map": {"socket": "unix:/run/p.sock", "map_name": "tls-policy", "max_request": 64}}
    )
    assert config.policy_map == PolicyMapConfig("unix:/run/p.sock", "tls-policy", False, 64)
    assert config_from_mapping({}).policy_map.socket == "inet:8899@127.0.0.1"
    for key, value in [
        ("socket", "inet:127.0.0.1:8899"),
        ("map_name", "bad name"),
        ("map_name", ""),
        ("report_only", "yes"),
        ("max_request", 10),
        ("unknown", 1),
    ]:
        with pytest.raises(ConfigError, match=rf"\[policy_map\] {key}"):
            config_from_mapping({"policy_map": {key: value}})


def test_command_serves_its_own_metrics(zone: TestDnsServer, tmp_path: Path) -> None:
    """[metrics] policy_map_listen: answers counted by kind, /healthz on the map's socket."""
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[dns]\nnameservers = ["{zone.nameserver}"]\n'
        f'[policy_map]\nsocket = "inet:{port}@127.0.0.1"\n'
        f'[metrics]\npolicy_map_listen = "127.0.0.1:{metrics_port}"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtls_milter", "policy-map", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(metrics_port)
        queries = [b"mtls receiver.test", b"mtls plain.test", b"mtls broken.test", b"nokey"]
        replies = socketmap_query(("127.0.0.1", port), queries, 4)
        assert [r.split(" ")[0] for r in replies] == ["OK", "NOTFOUND", "TEMP", "PERM"]
        base = f"http://127.0.0.1:{metrics_port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as answer:
            assert answer.read() == b"ok\n"
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    answers = {
        s.labels["kind"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "mtls_milter_policy_map_answers_total"
    }
    assert answers == {"OK": 1, "NOTFOUND": 1, "TEMP": 1, "PERM": 1}
    assert 'mtls_milter_dns_cache_lookups_total{outcome="miss"}' in text
