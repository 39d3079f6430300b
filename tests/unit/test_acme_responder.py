"""The HTTP-01 responder: what it serves, what it refuses (traversal, methods, sizes), its log."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.ports import free_port

from mtls_milter.acme.responder import (
    MAX_FILE,
    Responder,
    ResponderThread,
    lookup_token,
)
from mtls_milter.endpoints import parse_host_port

TOKEN = "tok_en-0123456789abcdefghijkl"
KEYAUTH = TOKEN + ".thumbprint_of_the_account_key_xxxxxxxxxxxxx"
PREFIX = "/.well-known/acme-challenge/"


@pytest.fixture
def token_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tokens"
    directory.mkdir()
    (directory / TOKEN).write_text(KEYAUTH + "\n")
    (tmp_path / "secret").write_text("do not serve\n")
    return directory


@pytest.fixture
def responder(token_dir: Path) -> Iterator[tuple[str, int]]:
    with ResponderThread(token_dir, [("127.0.0.2", 0)]) as thread:
        yield thread.addresses[0]


def exchange(where: tuple[str, int], raw: bytes, *, timeout: float = 5) -> tuple[int, bytes, bytes]:
    """Send ``raw``, read until close: (status, head, body)."""
    with socket.create_connection(where, timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), head, body


def get(where: tuple[str, int], target: str, method: str = "GET") -> tuple[int, bytes, bytes]:
    raw = f"{method} {target} HTTP/1.1\r\nHost: mx.test\r\nUser-Agent: t\r\n\r\n"
    return exchange(where, raw.encode("latin-1"))


def test_serves_the_key_authorization(responder: tuple[str, int]) -> None:
    status, head, body = get(responder, PREFIX + TOKEN)
    assert status == 200 and body == (KEYAUTH + "\n").encode()
    assert b"Content-Type: application/octet-stream" in head
    assert f"Content-Length: {len(body)}".encode() in head


def test_head_has_no_body(responder: tuple[str, int]) -> None:
    status, head, body = get(responder, PREFIX + TOKEN, "HEAD")
    assert status == 200 and body == b""
    assert f"Content-Length: {len(KEYAUTH) + 1}".encode() in head


def test_absolute_form_and_http_1_0(responder: tuple[str, int]) -> None:
    assert get(responder, f"http://mx.test{PREFIX}{TOKEN}")[0] == 200
    raw = f"GET {PREFIX}{TOKEN} HTTP/1.0\r\n\r\n".encode()
    assert exchange(responder, raw)[0] == 200


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/secret",
        PREFIX,
        PREFIX + "unknowntoken",
        PREFIX + "../secret",
        PREFIX + "..%2Fsecret",
        PREFIX + "%2e%2e%2fsecret",
        PREFIX + "%2E%2E/secret",
        PREFIX + TOKEN + "/",
        PREFIX + TOKEN + "?x=1",
        PREFIX + TOKEN + "%00",
        PREFIX + TOKEN + ";x",
        PREFIX + "..",
        PREFIX + ".",
        "/.well-known/acme-challenge/../../secret",
        "/.well-known/acme-challenge//" + TOKEN,
        "//.well-known/acme-challenge/" + TOKEN,
        "/.well-known/./acme-challenge/" + TOKEN,
        "/.WELL-KNOWN/acme-challenge/" + TOKEN,
        "\\.well-known\\acme-challenge\\" + TOKEN,
        PREFIX + "a" * 300,
    ],
)
def test_everything_else_is_404(responder: tuple[str, int], target: str) -> None:
    status, _, body = get(responder, target)
    assert status == 404 and b"do not serve" not in body


def test_symlink_out_of_the_directory_is_refused(token_dir: Path, tmp_path: Path) -> None:
    outside = "outside_link_0123456789abc"
    inside = "inside_link_0123456789abcd"
    (token_dir / outside).symlink_to(tmp_path / "secret")
    (token_dir / inside).symlink_to(token_dir / TOKEN)
    assert lookup_token(token_dir, outside) == (None, "token file leaves the directory (symlink)")
    assert lookup_token(token_dir, inside) == ((KEYAUTH + "\n").encode(), "")


def test_only_small_regular_files(token_dir: Path) -> None:
    (token_dir / "adirectory").mkdir()
    os.mkfifo(token_dir / "afifo")
    (token_dir / "abigfile").write_bytes(b"x" * (MAX_FILE + 1))
    assert lookup_token(token_dir, "adirectory")[1] == "not a regular file"
    assert lookup_token(token_dir, "afifo")[1] == "not a regular file"  # does not block
    assert lookup_token(token_dir, "abigfile")[1] == f"file larger than {MAX_FILE} bytes"
    assert lookup_token(token_dir, "missing")[1] == "no such token"
    assert lookup_token(token_dir, "a/b")[1] == "not a token"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST /x HTTP/1.1\r\nHost: a\r\n\r\n", 405),
        (b"DELETE " + (PREFIX + TOKEN).encode() + b" HTTP/1.1\r\nHost: a\r\n\r\n", 405),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET " + (PREFIX + TOKEN).encode() + b" HTTP/1.1\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 10000 + b"\r\n\r\n", 431),
    ],
)
def test_bad_requests(responder: tuple[str, int], raw: bytes, status: int) -> None:
    got, head, _ = exchange(responder, raw)
    assert got == status
    if status == 405:
        assert b"Allow: GET, HEAD" in head


def test_slow_client_gets_408(token_dir: Path) -> None:
    async def main() -> tuple[int, float]:
        server = Responder(token_dir, [("127.0.0.2", 0)], read_timeout=0.3)
        (where,) = await server.start()
        start = time.monotonic()
        reader, writer = await asyncio.open_connection(*where)
        writer.write(b"GET / HTTP/1.1\r\n")
        data = await reader.read()
        writer.close()
        await server.close()
        return int(data.split(b" ")[1]), time.monotonic() - start

    status, elapsed = asyncio.run(main())
    assert status == 408 and elapsed < 2


def test_one_log_line_per_request(
    responder: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="mtls_milter.acme.respond"):
        get(responder, PREFIX + TOKEN)
        get(responder, PREFIX + "..%2Fsecret\x7f")
        time.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith(f"127.0.0.1 GET {PREFIX}{TOKEN} 200 {len(KEYAUTH) + 1} host=mx.test")
    assert " 404 " in lines[1] and "(not a token)" in lines[1] and "\x7f" not in lines[1]
    assert all("\n" not in line for line in lines)


def test_many_concurrent_requests(responder: tuple[str, int]) -> None:
    results: list[int] = []

    def worker() -> None:
        results.append(get(responder, PREFIX + TOKEN)[0])

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [200] * 20


def test_bind_error_is_raised(token_dir: Path) -> None:
    port = free_port()
    with ResponderThread(token_dir, [("127.0.0.1", port)]), pytest.raises(OSError):
        ResponderThread(token_dir, [("127.0.0.1", port)]).start()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.2:8080", ("127.0.0.2", 8080)),
        ("[::1]:80", ("::1", 80)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["80", "::1:80", "[::1]80", "host:port", "a:70000", "[::1]"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)
