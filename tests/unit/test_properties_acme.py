"""Properties of the ACME parsers: tokens and JWKs, the validator's handling of HTTP responses
(status, Location, body) and raw response bytes, and the responder's request parsing.

Everything an MX host or an HTTP client sends is hostile: the validator must reach a verdict
(``valid`` only for the exact key authorization) with a printable reason and never raise; the
HTTP client must turn any bytes into a FetchResponse; the responder must answer any request head
with a well-formed response and serve a file only for the exact challenge path.
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mtls_milter.acme.fetch import FetchError, FetchRequest, FetchResponse, http_fetch
from mtls_milter.acme.keyauth import (
    MIN_TOKEN_LENGTH,
    JwkError,
    check_token,
    is_token,
    jwk_thumbprint,
    key_authorization,
)
from mtls_milter.acme.responder import ResponderThread
from mtls_milter.acme.results import Status, ValidatorPolicy
from mtls_milter.acme.validator import CHALLENGE_PATH, validate
from mtls_milter.core.lookups import AddressLookup, HostLookup, LookupStatus

SETTINGS = settings(max_examples=150, deadline=None)
PRINTABLE = re.compile(r"[ -~]*")
REASON_MAX = 2000  # several hosts' reasons, each quoting at most a few hundred characters
TOKEN = "A" * 22 + "-_bcdefgh0123456789"
THUMBPRINT = base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"=").decode()
KEY_AUTHORIZATION = f"{TOKEN}.{THUMBPRINT}"

b64url = st.from_regex(r"[A-Za-z0-9_-]{1,80}", fullmatch=True)

# --- tokens, thumbprints, key authorizations ---------------------------------------------------


@SETTINGS
@given(st.one_of(st.text(max_size=300), b64url, st.builds(lambda n: "a" * n, st.integers(0, 400))))
def test_check_token_agrees_with_is_token(text: str) -> None:
    try:
        assert check_token(text) == text
    except ValueError:
        assert not is_token(text, min_length=MIN_TOKEN_LENGTH)
    else:
        assert is_token(text, min_length=MIN_TOKEN_LENGTH)


@SETTINGS
@given(
    st.from_regex(r"[A-Za-z0-9_-]{22,80}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9_-]{43}", fullmatch=True),
)
def test_key_authorization_splits_back(token: str, thumbprint: str) -> None:
    token_part, dot, thumb_part = key_authorization(token, thumbprint).partition(".")
    assert (token_part, dot, thumb_part) == (token, ".", thumbprint)


json_value: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | b64url,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
jwk_like = st.one_of(
    st.dictionaries(
        st.sampled_from(["kty", "crv", "x", "y", "n", "e", "d", "kid"]),
        st.one_of(st.sampled_from(["RSA", "EC", "OKP", "P-256", "Ed25519"]), b64url, json_value),
        max_size=6,
    ),
    json_value,
)


@SETTINGS
@given(jwk_like)
@example({"kty": "EC", "crv": "P-256", "x": "a", "y": "b/"})
@example({"kty": ["RSA"]})  # was TypeError: unhashable type: 'list'
def test_jwk_thumbprint_is_a_digest_or_jwk_error(jwk: Any) -> None:
    try:
        thumbprint = jwk_thumbprint(jwk)
    except JwkError as exc:
        assert "\n" not in str(exc)
        return
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", thumbprint)


@SETTINGS
@given(
    st.fixed_dictionaries(
        {"kty": st.just("EC"), "crv": st.just("P-256"), "x": b64url, "y": b64url}
    ),
    st.dictionaries(st.sampled_from(["d", "kid", "use", "alg"]), b64url, max_size=3),
)
def test_jwk_thumbprint_ignores_member_order_and_other_members(
    jwk: dict[str, str], extra: dict[str, str]
) -> None:
    reordered = dict(reversed(list({**jwk, **extra}.items())))
    assert jwk_thumbprint(reordered) == jwk_thumbprint(jwk)


# --- the validator's handling of responses -------------------------------------------------------


class _Resolver:
    def client_mx(self, domain: str, budget: float) -> HostLookup:
        return HostLookup(LookupStatus.OK, ("mx1.sender.test", "mx2.sender.test"))

    def server_mx(self, domain: str, budget: float) -> HostLookup:
        return HostLookup(LookupStatus.OK, ("mx1.sender.test",))

    def addresses(self, host: str, budget: float) -> AddressLookup:
        if host.startswith("mx"):
            return AddressLookup(LookupStatus.OK, ("192.0.2.1", "192.0.2.2"))
        return AddressLookup(LookupStatus.OK, ("192.0.2.9",))


location = st.one_of(
    st.none(),
    st.text(max_size=60),
    st.sampled_from(
        [
            "/.well-known/acme-challenge/x",
            "https://mx1.sender.test/x",
            "http://other.test:80/y",
            "http://192.0.2.5/",
            "ftp://mx1.sender.test/",
            "http://user:pw@mx1.sender.test/",
            "http://mx1.sender.test:8080/",
            "http://[::1/",
            "http://mx1.sender.test:99999/",
            "//\u00e9.test/",
            "http://a..b/",
        ]
    ),
)
body = st.one_of(
    st.binary(max_size=120),
    st.sampled_from(
        [
            KEY_AUTHORIZATION.encode(),
            KEY_AUTHORIZATION.encode() + b" \r\n\t",
            b" " + KEY_AUTHORIZATION.encode(),
            KEY_AUTHORIZATION.encode()[:-1],
            f"{TOKEN}.{'B' * 43}".encode(),
            f"{'C' * 22}.{THUMBPRINT}".encode(),
        ]
    ),
)
response = st.one_of(
    st.builds(FetchResponse, status=st.just(200), body=body),
    st.builds(FetchResponse, status=st.sampled_from([301, 302, 303, 307, 308]), location=location),
    st.builds(FetchResponse, status=st.integers(0, 999), location=location, body=body),
    # http_fetch's detail is one printable line (a property of its own below).
    st.builds(
        FetchResponse,
        error=st.sampled_from(list(FetchError)),
        detail=st.from_regex(r"[ -~]{0,200}", fullmatch=True),
    ),
)


class _Fetch:
    """Answers the n-th request with the n-th drawn response (the last one repeats)."""

    def __init__(self, responses: list[FetchResponse]) -> None:
        self.responses = responses
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, request: FetchRequest) -> FetchResponse:
        with self.lock:
            index = min(self.calls, len(self.responses) - 1)
            self.calls += 1
        return self.responses[index]


def expected_valid(responses: list[FetchResponse], requests: int) -> bool:
    """Without redirects every request is one address check; each must see the key."""
    return all(
        r.error is FetchError.NONE
        and r.status == 200
        and r.body.decode("latin-1").rstrip(" \t\r\n") == KEY_AUTHORIZATION
        for r in (responses[min(i, len(responses) - 1)] for i in range(requests))
    )


@SETTINGS
@given(
    st.lists(response, min_size=1, max_size=6),
    st.sampled_from(["client-mx-http-01", "server-mx-http-01"]),
)
@example([FetchResponse(status=302, location="/loop")], "client-mx-http-01")
@example(
    [FetchResponse(status=302, location="/loop")] * 10
    + [FetchResponse(status=302, location="/\u00e9\r\nX: forged")],
    "server-mx-http-01",
)
@example([FetchResponse(status=302, location="http://x.test/\u00e9\n")], "client-mx-http-01")
def test_validation_reaches_a_verdict_for_any_responses(
    responses: list[FetchResponse], challenge: str
) -> None:
    fetch = _Fetch(responses)
    policy = ValidatorPolicy(max_parallel=1)
    result = validate(
        challenge,
        "sender.test",
        TOKEN,
        THUMBPRINT,
        resolver=_Resolver(),
        fetch=fetch,
        policy=policy,
    )
    assert result.status in set(Status)
    texts = [result.reason] + [h.reason for h in result.hosts]
    texts += [a.reason for h in result.hosts for a in h.addresses]
    for text in texts:
        assert PRINTABLE.fullmatch(text) and len(text) <= REASON_MAX, text[:300]
    addresses = 4 if challenge == "client-mx-http-01" else 2
    assert fetch.calls <= addresses * (policy.max_redirects + 1)
    if not any(r.status in (301, 302, 303, 307, 308) and r.location for r in responses):
        assert result.valid == expected_valid(responses, addresses)


# --- the HTTP client on raw response bytes ------------------------------------------------------


@pytest.fixture(scope="module")
def raw_http_server() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback server answering each connection with the next queued bytes, then closing."""
    queue: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    data = b""
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                        data += chunk
                    conn.sendall(queue.pop(0) if queue else b"")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], queue
    stop.set()
    thread.join(2)
    listener.close()


