"""Connection limits of the asyncio services: caps in total and per peer, rate-limited warnings,
and accept() running out of file descriptors (simulated here; the real EMFILE runs are in
tests/e2e/test_resource_limits.py)."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtls_milter.acme.responder import Responder
from mtls_milter.runtime.stream_service import (
    ConnectionLimits,
    Listener,
    RateLimitedLog,
    StreamService,
    tcp_listener_sockets,
)

log = logging.getLogger("test.stream_limits")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limited_log_says_how_many_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limited = RateLimitedLog(log, 10.0, clock)
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert limited.warning("out of %s", "fds")
        for _ in range(999):
            clock.now += 0.005
            assert not limited.warning("out of %s", "fds")
        clock.now += 10.0
        assert limited.warning("out of %s", "fds")
    assert [r.getMessage() for r in caplog.records] == [
        "out of fds",
        "out of fds (and 999 more times in the last 15 s)",
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=30.0), max_size=200))
def test_rate_limited_log_bounds_lines_and_loses_no_count(gaps: list[float]) -> None:
    """Whatever the timing: at most one line per interval (plus the first), and every event is
    either a line or counted in a later line or still pending."""
    clock = FakeClock()
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    sink = logging.getLogger("test.stream_limits.property")
    sink.propagate = False
    handler = Collect()
    sink.addHandler(handler)
    try:
        limited = RateLimitedLog(sink, 10.0, clock)
        start = clock.now
        for gap in gaps:
            clock.now += gap
            limited.warning("event")
        span = clock.now - start
    finally:
        sink.removeHandler(handler)
    assert len(lines) <= 1 + span / 10.0
    reported = sum(int(line.split("(and ")[1].split()[0]) for line in lines if "(and " in line)
    assert len(lines) + reported + limited.suppressed == len(gaps)


def test_listener_waits_and_logs_once_when_accept_runs_out_of_descriptors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Five EMFILE failures: one log line, a pause after each (no busy loop), then it serves."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        real_accept = loop.sock_accept
        failed_at: list[float] = []

        async def accept(sock: socket.socket) -> tuple[socket.socket, Any]:
            if len(failed_at) < 5:
                failed_at.append(loop.time())
                raise OSError(errno.EMFILE, "Too many open files")
            return await real_accept(sock)

        loop.sock_accept = accept  # type: ignore[method-assign]
        served = asyncio.Event()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            served.set()
            writer.close()

        sockets = tcp_listener_sockets("127.0.0.1", 0)
        listener = Listener(sockets, on_connect, log=RateLimitedLog(log), retry_delay=0.05)
        _, writer = await asyncio.open_connection(*sockets[0].getsockname())
        await asyncio.wait_for(served.wait(), 5)
        writer.close()
        listener.close()
        await listener.wait_closed()
        return failed_at

    with caplog.at_level(logging.WARNING, logger=log.name):
        failed_at = asyncio.run(main())
    assert len(failed_at) == 5
    assert all(b - a >= 0.04 for a, b in itertools.pairwise(failed_at))  # paused each time
    assert [r.getMessage() for r in caplog.records] == [
        "cannot accept connections: Too many open files; retrying every 0.05 s"
    ]


class Echo(StreamService):
    """Answers each line with itself; keeps the connection open until the client closes."""

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()


async def _open(host: str, port: int, source: str) -> tuple[asyncio.StreamReader, Any]:
    return await asyncio.open_connection(host, port, local_addr=(source, 0))


async def _echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """True when the service answers; False when it closed the connection."""
    writer.write(b"ping\n")
    try:
        return await asyncio.wait_for(reader.readline(), 2.0) == b"ping\n"
    except (ConnectionError, TimeoutError):
        return False


def test_caps_in_total_and_per_peer(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> list[bool]:
        service = Echo(
            "inet:0@127.0.0.1", socket_mode=0o600, log=log, max_connections=3, max_per_peer=2
        )
        server = await service.listen()
        opened = [
            await _open("127.0.0.1", service.port, source)
            for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.3")
        ]
        answers = [await _echoes(*pair) for pair in opened]
        opened[0][1].close()  # a slot frees up
        await asyncio.sleep(0.1)
        answers.append(await _echoes(*await _open("127.0.0.1", service.port, "127.0.0.3")))
        for _, writer in opened:
            writer.close()
        server.close()
        await service.close_connections()
        return answers

    with caplog.at_level(logging.WARNING, logger=log.name):
        answers = asyncio.run(main())
    # third from 127.0.0.1: over the per-peer cap; 127.0.0.3: over the total cap; then served
    assert answers == [True, True, False, True, False, True]
    assert [r.getMessage() for r in caplog.records] == [
        "2 connections open from 127.0.0.1: refusing new ones",
        "3 connections open: refusing new ones",
    ]


def test_unix_socket_peers_are_counted_by_user_id(tmp_path: Path) -> None:
    async def main() -> list[bool]:
        path = tmp_path / "echo.sock"
        service = Echo(f"unix:{path}", socket_mode=0o600, log=log, max_per_peer=2)
        server = await service.listen()
        pairs = [await asyncio.open_unix_connection(str(path)) for _ in range(3)]
        answers = [await _echoes(*pair) for pair in pairs]
        for _, writer in pairs:
            writer.close()
        server.close()
        await service.close_connections()
        return answers

    assert asyncio.run(main()) == [True, True, False]


def test_many_refusals_give_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        service = Echo("inet:0@127.0.0.1", socket_mode=0o600, log=log, max_connections=1)
        server = await service.listen()
        kept = await _open("127.0.0.1", service.port, "127.0.0.1")
        assert await _echoes(*kept)
        for _ in range(200):
            _, writer = await _open("127.0.0.1", service.port, "127.0.0.1")
            writer.close()
        await asyncio.sleep(0.2)
        kept[1].close()
        server.close()
        await service.close_connections()

    with caplog.at_level(logging.WARNING, logger=log.name):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records] == ["1 connections open: refusing new ones"]


def _http_get(where: tuple[str, int], source: str) -> bytes:
    with socket.create_connection(where, timeout=5, source_address=(source, 0)) as sock:
        sock.sendall(b"GET /.well-known/acme-challenge/tok_en HTTP/1.1\r\nHost: mx\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_responder_caps_idle_connections_and_still_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Idle connections beyond a cap get a 503 at once; a client from another address is served
    while the idle ones hold their slots; refusals are one log line, not one per connection."""
    (tmp_path / "tok_en").write_text("tok_en.thumbprint\n")

    async def main() -> tuple[list[bytes], bytes]:
        responder = Responder(tmp_path, [("127.0.0.1", 0)], max_connections=20, max_per_peer=10)
        (where,) = await responder.start()
        idle = [await _open(*where, "127.0.0.1") for _ in range(15)]
        await asyncio.sleep(0.2)
        refused: list[bytes] = []
        for reader, _ in idle:
            with_timeout = asyncio.wait_for(reader.read(100), 0.2)
            try:
                refused.append((await with_timeout).split(b"\r\n", 1)[0])
            except TimeoutError:
                refused.append(b"")
        served = await asyncio.to_thread(_http_get, where, "127.0.0.2")
        for _, writer in idle:
            writer.close()
        await responder.close()
        return refused, served

    with caplog.at_level(logging.INFO, logger="mtls_milter.acme.respond"):
        refused, served = asyncio.run(main())
    assert refused == [b""] * 10 + [b"HTTP/1.1 503 Service Unavailable"] * 5
    assert served == b"HTTP/1.1 200 OK"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["10 connections open from 127.0.0.1: refusing new ones"]


