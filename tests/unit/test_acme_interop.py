"""Interop with PyPI's ``acme`` and ``josepy``: thumbprints, key authorizations, both directions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from acme import challenges
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fixtures_acme import Account, MxHosts
from josepy.b64 import b64decode, b64encode
from josepy.jwk import JWK, JWKEC, JWKRSA

from mtls_milter.acme.fetch import FetchRequest, http_fetch
from mtls_milter.acme.keyauth import JwkError, jwk_thumbprint, key_authorization
from mtls_milter.acme.responder import ResponderThread
from mtls_milter.acme.results import Status
from mtls_milter.acme.validator import CHALLENGE_PATH


def _keys() -> list[JWK]:
    return [
        JWKRSA(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        JWKEC(key=ec.generate_private_key(ec.SECP256R1())),
        JWKEC(key=ec.generate_private_key(ec.SECP384R1())),
    ]


@pytest.mark.parametrize("key", _keys(), ids=["rsa2048", "p256", "p384"])
def test_thumbprint_matches_josepy(key: JWK) -> None:
    expected = b64encode(key.thumbprint()).decode()
    assert jwk_thumbprint(key.to_json()) == expected  # private JWK
    assert jwk_thumbprint(key.public_key().to_json()) == expected


def test_rfc7638_example() -> None:
    """The worked example of RFC 7638 §3.1."""
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6"
        "tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGj"
        "QR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFT"
        "WhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_rfc8037_okp_example() -> None:
    """OKP (josepy has no OKP keys): the Ed25519 example of RFC 8037 Appendix A.3."""
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(jwk) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        ({"kty": "oct", "k": "AAAA"}, "unsupported JWK key type"),
        ({"kty": "EC", "crv": "P-256", "x": "AAAA"}, "lacks the member 'y'"),
        ({"kty": "RSA", "n": "a/b", "e": "AQAB"}, "not base64url"),
        ([], "JSON object"),
    ],
)
def test_bad_jwks(jwk: object, message: str) -> None:
    with pytest.raises(JwkError, match=message):
        jwk_thumbprint(jwk)  # type: ignore[arg-type]


def test_key_authorization_matches_acme(acme_account: Account, acme_token: str) -> None:
    chall = challenges.HTTP01(token=b64decode(acme_token))
    assert chall.encode("token") == acme_token
    assert chall.path == CHALLENGE_PATH + acme_token
    mine = key_authorization(acme_token, jwk_thumbprint(acme_account.key.to_json()))
    assert mine == chall.key_authorization(acme_account.key)


def test_acme_made_key_authorization_passes_our_validator(
    mx_hosts: MxHosts, acme_account: Account, acme_token: str
) -> None:
    """What an acme-package client provisions (response_and_validation) validates with us."""
    chall = challenges.HTTP01(token=b64decode(acme_token))
    response, validation = chall.response_and_validation(acme_account.key)
    assert isinstance(validation, str)
    mx_hosts.dns.add("interop.test", 265, "10 mx1.interop.test.", "20 mx2.interop.test.")
    mx_hosts.dns.add("mx1.interop.test", "A", "127.0.0.2")
    mx_hosts.dns.add("mx2.interop.test", "A", "127.0.0.3")
    for address in ("127.0.0.2", "127.0.0.3"):
        mx_hosts.responder(address, {acme_token: validation})
    thumbprint = jwk_thumbprint(acme_account.key.public_key().to_json())
    result = mx_hosts.validate("client-mx-http-01", "interop.test", acme_token, thumbprint)
    assert result.status is Status.VALID, result.reason
    assert result.key_authorization == response.key_authorization


def test_our_responder_passes_acme_verify(
    tmp_path: Path, acme_account: Account, acme_token: str
) -> None:
    """The reverse: the body our responder serves satisfies ``HTTP01Response.verify``.

    ``simple_verify`` would fetch through ``requests`` (system resolver, proxy variables), so
    we fetch with our own client and apply the acme package's offline check to the body.
    """
    chall = challenges.HTTP01(token=b64decode(acme_token))
    (tmp_path / acme_token).write_text(chall.validation(acme_account.key) + "\n")
    with ResponderThread(tmp_path, [("127.0.0.2", 0)]) as responder:
        address, port = responder.addresses[0]
        fetched = http_fetch(
            FetchRequest("http", address, port, "mx.interop.test", chall.path, 2.0, 8192)
        )
    assert fetched.status == 200
    body = fetched.body.decode("ascii").rstrip(challenges.HTTP01Response.WHITESPACE_CUTSET)
    response = challenges.HTTP01Response(key_authorization=body)
    assert response.verify(chall, acme_account.key.public_key())
    other = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    assert not response.verify(chall, other.public_key())


def test_account_jwk_file_for_the_cli(tmp_path: Path, acme_account: Account) -> None:
    path = tmp_path / "account.json"
    path.write_text(json.dumps(acme_account.key.to_json()))
    assert jwk_thumbprint(json.loads(path.read_text())) == acme_account.thumbprint