status_line = st.one_of(
    st.sampled_from(
        [
            b"HTTP/1.1 200 OK",
            b"HTTP/1.0 302 Found",
            b"HTTP/1.1 404 Not Found",
            b"HTTP/1.1 99 X",
            b"HTTP/2 200",
            b"ICY 200 OK",
            b"",
        ]
    ),
    st.binary(max_size=30),
)
header_line = st.one_of(
    st.sampled_from(
        [
            b"Content-Length: 5",
            b"Content-Length: 99999999",
            b"Content-Length: -1",
            b"Transfer-Encoding: chunked",
            b"Location: http://x.test/\xe9",
            b"Location: /a\x00b",
            b"X: " + b"y" * 20000,
        ]
    ),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),
)
raw_response = st.builds(
    lambda line, headers, payload: (
        line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + payload
    ),
    status_line,
    st.lists(header_line, max_size=4),
    st.one_of(st.binary(max_size=100), st.just(b"5\r\nhello\r\n0\r\n\r\n"), st.just(b"x" * 9000)),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(raw_response, st.binary(max_size=200)))
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
@example(b"\x00")  # was detail "malformed HTTP response (BadStatusLine: \x00)", a raw NUL
@example(b"\xff\xfe\r\n\r\n")
def test_http_fetch_turns_any_bytes_into_a_response(
    raw_http_server: tuple[int, list[bytes]], data: bytes
) -> None:
    port, queue = raw_http_server
    queue.append(data)
    request = FetchRequest("http", "127.0.0.1", port, "mx1.sender.test", "/x", 3.0, 8192)
    result = http_fetch(request)
    assert isinstance(result, FetchResponse)
    assert PRINTABLE.fullmatch(result.detail) and len(result.detail) <= 400, result.detail
    if result.error is FetchError.NONE:
        assert 100 <= result.status <= 999
        assert len(result.body) <= request.max_body
        if data.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"):
            assert result.body == b"abc"
    else:
        assert result.error is not FetchError.TIMEOUT  # the server always closes at once