def test_fd_count_is_not_leaked_by_refusals() -> None:
    """Refused connections are closed on the server side too (no fd kept per refusal)."""

    async def main() -> tuple[int, int]:
        service = Echo("inet:0@127.0.0.1", socket_mode=0o600, log=log, max_connections=1)
        server = await service.listen()
        kept = await _open("127.0.0.1", service.port, "127.0.0.1")
        assert await _echoes(*kept)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(100):
            reader, writer = await _open("127.0.0.1", service.port, "127.0.0.1")
            assert await reader.read() == b""  # closed by the service
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.1)
        after = len(os.listdir("/proc/self/fd"))
        kept[1].close()
        server.close()
        await service.close_connections()
        return before, after

    before, after = asyncio.run(main())
    assert after <= before + 2


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", "uid 7"])), max_size=100),
    st.integers(min_value=0, max_value=5),
    st.integers(min_value=0, max_value=5),
)
def test_connection_limits_never_exceed_their_caps(
    steps: list[tuple[bool, str]], total: int, per_peer: int
) -> None:
    """Any sequence of connects and closes: the counts match what was admitted, within caps."""
    limits = ConnectionLimits(logging.getLogger("test.stream_limits.quiet"), total, per_peer)
    open_by_peer: dict[str, int] = {}
    for connect, peer in steps:
        if connect:
            full = bool(total and limits.active >= total) or bool(
                per_peer and open_by_peer.get(peer, 0) >= per_peer
            )
            assert limits.admit(peer) == (not full)  # refused exactly when a cap is reached
            if not full:
                open_by_peer[peer] = open_by_peer.get(peer, 0) + 1
        elif open_by_peer.get(peer):
            limits.release(peer)
            open_by_peer[peer] -= 1
        assert limits.active == sum(open_by_peer.values())
        assert not total or limits.active <= total
        assert not per_peer or all(n <= per_peer for n in open_by_peer.values())
