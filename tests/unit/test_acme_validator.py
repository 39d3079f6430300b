"""The CA-side validator against our responder and scripted hosts on 127.0.0.2-7 (loopback)."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

import pytest
from fixtures_acme import Account, MxHosts, new_account
from prometheus_client.parser import text_string_to_metric_families
from support.httphost import Reply, Request
from support.pki import TestPki

from mtls_milter.acme.fetch import FetchRequest, FetchResponse
from mtls_milter.acme.results import Problem, Status, ValidatorPolicy
from mtls_milter.acme.validator import CHALLENGE_PATH, validate
from mtls_milter.core.lookups import AddressLookup, HostLookup, LookupStatus

CLIENT = "client-mx-http-01"
SERVER = "server-mx-http-01"
MX1, MX2, MX3 = "127.0.0.2", "127.0.0.3", "127.0.0.4"


@pytest.fixture
def three_hosts(mx_hosts: MxHosts) -> MxHosts:
    """sender.test: Client MX mx1..mx3 at 127.0.0.2..4 (no servers started yet)."""
    dns = mx_hosts.dns
    dns.add("sender.test", 265, "10 mx1.sender.test.", "20 mx2.sender.test.", "30 mx3.other.test.")
    dns.add("mx1.sender.test", "A", MX1)
    dns.add("mx2.sender.test", "A", MX2)
    dns.add("mx3.other.test", "A", MX3)
    return mx_hosts


def serve_all(hosts: MxHosts, token: str, content: str, *addresses: str) -> None:
    for address in addresses or (MX1, MX2, MX3):
        hosts.responder(address, {token: content})


def test_all_hosts_answer_valid(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    serve_all(three_hosts, acme_token, acme_account.key_authorization(acme_token) + "\n")
    result = three_hosts.validate(CLIENT, "sender.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.VALID, result.reason
    assert result.valid and result.problem is Problem.NONE
    assert [h.host for h in result.hosts] == [
        "mx1.sender.test",
        "mx2.sender.test",
        "mx3.other.test",
    ]
    assert all(h.status is Status.VALID for h in result.hosts)
    assert [a.address for h in result.hosts for a in h.addresses] == [MX1, MX2, MX3]
    assert "all 3 Client MX host(s)" in result.reason and "every address" in result.reason
    data = result.as_dict()
    assert data["status"] == "valid" and data["type"] == CLIENT
    assert data["hosts"][0]["addresses"][0]["http_status"] == 200


def test_request_goes_to_each_address_with_the_host_name(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    keyauth = acme_account.key_authorization(acme_token)
    seen = [three_hosts.http(a, lambda r: Reply(body=keyauth.encode())) for a in (MX1, MX2, MX3)]
    result = three_hosts.validate(CLIENT, "sender.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.VALID, result.reason
    port = three_hosts.port
    for host, name in zip(
        seen, ["mx1.sender.test", "mx2.sender.test", "mx3.other.test"], strict=True
    ):
        (request,) = host.requests
        assert request.method == "GET"
        assert request.target == CHALLENGE_PATH + acme_token
        assert request.headers["host"] == f"{name}:{port}"
        assert "proxy-authorization" not in request.headers


def test_one_host_without_the_token_is_named(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    keyauth = acme_account.key_authorization(acme_token)
    serve_all(three_hosts, acme_token, keyauth, MX1, MX3)
    three_hosts.responder(MX2, {})
    result = three_hosts.validate(CLIENT, "sender.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID
    assert result.reason.startswith(
        f"mx2.sender.test: {MX2}: HTTP 404 from http://mx2.sender.test:"
    )
    assert result.problem is Problem.UNAUTHORIZED
    assert [h.status for h in result.hosts] == [Status.VALID, Status.INVALID, Status.VALID]


def test_wrong_key_authorization(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    other = new_account()
    serve_all(three_hosts, acme_token, other.key_authorization(acme_token))
    result = three_hosts.validate(CLIENT, "sender.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID
    assert "wrong key authorization: right token, but the thumbprint" in result.reason
    assert "(and 2 more failing host(s))" in result.reason


def test_wrong_content(three_hosts: MxHosts, acme_account: Account, acme_token: str) -> None:
    serve_all(three_hosts, acme_token, "<html>hello</html>")
    result = three_hosts.validate(CLIENT, "sender.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID
    assert "wrong content" in result.reason and "'<html>hello</html>'" in result.reason


def test_non_ascii_body_is_wrong_content(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    for address in (MX1, MX2, MX3):
        three_hosts.responder(address, {acme_token: "é".encode()})
    result = three_hosts.validate(CLIENT, "sender.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID and "not ASCII" in result.reason


def test_trailing_whitespace_is_ignored_leading_is_not(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    keyauth = acme_account.key_authorization(acme_token)
    serve_all(three_hosts, acme_token, keyauth + " \t\r\n\r\n", MX1, MX2)
    three_hosts.responder(MX3, {acme_token: " " + keyauth})
    result = three_hosts.validate(CLIENT, "sender.test", acme_token, acme_account.thumbprint)
    assert [h.status for h in result.hosts] == [Status.VALID, Status.VALID, Status.INVALID]


def test_slow_host_times_out_within_the_bound(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    keyauth = acme_account.key_authorization(acme_token)
    serve_all(three_hosts, acme_token, keyauth, MX1, MX2)
    three_hosts.http(MX3, lambda r: Reply(body=keyauth.encode(), delay=30))
    start = time.monotonic()
    result = three_hosts.validate(
        CLIENT, "sender.test", acme_token, acme_account.thumbprint, request_timeout=0.5
    )
    assert time.monotonic() - start < 2.5
    assert result.status is Status.INVALID
    assert result.reason.startswith(f"mx3.other.test: {MX3}: timeout")
    assert result.problem is Problem.CONNECTION


def test_overall_deadline_bounds_everything(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    keyauth = acme_account.key_authorization(acme_token)
    for address in (MX1, MX2, MX3):
        three_hosts.http(address, lambda r: Reply(body=keyauth.encode(), delay=30))
    start = time.monotonic()
    result = three_hosts.validate(
        CLIENT, "sender.test", acme_token, acme_account.thumbprint, request_timeout=10, deadline=1
    )
    assert time.monotonic() - start < 3
    assert result.status is Status.INVALID and "timeout" in result.reason


def test_redirect_loop_is_too_many_redirects(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    serve_all(three_hosts, acme_token, acme_account.key_authorization(acme_token), MX1, MX2)
    three_hosts.http(MX3, lambda r: Reply(302, headers=(("Location", r.target),)))
    result = three_hosts.validate(CLIENT, "sender.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID
    assert result.reason.startswith(f"mx3.other.test: {MX3}: too many redirects (more than 10)")
    (address,) = result.hosts[2].addresses
    assert len(address.redirects) == 10


def test_ten_megabyte_body_is_too_large_quickly(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    big = b"x" * (10 * 1024 * 1024)
    three_hosts.http(MX1, lambda r: Reply(body=big))  # with Content-Length
    three_hosts.http(MX2, lambda r: Reply(body=big, content_length=False))  # close-delimited
    three_hosts.http(MX3, lambda r: Reply(endless=True, content_length=False))  # never ends
    start = time.monotonic()
    result = three_hosts.validate(CLIENT, "sender.test", acme_token, acme_account.thumbprint)
    assert time.monotonic() - start < 1.5
    assert result.status is Status.INVALID
    for host in result.hosts:
        assert host.status is Status.INVALID
        assert "too large" in host.reason, host.reason


def test_response_head_too_large(mx_hosts: MxHosts, acme_account: Account, acme_token: str) -> None:
    mx_hosts.dns.add("big.test", 265, "10 mx.big.test.")
    mx_hosts.dns.add("mx.big.test", "A", MX1)
    headers = tuple((f"X-Filler-{i}", "y" * 1000) for i in range(50))
    mx_hosts.http(MX1, lambda r: Reply(headers=headers))
    result = mx_hosts.validate(CLIENT, "big.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID and "response head too large" in result.reason


def test_dns_servfail_is_a_dns_error(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    mx_hosts.dns.servfail("broken.test")
    result = mx_hosts.validate(CLIENT, "broken.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.ERROR
    assert result.reason.startswith("DNS: Client MX lookup failed: SERVFAIL")
    assert result.problem is Problem.DNS
    server = mx_hosts.validate(SERVER, "broken.test", acme_token, acme_account.thumbprint)
    assert server.status is Status.ERROR
    assert server.reason.startswith("DNS: MX lookup failed: SERVFAIL")


def test_host_address_servfail_is_a_dns_error(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    serve_all(three_hosts, acme_token, acme_account.key_authorization(acme_token), MX1, MX2)
    three_hosts.dns.servfail("mx3.other.test")
    result = three_hosts.validate(CLIENT, "sender.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.ERROR
    assert result.reason.startswith("mx3.other.test: DNS: A/AAAA lookup failed: ")


def test_invalid_host_outranks_dns_error(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    serve_all(three_hosts, acme_token, "nope", MX1, MX2)
    three_hosts.dns.servfail("mx3.other.test")
    result = three_hosts.validate(CLIENT, "sender.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID and result.reason.startswith("mx1.sender.test")


def test_null_client_mx_has_no_hosts(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    mx_hosts.dns.add("null.test", 265, "0 .")
    mx_hosts.dns.add("null.test", "MX", "0 .")
    for kind in (CLIENT, SERVER):
        result = mx_hosts.validate(kind, "null.test", acme_token, acme_account.thumbprint)
        assert result.status is Status.INVALID
        assert result.reason.startswith("no hosts: null.test publishes a null")
        assert result.null_mx


def test_no_client_mx_record_has_no_hosts(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    mx_hosts.dns.add("plain.test", "MX", "10 mx.plain.test.")
    result = mx_hosts.validate(CLIENT, "plain.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID
    assert result.reason == "no hosts: no Client MX record (NODATA)"
    result = mx_hosts.validate(CLIENT, "nowhere.test", acme_token, acme_account.thumbprint)
    assert result.reason == "no hosts: no Client MX record (NXDOMAIN)"


def test_host_without_address(mx_hosts: MxHosts, acme_account: Account, acme_token: str) -> None:
    mx_hosts.dns.add("noaddr.test", 265, "10 ghost.noaddr.test.")
    result = mx_hosts.validate(CLIENT, "noaddr.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID
    assert result.reason.startswith("ghost.noaddr.test: no address")


def test_server_mx_with_mx_records(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    mx_hosts.dns.add("srv.test", "MX", "10 mx1.srv.test.", "20 mx2.srv.test.")
    mx_hosts.dns.add("srv.test", 265, "10 unrelated.srv.test.")
    mx_hosts.dns.add("mx1.srv.test", "A", MX1)
    mx_hosts.dns.add("mx2.srv.test", "A", MX2)
    serve_all(mx_hosts, acme_token, acme_account.key_authorization(acme_token), MX1, MX2)
    result = mx_hosts.validate(SERVER, "srv.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.VALID, result.reason
    assert [h.host for h in result.hosts] == ["mx1.srv.test", "mx2.srv.test"]
    assert "all 2 MX host(s)" in result.reason


def test_implicit_mx_for_server_mx(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    mx_hosts.dns.add("implicit.test", "A", MX1)
    mx_hosts.responder(MX1, {acme_token: acme_account.key_authorization(acme_token)})
    result = mx_hosts.validate(SERVER, "implicit.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.VALID, result.reason
    assert result.implicit_mx and [h.host for h in result.hosts] == ["implicit.test"]
    assert "(implicit MX)" in result.reason
    # No implicit Client MX: the A record does not opt the domain in.
    client = mx_hosts.validate(CLIENT, "implicit.test", acme_token, acme_account.thumbprint)
    assert client.status is Status.INVALID and client.reason.startswith("no hosts")


def test_every_address_of_a_host_must_answer_by_default(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    mx_hosts.dns.add("two.test", 265, "10 mx.two.test.")
    mx_hosts.dns.add("mx.two.test", "A", MX1, MX2)
    mx_hosts.responder(MX1, {acme_token: acme_account.key_authorization(acme_token)})
    mx_hosts.responder(MX2, {})
    strict = mx_hosts.validate(CLIENT, "two.test", acme_token, acme_account.thumbprint)
    assert strict.status is Status.INVALID
    assert strict.reason.startswith(f"mx.two.test: {MX2}: HTTP 404")
    lenient = mx_hosts.validate(
        CLIENT, "two.test", acme_token, acme_account.thumbprint, all_addresses=False
    )
    assert lenient.status is Status.VALID, lenient.reason
    assert "at least one address" in lenient.reason
    assert lenient.as_dict()["requirement"] == "all hosts, any address of each"


def test_connection_refused(mx_hosts: MxHosts, acme_account: Account, acme_token: str) -> None:
    mx_hosts.dns.add("down.test", 265, "10 mx.down.test.")
    mx_hosts.dns.add("mx.down.test", "A", MX1)
    result = mx_hosts.validate(CLIENT, "down.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID
    assert result.reason.startswith(f"mx.down.test: {MX1}: connection refused")
    assert result.problem is Problem.CONNECTION


def test_redirect_to_another_name_uses_our_resolver(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    dns, port = mx_hosts.dns, mx_hosts.port
    dns.add("central.test", 265, "10 mx.central.test.")
    dns.add("mx.central.test", "A", MX1)
    dns.add("acme.central.test", "A", MX2)  # only our DNS knows this name
    target = f"http://acme.central.test:{port}/tokens/{acme_token}"
    mx_hosts.http(MX1, lambda r: Reply(301, headers=(("Location", target),)))
    keyauth = acme_account.key_authorization(acme_token).encode()
    central = mx_hosts.http(MX2, lambda r: Reply(body=keyauth))
    result = mx_hosts.validate(CLIENT, "central.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.VALID, result.reason
    assert result.hosts[0].addresses[0].redirects == (target,)
    (request,) = central.requests
    assert request.target == f"/tokens/{acme_token}"
    assert request.headers["host"] == f"acme.central.test:{port}"


def test_relative_redirect_keeps_the_address(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    mx_hosts.dns.add("rel.test", 265, "10 mx.rel.test.")
    mx_hosts.dns.add("mx.rel.test", "A", MX1)
    keyauth = acme_account.key_authorization(acme_token).encode()

    def handler(request: Request) -> Reply:
        if request.target.startswith("/moved/"):
            return Reply(body=keyauth)
        return Reply(307, headers=(("Location", "/moved/" + acme_token),))

    mx_hosts.http(MX1, handler)
    result = mx_hosts.validate(CLIENT, "rel.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.VALID, result.reason


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("ftp://mx.redir.test/x", "scheme 'ftp' not allowed"),
        ("http://127.0.0.3:{port}/x", "redirect to an IP address (127.0.0.3) not allowed"),
        ("http://mx.redir.test:8081/x", "port 8081 not allowed"),
        ("http://user:pw@mx.redir.test/x", "credentials in the redirect URL"),
        ("http://mx.redir.test:{port}/a b", "malformed Location"),
    ],
)
def test_redirect_policy(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str, location: str, why: str
) -> None:
    mx_hosts.dns.add("redir.test", 265, "10 mx.redir.test.")
    mx_hosts.dns.add("mx.redir.test", "A", MX1)
    where = location.format(port=mx_hosts.port)
    mx_hosts.http(MX1, lambda r: Reply(302, headers=(("Location", where),)))
    result = mx_hosts.validate(CLIENT, "redir.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID
    assert f"redirect refused: {why}" in result.reason, result.reason


def test_redirect_to_https_does_not_verify_the_certificate(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str, pki: TestPki
) -> None:
    dns, port = mx_hosts.dns, mx_hosts.port
    dns.add("tls.test", 265, "10 mx.tls.test.")
    dns.add("mx.tls.test", "A", MX1)
    dns.add("secure.tls.test", "A", MX2)
    target = f"https://secure.tls.test:{port}/.well-known/acme-challenge/{acme_token}"
    mx_hosts.http(MX1, lambda r: Reply(308, headers=(("Location", target),)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf = pki.leaves["server"]  # issued by the test CA, which the validator does not trust
    context.load_cert_chain(leaf.chain_path, leaf.key_path)
    keyauth = acme_account.key_authorization(acme_token).encode()
    secure = mx_hosts.http(MX2, lambda r: Reply(body=keyauth), tls=context)
    result = mx_hosts.validate(CLIENT, "tls.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.VALID, result.reason
    assert secure.requests[0].headers["host"] == f"secure.tls.test:{port}"


def test_redirect_target_dns_failure(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    mx_hosts.dns.add("rd.test", 265, "10 mx.rd.test.")
    mx_hosts.dns.add("mx.rd.test", "A", MX1)
    mx_hosts.dns.servfail("broken.rd.test")
    target = f"http://broken.rd.test:{mx_hosts.port}/x"
    mx_hosts.http(MX1, lambda r: Reply(302, headers=(("Location", target),)))
    result = mx_hosts.validate(CLIENT, "rd.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.ERROR
    assert "DNS: redirect target broken.rd.test: A: SERVFAIL" in result.reason


def test_public_only_refuses_loopback(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    serve_all(three_hosts, acme_token, acme_account.key_authorization(acme_token))
    result = three_hosts.validate(
        CLIENT, "sender.test", acme_token, acme_account.thumbprint, public_only=True
    )
    assert result.status is Status.INVALID
    assert "address 127.0.0.2 is not public" in result.reason


@pytest.mark.parametrize(
    ("token", "thumbprint", "message"),
    [
        ("short", "A" * 43, "at least 128 bits"),
        ("../../../../etc/passwd" + "A" * 20, "A" * 43, "base64url"),
        ("A" * 22 + "%2F", "A" * 43, "base64url"),
        ("A" * 43, "A" * 42, "thumbprint"),
        ("A" * 43, "A" * 42 + "=", "thumbprint"),
    ],
)
def test_malformed_input_raises(token: str, thumbprint: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate(CLIENT, "x.test", token, thumbprint, resolver=_NoResolver(), fetch=_no_fetch)


def test_injected_resolver_and_fetch(acme_account: Account, acme_token: str) -> None:
    """The library needs no network: a CA can plug in its own resolver and HTTP client."""
    keyauth = acme_account.key_authorization(acme_token)
    calls: list[FetchRequest] = []

    def fetch(request: FetchRequest) -> FetchResponse:
        calls.append(request)
        return FetchResponse(200, body=keyauth.encode())

    result = validate(
        CLIENT,
        "Sender.Test.",
        acme_token,
        acme_account.thumbprint,
        resolver=_FixedResolver(),
        fetch=fetch,
        policy=ValidatorPolicy(),
    )
    assert result.status is Status.VALID and result.domain == "sender.test"
    assert sorted((c.address, c.host_header, c.port, c.scheme) for c in calls) == [
        ("192.0.2.1", "mx.sender.test", 80, "http"),
        ("2001:db8::1", "mx.sender.test", 80, "http"),
    ]
    assert {c.path for c in calls} == {CHALLENGE_PATH + acme_token}


class _NoResolver:
    def client_mx(self, domain: str, budget: float) -> HostLookup:
        raise AssertionError("not reached")

    def server_mx(self, domain: str, budget: float) -> HostLookup:
        raise AssertionError("not reached")

    def addresses(self, host: str, budget: float) -> AddressLookup:
        raise AssertionError("not reached")


class _FixedResolver(_NoResolver):
    def client_mx(self, domain: str, budget: float) -> HostLookup:
        assert domain == "sender.test" and budget > 0
        return HostLookup(LookupStatus.OK, ("mx.sender.test",))

    def addresses(self, host: str, budget: float) -> AddressLookup:
        return AddressLookup(LookupStatus.OK, ("192.0.2.1", "2001:db8::1"))


def _no_fetch(request: FetchRequest) -> FetchResponse:
    raise AssertionError("not reached")


def test_redirect_to_the_same_host_stays_on_the_address_under_test(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    mx_hosts.dns.add("same.test", 265, "10 mx.same.test.")
    mx_hosts.dns.add("mx.same.test", "A", MX1, MX2)
    moved = f"http://mx.same.test:{mx_hosts.port}/moved/{acme_token}"
    keyauth = acme_account.key_authorization(acme_token).encode()

    def handler(good: bool) -> Callable[[Request], Reply]:
        def answer(request: Request) -> Reply:
            if request.target.startswith("/moved/"):
                return Reply(body=keyauth) if good else Reply(404)
            return Reply(302, headers=(("Location", moved),))

        return answer

    mx_hosts.http(MX1, handler(True))
    mx_hosts.http(MX2, handler(False))
    result = mx_hosts.validate(CLIENT, "same.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID
    assert result.reason.startswith(f"mx.same.test: {MX2}: HTTP 404 from {moved}")
    statuses = {a.address: a.status for a in result.hosts[0].addresses}
    assert statuses == {MX1: Status.VALID, MX2: Status.INVALID}


def test_more_mx_hosts_than_the_cap_are_refused_without_fetching(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    """RFC 5321 sets no MX limit; every host costs the CA fetches, so the validator caps them."""
    names = [f"{i} mx{i}.many.test." for i in range(1, 41)]
    mx_hosts.dns.add("many.test", "MX", *names)
    result = mx_hosts.validate(SERVER, "many.test", acme_token, acme_account.thumbprint)
    assert result.status is Status.INVALID
    assert result.reason == "many.test publishes 40 MX hosts; this validator checks at most 32"
    assert result.hosts == ()


def test_validations_are_counted_where_metrics_are_on(
    three_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    from mtls_milter.runtime import metrics

    def counts() -> dict[str, float]:
        text = metrics.render()[0].decode()
        return {
            s.labels["result"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "mtls_milter_acme_validations_total"
        }

    metrics.enable()
    before = counts()
    serve_all(three_hosts, acme_token, acme_account.key_authorization(acme_token))
    three_hosts.validate(CLIENT, "sender.test", acme_token, acme_account.thumbprint)
    three_hosts.validate(CLIENT, "sender.test", "x" * 43, acme_account.thumbprint)  # 404s
    after = counts()
    assert after.get("valid", 0) - before.get("valid", 0) == 1
    assert after.get("invalid", 0) - before.get("invalid", 0) == 1