# --- the responder's request parsing ------------------------------------------------------------

RESPONSE_HEAD = re.compile(rb"HTTP/1\.1 (\d{3}) [A-Za-z ]+\r\n(?:[A-Za-z-]+: [ -~]*\r\n)*\r\n")
SERVED = {TOKEN: b"served-key-authorization\n", "other": b"a short name is a token too\n"}
NOT_SERVED = b"never served: the name is not base64url\n"


@pytest.fixture(scope="module")
def responder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    directory: Path = tmp_path_factory.mktemp("tokens")
    for name, content in SERVED.items():
        (directory / name).write_bytes(content)
    (directory / "not.token").write_bytes(NOT_SERVED)
    with ResponderThread(directory, [("127.0.0.1", 0)]) as thread:
        yield thread.addresses[0]


def ask(address: tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as conn:
        with contextlib.suppress(OSError):
            conn.sendall(request)
            conn.shutdown(socket.SHUT_WR)
        reply = b""
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                reply += chunk
    return reply


request_target = st.one_of(
    st.just(CHALLENGE_PATH + TOKEN),
    st.sampled_from(
        [
            CHALLENGE_PATH + "other",
            CHALLENGE_PATH + "not.token",
            CHALLENGE_PATH + TOKEN + "?x",
            CHALLENGE_PATH + "../" + TOKEN,
            CHALLENGE_PATH + TOKEN.replace("A", "%41", 1),
            "/.well-known/acme-challenge/%2e%2e/" + TOKEN,
            "http://mx1.sender.test" + CHALLENGE_PATH + TOKEN,
            "*",
            "",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40).map(
        lambda s: CHALLENGE_PATH + s
    ),
    st.text(max_size=40),
)
request_head = st.builds(
    lambda method, target, version, headers: (
        f"{method} {target} {version}\r\n".encode("utf-8", "surrogateescape")
        + b"".join(headers)
        + b"\r\n"
    ),
    st.sampled_from(["GET", "HEAD", "POST", "get", "GET "]),
    request_target,
    st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1 x"]),
    st.lists(
        st.one_of(
            st.just(b"Host: mx1.sender.test\r\n"),
            st.binary(max_size=30).filter(lambda b: b"\n" not in b).map(lambda b: b + b"\r\n"),
            st.just(b" Host: x\r\n"),
        ),
        max_size=3,
    ),
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(request_head, st.binary(max_size=200)))
@example(f"GET {CHALLENGE_PATH}{TOKEN} HTTP/1.1\r\nHost: mx\r\n\r\n".encode())
def test_responder_answers_any_request_head_and_serves_only_the_exact_path(
    responder: tuple[str, int], raw: bytes
) -> None:
    reply = ask(responder, raw)
    if b"\r\n\r\n" not in raw:
        assert reply == b"" or RESPONSE_HEAD.match(reply)  # incomplete: closed or answered
        return
    match = RESPONSE_HEAD.match(reply)
    assert match is not None, reply[:200]
    status = int(match.group(1))
    assert status in (200, 400, 404, 405, 431, 505)
    content_length = int(re.search(rb"Content-Length: (\d+)", reply).group(1))  # type: ignore[union-attr]
    line = raw.split(b"\r\n", 1)[0]
    method, _, rest = line.partition(b" ")
    target = rest.rpartition(b" ")[0]
    path = target.removeprefix(b"http://mx1.sender.test")
    name = path.removeprefix(CHALLENGE_PATH.encode()).decode("latin-1")
    assert NOT_SERVED not in reply
    if status == 200:
        assert method in (b"GET", b"HEAD") and path == CHALLENGE_PATH.encode() + name.encode()
        assert name in SERVED, target  # the exact challenge path of a file, nothing else
        assert content_length == len(SERVED[name])
        assert reply[match.end() :] == (b"" if method == b"HEAD" else SERVED[name])
    else:
        assert all(content not in reply for content in SERVED.values())
