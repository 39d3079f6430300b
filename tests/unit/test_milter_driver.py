"""The asyncio milter server: real sockets (unix, inet, inet6), raw frames and Debian's miltertest.

The test handler inserts ``X-Test: <queue id>`` at the top at end of message and accepts; every
scenario ends by checking that a normal conversation still gets that header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mtls_milter.inbound import events as ev
from mtls_milter.inbound.asyncio_driver import MilterServer, run
from mtls_milter.inbound.negotiation import MilterOptions
from mtls_milter.inbound.replies import Action, InsertHeader, Reply
from mtls_milter.inbound.wire import ActionFlag, ProtocolFlag, Stage

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "bench" / "lua" / "conversation.lua"
OPTIONS = MilterOptions(actions=ActionFlag.ADDHDRS, macros={Stage.ENVFROM: ("i",)})


def frame(command: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload) + 1) + command + payload


def strings(command: bytes, *parts: bytes) -> bytes:
    return frame(command, b"".join(p + b"\0" for p in parts))


OPTNEG = frame(b"O", struct.pack(">III", 6, 0x1FF, 0x1FFFFF))
CONNECT = frame(b"C", b"client.test\x004" + struct.pack(">H", 4711) + b"192.0.2.25\0")
CONVERSATION = b"".join(
    [
        OPTNEG,
        CONNECT,
        strings(b"H", b"client.test"),
        frame(b"D", b"Mi\0Q123\0"),
        strings(b"M", b"<a@sender.test>"),
        strings(b"R", b"<b@receiver.test>"),
        frame(b"T"),
        strings(b"L", b"From", b"a@sender.test"),
        frame(b"N"),
        frame(b"B", b"hello\r\n"),
        frame(b"E"),
        frame(b"Q"),
    ]
)
OPTNEG_REPLY = frame(b"O", struct.pack(">III", 6, 0x101, 0) + b"\0\0\0\x02i\0")
EXPECTED = (
    OPTNEG_REPLY
    + frame(b"c") * 8  # connect, helo, mail, rcpt, data, header, eoh, body
    + frame(b"i", b"\0\0\0\0X-Test\0Q123\0")
    + frame(b"a")
)  # fmt: skip


class RecordingHandler:
    """Inserts X-Test at end of message; records every event of its connection."""

    def __init__(self, log: list[ev.Event], hook: Callable[[ev.Event], Awaitable[None]] | None):
        self.log = log
        self.hook = hook

    async def on_event(self, event: ev.Event) -> Reply | None:
        self.log.append(event)
        if self.hook is not None:
            await self.hook(event)
        if isinstance(event, ev.EndOfMessage):
            queue_id = event.macros.text("i") or "none"
            return Reply(Action.ACCEPT, modifications=(InsertHeader(0, "X-Test", queue_id),))
        return None


@contextlib.asynccontextmanager
async def serving(
    spec: str,
    hook: Callable[[ev.Event], Awaitable[None]] | None = None,
    **kwargs: Any,
) -> AsyncIterator[tuple[MilterServer, list[ev.Event]]]:
    seen: list[ev.Event] = []
    server = MilterServer(spec, lambda peer: RecordingHandler(seen, hook), OPTIONS, **kwargs)
    await server.start()
    try:
        yield server, seen
    finally:
        await server.aclose()


async def open_client(server: MilterServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if server.spec.startswith("unix:"):
        return await asyncio.open_unix_connection(server.spec[5:])
    host = server.spec.split("@", 1)[1].strip("[]")
    return await asyncio.open_connection(host, server.port)


async def talk(server: MilterServer, stream: bytes, timeout: float = 5.0) -> bytes:
    """Send ``stream``, then read until the server closes."""
    reader, writer = await open_client(server)
    writer.write(stream)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def normal_conversation_works(server: MilterServer) -> None:
    assert await talk(server, CONVERSATION) == EXPECTED


@pytest.fixture
def unix_spec(tmp_path: Path) -> str:
    return f"unix:{tmp_path / 'milter.sock'}"


def test_conversation_on_unix_socket(unix_spec: str) -> None:
    async def main() -> list[ev.Event]:
        async with serving(unix_spec) as (server, seen):
            await normal_conversation_works(server)
            assert oct(Path(unix_spec[5:]).stat().st_mode & 0o777) == "0o660"
            return seen

    seen = run(main())
    assert [type(e).__name__ for e in seen][-3:] == ["EndOfMessage", "Quit", "ConnectionClosed"]


@pytest.mark.parametrize("spec", ["inet:0@127.0.0.1", "inet6:0@[::1]"])
def test_conversation_over_tcp_with_nodelay(spec: str) -> None:
    if spec.startswith("inet6") and not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def main() -> None:
        async with serving(spec) as (server, _):
            reader, writer = await open_client(server)
            writer.write(OPTNEG)
            assert await reader.readexactly(len(OPTNEG_REPLY)) == OPTNEG_REPLY
            # White box: the accepted socket must not wait for ACKs before small writes.
            (stream,) = server._streams
            transport = stream._transport
            assert transport is not None
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            writer.close()
            await normal_conversation_works(server)

    try:
        run(main())
    except OSError as exc:  # e.g. no ::1 in this container
        pytest.skip(f"cannot listen: {exc}")


@pytest.mark.parametrize(
    ("garbage", "reason", "answer"),
    [
        (
            OPTNEG + CONNECT + frame(b"D", b"Mi\0x\0j\0"),
            "odd number of strings (3)",
            OPTNEG_REPLY + frame(b"c"),
        ),
        (OPTNEG + b"\x80\x00\x00\x00", "frame of 2147483648 bytes exceeds", OPTNEG_REPLY),
        (OPTNEG + CONNECT[:-4], "connection closed inside a frame (27 of 31 bytes)", OPTNEG_REPLY),
        (OPTNEG + strings(b"L", b"a", b"b"), "command 'L' out of order", OPTNEG_REPLY),
        (b"GET / HTTP/1.0\r\n\r\n", "frame of 1195725856 bytes exceeds", b""),
    ],
)
def test_hostile_frames_close_only_their_conversation(
    unix_spec: str, garbage: bytes, reason: str, answer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> bytes:
        async with serving(unix_spec) as (server, _):
            reader, writer = await open_client(server)
            writer.write(garbage)
            if garbage.endswith(CONNECT[:-4]):
                writer.write_eof()  # the truncated frame ends with the connection
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await normal_conversation_works(server)
            return answer

    assert run(main()) == answer  # nothing after the bad frame, then the socket is closed
    assert any(reason in r.getMessage() for r in caplog.records)


def test_thousand_idle_connections_do_not_stop_the_next_conversation(unix_spec: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2300:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))

    async def main() -> None:
        async with serving(unix_spec) as (server, seen):
            idle = [await open_client(server) for _ in range(1000)]
            for _, writer in idle[::2]:
                writer.write(OPTNEG)  # half of them negotiate, then say nothing
            await asyncio.sleep(0.2)
            assert server.connections == 1000
            await normal_conversation_works(server)
            for _, writer in idle:
                writer.close()
        closed = [e for e in seen if isinstance(e, ev.ConnectionClosed)]
        assert len(closed) == 1001

    try:
        run(main())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connection_cap_refuses_extra_connections(
    unix_spec: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(unix_spec, max_connections=2, command_timeout=0.2) as (server, _):
            held = [await open_client(server) for _ in range(2)]
            await asyncio.sleep(0.05)
            reader, _ = await open_client(server)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at once
            for _, writer in held:
                writer.close()
            await asyncio.sleep(0.3)
            await normal_conversation_works(server)

    run(main())
    assert "2 connections open: refusing new ones" in caplog.text


def test_idle_and_stalled_connections_are_swept(
    unix_spec: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(unix_spec, idle_timeout=0.3, command_timeout=0.3) as (server, seen):
            idle_reader, _ = await open_client(server)
            stalled_reader, stalled = await open_client(server)
            stalled.write(OPTNEG + CONNECT[:7])  # a command that never completes
            for reader in (idle_reader, stalled_reader):
                await asyncio.wait_for(reader.read(), 5)
            assert server.connections == 0
            await normal_conversation_works(server)
        reasons = sorted(e.reason for e in seen if isinstance(e, ev.ConnectionClosed))
        assert reasons == ["idle for 0.3 s", "incomplete command for 0.3 s", "quit"]

    run(main())
    assert "idle for 0.3 s" in caplog.text and "incomplete command for 0.3 s" in caplog.text


def test_a_failing_handler_costs_a_continue_not_the_server(
    unix_spec: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def explode(event: ev.Event) -> None:
        if isinstance(event, ev.Helo):
            raise RuntimeError("boom")

    async def main() -> bytes:
        async with serving(unix_spec, hook=explode) as (server, _):
            return await talk(server, CONVERSATION)

    assert run(main()) == EXPECTED  # the HELO got CONTINUE like every other step
    assert "milter handler failed on Helo; answering CONTINUE" in caplog.text


def test_handlers_run_inside_a_task(unix_spec: str, caplog: pytest.LogCaptureFixture) -> None:
    """asyncio.timeout() and friends need a current task: every handler call has one."""

    async def bounded(event: ev.Event) -> None:
        async with asyncio.timeout(5):
            await asyncio.sleep(0)

    async def main() -> bytes:
        async with serving(unix_spec, hook=bounded) as (server, _):
            return await talk(server, CONVERSATION)

    assert run(main()) == EXPECTED
    assert "handler failed" not in caplog.text


def test_pipelined_headers_without_replies_are_all_delivered(unix_spec: str) -> None:
    """With NR_HDR the MTA streams headers; a slow handler makes the driver pause reading."""
    options = MilterOptions(actions=ActionFlag.ADDHDRS, protocol=ProtocolFlag.NR_HDR)
    headers = strings(b"L", b"X-Filler", b"v" * 1000) * 2000  # 2 MB: far past the read pause
    stream = CONVERSATION.replace(strings(b"L", b"From", b"a@sender.test"), headers)

    async def main() -> tuple[bytes, int]:
        seen: list[ev.Event] = []

        async def slow(event: ev.Event) -> None:
            if isinstance(event, ev.Header) and len(seen) % 100 == 0:
                await asyncio.sleep(0.001)

        handler = RecordingHandler(seen, slow)
        server = MilterServer(unix_spec, lambda peer: handler, options)
        await server.start()
        try:
            answer = await talk(server, stream, timeout=30)
        finally:
            await server.aclose()
        return answer, sum(isinstance(e, ev.Header) for e in seen)

    answer, count = run(main())
    assert count == 2000
    assert answer.endswith(frame(b"i", b"\0\0\0\0X-Test\0Q123\0") + frame(b"a"))


def test_shutdown_ends_open_conversations(unix_spec: str) -> None:
    async def main() -> list[ev.Event]:
        async with serving(unix_spec) as (server, seen):
            reader, writer = await open_client(server)
            writer.write(OPTNEG + CONNECT + strings(b"H", b"h") + strings(b"M", b"<a>"))
            await reader.readexactly(len(OPTNEG_REPLY) + 3 * 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        return seen

    seen = run(main())
    assert seen[-2:] == [ev.Abort(), ev.ConnectionClosed("server shutting down", True)]


@pytest.mark.skipif(shutil.which("miltertest") is None, reason="miltertest is not installed")
@pytest.mark.parametrize("spec", ["unix", "inet:0@127.0.0.1"])
def test_miltertest_conversations(spec: str, tmp_path: Path) -> None:
    """Debian's miltertest (libmilter's MTA side) runs 20 full conversations against us."""
    if spec == "unix":
        spec = f"unix:{tmp_path / 'mt.sock'}"

    async def main() -> str:
        async with serving(spec) as (server, _):
            target = spec if spec.startswith("unix") else f"inet:{server.port}@127.0.0.1"
            process = await asyncio.create_subprocess_exec(
                "miltertest", "-D", f"sock={target}", "-D", "count=20", "-D", "deadline=9999999999",
                "-D", "header=X-Test", "-D", "show=1", "-s", str(LUA),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(process.communicate(), 60)
            return out.decode(errors="replace")

    out = run(main())
    assert "DONE 20" in out, out
    assert "HEADER Q1" in out, out  # the queue id macro the script sends at MAIL


def test_run_uses_the_stock_loop_without_uvloop() -> None:
    async def answer() -> int:
        return 42

    assert run(answer()) == 42


def test_bad_socket_spec_is_refused() -> None:
    server = MilterServer("tcp:25", lambda peer: RecordingHandler([], None), OPTIONS)
    with pytest.raises(ValueError, match="expected unix:/path or inet:PORT@HOST"):
        run(server.start())


logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "Task was destroyed" noise at teardown


def test_shutdown_does_not_wait_forever_for_a_stuck_handler(unix_spec: str) -> None:
    async def stuck(event: ev.Event) -> None:
        if isinstance(event, ev.Helo):
            await asyncio.sleep(3600)

    async def main() -> bytes:
        seen: list[ev.Event] = []
        server = MilterServer(unix_spec, lambda peer: RecordingHandler(seen, stuck), OPTIONS)
        await server.start()
        reader, writer = await open_client(server)
        writer.write(OPTNEG + CONNECT + strings(b"H", b"h"))
        await reader.readexactly(len(OPTNEG_REPLY) + 5)
        await asyncio.wait_for(server.aclose(grace=0.2), 5)
        return await asyncio.wait_for(reader.read(), 5)

    assert run(main()) == b""


SERVER_WITH_FEW_FILES = """
import asyncio, resource, sys
from mtls_milter.inbound.asyncio_driver import MilterServer
from mtls_milter.inbound.events import EndOfMessage
from mtls_milter.inbound.negotiation import MilterOptions
from mtls_milter.inbound.replies import Action, InsertHeader, Reply
from mtls_milter.inbound.wire import ActionFlag, Stage

