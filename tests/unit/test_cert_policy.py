"""The validation policy on top of the Web PKI: keys, and the profile details of client chains.

Leaf, intermediate and trust-anchor keys must be RSA of at least ``[tls] min_rsa_bits`` bits (a
whole number of bytes, an odd exponent of at least 65537) or ECDSA on P-256/P-384/P-521; a leaf
may also hold Ed25519. The same policy applies to client chains (inbound) and server chains
(probe, outbound).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from support.dnsserver import TestDnsServer
from support.pki import SENDER_HOST, Issued, TestPki

from mtls_milter.cli.main import main
from mtls_milter.core.certs import TrustAnchors
from mtls_milter.core.chain import ChainValidator, ChainVerdict
from mtls_milter.core.keys import key_problem

H = SENDER_HOST
OK = ""
BELOW = "is below the 2048-bit minimum"

LEAF_KEYS: dict[str, str] = {
    "p256": OK,
    "p384": OK,
    "p521": OK,
    "ed25519": OK,
    "rsa2048": OK,
    "rsa3072": OK,
    "rsa1024": f"leaf key RSA-1024 {BELOW}",
    "rsa512": f"leaf key RSA-512 {BELOW}",
    "rsa2048-e3": "leaf key RSA-2048 has public exponent 3 (at least 65537 required)",
    "rsa2052": "leaf key RSA-2052 is not a whole number of bytes",
    "dsa2048": "leaf key DSA-2048 is not allowed",
    "secp256k1": "leaf key ECDSA secp256k1 is not allowed",
    "ed448": "leaf key Ed448 is not allowed",
}
CA_KEYS: dict[str, str] = {
    "p384": OK,
    "rsa2048": OK,
    "rsa1024": f"intermediate key RSA-1024 {BELOW}",
    "rsa2048-e3": "intermediate key RSA-2048 has public exponent 3 (at least 65537 required)",
    "dsa2048": "intermediate key DSA-2048 is not allowed",
    "secp256k1": "intermediate key ECDSA secp256k1 is not allowed",
    "ed25519": "intermediate key Ed25519 is not allowed for a CA",
    "ed448": "intermediate key Ed448 is not allowed",
}

Validate = Callable[[ChainValidator, tuple[x509.Certificate, ...]], ChainVerdict]


def _client(validator: ChainValidator, chain: tuple[x509.Certificate, ...]) -> ChainVerdict:
    return validator.validate_client(chain, datetime.now(UTC))


def _server(validator: ChainValidator, chain: tuple[x509.Certificate, ...]) -> ChainVerdict:
    return validator.validate_server(chain, datetime.now(UTC), H)


BOTH_MODES = pytest.mark.parametrize("validate", [_client, _server], ids=["client", "server"])


@pytest.fixture(scope="module")
def leaves(pki: TestPki) -> dict[str, Issued]:
    return {kind: pki.issue(f"leaf-{kind}", sans=[H], key=kind) for kind in LEAF_KEYS}


@pytest.fixture(scope="module")
def under_cas(pki: TestPki) -> dict[str, Issued]:
    """A P-256 leaf under an intermediate (issued by the test root) of each CA key kind."""
    issued = {}
    for kind in CA_KEYS:
        ca = pki.issue(f"ca-{kind}", cn=f"CA {kind}", issuer=pki.root, is_ca=True, key=kind)
        issued[kind] = pki.issue(f"under-{kind}", sans=[H], issuer=ca)
    return issued


def _check(verdict: ChainVerdict, expected: str) -> None:
    assert (verdict.valid, verdict.error) == (expected == OK, expected), verdict


@BOTH_MODES
@pytest.mark.parametrize(("kind", "expected"), LEAF_KEYS.items(), ids=list(LEAF_KEYS))
def test_leaf_key(
    leaves: dict[str, Issued],
    validator: ChainValidator,
    validate: Validate,
    kind: str,
    expected: str,
) -> None:
    _check(validate(validator, leaves[kind].chain), expected)


@BOTH_MODES
@pytest.mark.parametrize(("kind", "expected"), CA_KEYS.items(), ids=list(CA_KEYS))
def test_intermediate_key(
    under_cas: dict[str, Issued],
    validator: ChainValidator,
    validate: Validate,
    kind: str,
    expected: str,
) -> None:
    _check(validate(validator, under_cas[kind].chain), expected)


@BOTH_MODES
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("rsa2048", OK),
        ("rsa1024", f"trust anchor key RSA-1024 {BELOW}"),
        ("rsa2048-e3", "trust anchor key RSA-2048 has public exponent 3 (at least 65537 required)"),
    ],
)
def test_trust_anchor_key(pki: TestPki, validate: Validate, kind: str, expected: str) -> None:
    root = pki.issue(f"root-{kind}", cn=f"Root {kind}", self_signed=True, key=kind)
    inter = pki.issue(f"inter-{kind}", cn=f"Inter {kind}", issuer=root, is_ca=True)
    leaf = pki.issue(f"leaf-under-root-{kind}", sans=[H], issuer=inter)
    validator = ChainValidator(TrustAnchors((root.cert,), ("test",)))
    _check(validate(validator, leaf.chain), expected)


@BOTH_MODES
def test_min_rsa_bits_raises_the_bar(
    trust_anchors: TrustAnchors,
    leaves: dict[str, Issued],
    under_cas: dict[str, Issued],
    validate: Validate,
) -> None:
    strict = ChainValidator(trust_anchors, min_rsa_bits=3072)
    minimum = "is below the 3072-bit minimum"
    _check(validate(strict, leaves["rsa2048"].chain), f"leaf key RSA-2048 {minimum}")
    _check(validate(strict, under_cas["rsa2048"].chain), f"intermediate key RSA-2048 {minimum}")
    _check(validate(strict, leaves["rsa3072"].chain), OK)
    _check(validate(strict, leaves["p256"].chain), OK)


def test_weak_anchor_does_not_hide_a_good_path(pki: TestPki) -> None:
    """An intermediate certified by a weak root and by a good one: the good path is found."""
    weak_root = pki.issue("cross-weak-root", cn="Weak Root", self_signed=True, key="rsa2048-e3")
    key = pki.intermediate.key
    via_weak = pki.issue("cross-weak", cn="Cross CA", issuer=weak_root, is_ca=True, key=key)
    via_good = pki.issue("cross-good", cn="Cross CA", issuer=pki.root, is_ca=True, key=key)
    leaf = pki.issue("cross-leaf", sans=[H], issuer=via_weak)
    anchors = TrustAnchors((weak_root.cert, pki.root.cert), ("test",))
    for validate in (_client, _server):
        for order in ((via_weak, via_good), (via_good, via_weak)):
            chain = (leaf.cert, *(ca.cert for ca in order))
            verdict = validate(ChainValidator(anchors), chain)
            assert verdict.valid, (validate.__name__, verdict)
    only_weak = (leaf.cert, via_weak.cert)
    verdict = _client(ChainValidator(anchors), only_weak)
    assert verdict.error == (
        "trust anchor key RSA-2048 has public exponent 3 (at least 65537 required)"
    )


def test_cache_key_holds_the_key_policy(pki: TestPki, trust_anchors: TrustAnchors) -> None:
    """A verdict made under one key policy is never served under another."""
    chain = pki.issue("cache-rsa2048", sans=[H], key="rsa2048").chain
    lenient = ChainValidator(trust_anchors)
    strict = ChainValidator(trust_anchors, min_rsa_bits=4096)
    assert _client(lenient, chain).valid
    assert _client(strict, chain).error == "leaf key RSA-2048 is below the 4096-bit minimum"
    assert _client(lenient, chain).valid
    assert {key[0] for key in lenient._cache} == {("server-or-client", 2048)}
    assert {key[0] for key in strict._cache} == {("server-or-client", 4096)}


# -- through the whole evaluation: mtls-milter check --json ----------------------------------

CheckJson = Callable[..., dict[str, str]]


@pytest.fixture
def check_json(
    pki: TestPki, dns_server: TestDnsServer, capsys: pytest.CaptureFixture[str]
) -> CheckJson:
    """Run ``mtls-milter check --json`` for a@sender.test (Client MX out.sender.test)."""
    dns_server.add("sender.test", 265, "10 out.sender.test.")

    def run(chain: Path, *extra: str) -> dict[str, str]:
        argv = ["check", "--mail-from", "a@sender.test", "--chain", str(chain), "--json"]
        argv += ["--trust", str(pki.root_path), "--no-system-trust"]
        argv += ["--dns", dns_server.nameserver, "--authserv-id", "mx.receiver.test", *extra]
        assert main(argv) == 0
        report: dict[str, str] = json.loads(capsys.readouterr().out)
        return report

    return run


def test_check_fails_a_weak_leaf_key(leaves: dict[str, Issued], check_json: CheckJson) -> None:
    report = check_json(leaves["rsa1024"].chain_path)
    reason = f"chain invalid: leaf key RSA-1024 {BELOW}"
    assert (report["result"], report["reason"]) == ("fail", reason)
    assert report["evidence"] == "chain"
    assert "mtls=fail" in report["header"]
    assert f'reason="{reason}"' in report["header"]


def test_check_honours_min_rsa_bits_from_the_config(
    leaves: dict[str, Issued], check_json: CheckJson, tmp_path: Path
) -> None:
    chain = leaves["rsa2048"].chain_path
    assert check_json(chain)["result"] == "pass"
    config = tmp_path / "strict.toml"
    config.write_text("[tls]\nmin_rsa_bits = 3072\n")
    report = check_json(chain, "--config", str(config))
    assert (report["result"], report["reason"]) == (
        "fail",
        "chain invalid: leaf key RSA-2048 is below the 3072-bit minimum",
    )


# -- the classifier on arbitrary RSA public keys ---------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(min_value=512, max_value=4104),
    exponent=st.one_of(
        st.sampled_from([3, 5, 17, 257, 65535, 65537, 65539, 2**32 + 1]),
        st.integers(min_value=1, max_value=2**64).map(lambda k: 2 * k + 1),
    ),
    min_bits=st.sampled_from([2048, 3072, 4096]),
    data=st.data(),
)
def test_rsa_classifier_property(
    pki: TestPki, bits: int, exponent: int, min_bits: int, data: st.DataObject
) -> None:
    low = data.draw(st.integers(min_value=0, max_value=(1 << (bits - 1)) - 1))
    modulus = (1 << (bits - 1)) | low | 1  # exactly ``bits`` bits, odd
    public = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    cert = _cert_with_key(pki, public)
    problem = key_problem(cert, "leaf", min_bits)
    label = f"leaf key RSA-{bits}"
    if bits < min_bits:
        assert problem == f"{label} is below the {min_bits}-bit minimum"
    elif bits % 8:
        assert problem == f"{label} is not a whole number of bytes"
    elif exponent < 65537:
        assert problem == f"{label} has public exponent {exponent} (at least 65537 required)"
    else:
        assert problem == ""


def _cert_with_key(pki: TestPki, public: rsa.RSAPublicKey) -> x509.Certificate:
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, H)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(pki.intermediate.cert.subject)
        .public_key(public)
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now)
        .sign(pki.intermediate.key, hashes.SHA256())
    )


def test_unloadable_key_is_named_not_raised(pki: TestPki, validator: ChainValidator) -> None:
    """An even RSA exponent: cryptography refuses to load the key; the reason says so."""
    leaf = pki.issue("even-e", sans=[H], key="rsa2048")
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    assert der.count(b"\x02\x03\x01\x00\x01") == 1  # INTEGER 65537 in the key
    bad = x509.load_der_x509_certificate(
        der.replace(b"\x02\x03\x01\x00\x01", b"\x02\x03\x01\x00\x02")
    )
    expected = "leaf key (algorithm 1.2.840.113549.1.1.1) cannot be used: e must be odd."
    assert key_problem(bad, "leaf", 2048) == expected
    _check(_client(validator, (bad, pki.intermediate.cert)), expected)
    _check(_server(validator, (bad, pki.intermediate.cert)), expected)


# -- Web PKI details the client profile keeps ------------------------------------------------


def _leaf(
    pki: TestPki, *, cn: str | None, san_critical: bool, not_after: datetime
) -> x509.Certificate:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(pki.intermediate.cert.subject)
        .public_key(pki.leaves["both"].cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(pki.now - timedelta(days=1))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(H)]), critical=san_critical)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.intermediate.key.public_key()),
            critical=False,
        )
        .sign(pki.intermediate.key, hashes.SHA256())
    )


@pytest.mark.parametrize(
    ("cn", "critical", "expected"),
    [
        (H, False, OK),
        (None, True, OK),
        (H, True, "subjectAltName must not be critical when the subject is not empty"),
        (None, False, "subjectAltName must be critical when the subject is empty"),
    ],
)
def test_client_profile_keeps_the_san_criticality_rule(
    pki: TestPki, validator: ChainValidator, cn: str | None, critical: bool, expected: str
) -> None:
    leaf = _leaf(pki, cn=cn, san_critical=critical, not_after=pki.now + timedelta(days=30))
    chain = (leaf, pki.intermediate.cert)
    _check(_client(validator, chain), expected)
    assert _server(validator, chain).valid is (expected == OK)


@BOTH_MODES
def test_validity_is_compared_in_whole_seconds(
    pki: TestPki, trust_anchors: TrustAnchors, validate: Validate
) -> None:
    """Valid during the whole second of notAfter (RFC 5280 times have no fractions)."""
    end = (pki.now + timedelta(days=30)).replace(microsecond=0)
    chain = (_leaf(pki, cn=H, san_critical=False, not_after=end), pki.intermediate.cert)
    validator = ChainValidator(trust_anchors, cache_size=0)
    assert validate_at(validate, validator, chain, end + timedelta(milliseconds=999)).valid
    late = validate_at(validate, validator, chain, end + timedelta(seconds=1))
    assert late.error == f"certificate expired at {end:%Y-%m-%dT%H:%M:%SZ}"


def validate_at(
    validate: Validate, validator: ChainValidator, chain: tuple[x509.Certificate, ...], at: datetime
) -> ChainVerdict:
    if validate is _client:
        return validator.validate_client(chain, at)
    return validator.validate_server(chain, at, H)
