"""The metrics endpoint over real sockets: /metrics, /healthz, everything else, hostile peers."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from support.ports import free_port

from mtls_milter.config import ConfigError, config_from_mapping
from mtls_milter.runtime import metrics, metrics_http
from mtls_milter.runtime.metrics_http import MetricsServer, socket_accepts

HEALTH: dict[str, tuple[bool, str]] = {"now": (True, "")}


@pytest.fixture(scope="module")
def server() -> Iterator[MetricsServer]:
    metrics.enable()
    with MetricsServer("127.0.0.1:0", metrics.render, lambda: HEALTH["now"]) as running:
        yield running


def exchange(server: MetricsServer, data: bytes, *, shut: bool = True) -> bytes:
    """Send ``data`` raw and read the whole answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def get(server: MetricsServer, path: str) -> tuple[int, bytes]:
    answer = exchange(server, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_metrics_parse_as_prometheus_text_and_show_counts(server: MetricsServer) -> None:
    m = metrics.current()
    assert m is not None
    m.policy_map_answers.labels("TEMP").inc(3)
    status, body = get(server, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert "mtls_milter_verdicts" in families  # counters are named without _total here
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("mtls_milter_policy_map_answers_total", (("kind", "TEMP"),))] >= 3
    assert samples[("mtls_milter_build_info", (("version", "0.1.0"),))] == 1
    assert not any(name.endswith("_created") for name, _ in samples)


def test_healthz_is_200_ok_or_503_with_the_reason(server: MetricsServer) -> None:
    HEALTH["now"] = (True, "")
    assert get(server, "/healthz") == (200, b"ok\n")
    HEALTH["now"] = (False, "trust store not loaded: /etc/x.pem: cannot read")
    assert get(server, "/healthz") == (503, b"trust store not loaded: /etc/x.pem: cannot read\n")
    HEALTH["now"] = (True, "")


def test_other_paths_are_404_and_a_query_string_is_ignored(server: MetricsServer) -> None:
    assert get(server, "/")[0] == 404
    assert get(server, "/metrics/x")[0] == 404
    assert get(server, "/healthz?verbose=1")[0] == 200


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
        (b"GET /metrics\r\n\r\n", b"400"),
        (b"\x00\xff garbage \r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n", b"431"),
        (b"GET /healthz HTTP/1.1\r\n", b"400"),  # the peer ended before the head did
    ],
)
def test_hostile_requests_get_a_defined_answer(
    server: MetricsServer, request_bytes: bytes, status: bytes
) -> None:
    assert exchange(server, request_bytes).split(b" ")[1] == status
    assert get(server, "/healthz")[0] == 200  # and the server still serves


def test_head_gets_the_head_only(server: MetricsServer) -> None:
    answer = exchange(server, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\n")


def test_a_silent_peer_gets_408_after_the_read_timeout(
    server: MetricsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_http, "READ_TIMEOUT", 0.3)
    started = time.monotonic()
    answer = exchange(server, b"GET /metr", shut=False)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 5


def test_a_failing_health_check_is_a_500_not_a_dead_server() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("bug")

    with MetricsServer("127.0.0.1:0", metrics.render, broken) as running:
        assert get(running, "/healthz")[0] == 500
        assert get(running, "/metrics")[0] == 200


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=300))
def test_any_bytes_get_an_answer_or_a_close_and_the_server_lives(
    server: MetricsServer, data: bytes
) -> None:
    answer = exchange(server, data + b"\r\n\r\n")
    assert answer == b"" or answer.startswith(b"HTTP/1.1 ")
    assert get(server, "/healthz")[0] == 200


def test_socket_accepts_says_why_not(tmp_path: object) -> None:
    assert "No such file" in socket_accepts("unix:/nonexistent/milter.sock")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert socket_accepts(f"inet:{port}@127.0.0.1") == ""
    assert socket_accepts(f"inet:{port}@127.0.0.1") != ""


def test_metrics_config_keys() -> None:
    config = config_from_mapping({"metrics": {"listen": "[::1]:9898"}})
    assert config.metrics.listen == "[::1]:9898"
    assert config.metrics.policy_map_listen == ""
    with pytest.raises(ConfigError, match=r"\[metrics\] listen"):
        config_from_mapping({"metrics": {"listen": "9898"}})
    with pytest.raises(ConfigError, match=r"\[metrics\] policy_map_listen"):
        config_from_mapping({"metrics": {"policy_map_listen": "host:port"}})


def test_metric_names_are_the_documented_ones() -> None:
    names = set(metrics.metric_names())
    assert {
        "mtls_milter_verdicts_total",
        "mtls_milter_actions_total",
        "mtls_milter_dns_lookup_seconds",
        "mtls_milter_config_last_reload_ok",
        "mtls_milter_build_info",
    } <= names
    assert len(names) == 20


def test_ipv6_listen_address() -> None:
    try:
        socket.socket(socket.AF_INET6).close()
        server = MetricsServer("[::1]:0", metrics.render, lambda: (True, "")).start()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        with socket.create_connection(("::1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        server.stop()


@pytest.mark.parametrize("transport", ["asyncio", "pymilter"])
def test_serve_refuses_to_start_when_the_metrics_address_is_taken(
    tmp_path: Path, transport: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(
            f'[milter]\nsocket = "inet:{free_port()}@127.0.0.1"\ntransport = "{transport}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
        )
        done = subprocess.run(
            [sys.executable, "-m", "mtls_milter", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on [metrics] listen 127.0.0.1:{port}: " in done.stderr
    assert "Address already in use" in done.stderr


def test_a_client_that_resets_mid_request_leaves_no_error_in_the_log(
    server: MetricsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who can reach the port could otherwise fill the log with tracebacks."""
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"GET /metr")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # linger 0: a reset, not a FIN
    assert get(server, "/healthz")[0] == 200  # still answering
    time.sleep(0.2)
    assert not [r for r in caplog.records if r.levelno >= 40], caplog.text