class Handler:
    async def on_event(self, event):
        if isinstance(event, EndOfMessage):
            value = event.macros.text("i") or "none"
            return Reply(Action.ACCEPT, modifications=(InsertHeader(0, "X-Test", value),))
        return None

async def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    options = MilterOptions(actions=ActionFlag.ADDHDRS, macros={Stage.ENVFROM: ("i",)})
    server = MilterServer(sys.argv[1], lambda peer: Handler(), options)
    await server.start()
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_file_descriptors_pauses_accepting_instead_of_spinning(unix_spec: str) -> None:
    """100 connections over RLIMIT_NOFILE = 64: the server waits, then serves again."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_WITH_FEW_FILES, unix_spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        held = []
        for _ in range(100):
            client = socket.socket(socket.AF_UNIX)
            client.connect(unix_spec[5:])
            held.append(client)
        time.sleep(0.5)
        before = _cpu_seconds(process.pid)
        time.sleep(2.0)
        assert _cpu_seconds(process.pid) - before < 0.5  # asyncio's own loop: ~2 s of CPU
        for client in held:
            client.close()
        time.sleep(1.5)  # the retry delay
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(unix_spec[5:])
            client.sendall(CONVERSATION)
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        assert answer == EXPECTED
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert "milter: cannot accept connections: Too many open files; retrying in 1 s" in stderr


def test_per_peer_cap_counts_unix_peers_by_uid(
    unix_spec: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(unix_spec, max_per_peer=1) as (server, _):
            _, held = await open_client(server)
            await asyncio.sleep(0.05)
            reader, _ = await open_client(server)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            held.close()
            await asyncio.sleep(0.1)
            await normal_conversation_works(server)

    run(main())
    assert f"1 connections open from uid {os.getuid()}: refusing new ones" in caplog.text
