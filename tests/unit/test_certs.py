"""mtls_milter.core.certs: parsing, trust anchors, chain validation, names and matching."""

from __future__ import annotations

import itertools
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support.pki import CLIENT_AUTH, SERVER_AUTH, TestPki, write_bundle

from mtls_milter.config import EkuPolicy
from mtls_milter.core.certs import (
    MAX_CHAIN_CERTS,
    CertificateInputError,
    TrustAnchors,
    certificate_names,
    fingerprint_sha256,
    name_matches,
    normalize_fingerprint,
    parse_certificates,
)
from mtls_milter.core.chain import ChainValidator
from mtls_milter.net.trust import load_trust_anchors

SOC, CLI, ANY = EkuPolicy.SERVER_OR_CLIENT, EkuPolicy.CLIENT, EkuPolicy.ANY
OK = ""
EXPIRED = "certificate expired at "
NOT_YET = "certificate not yet valid until "
UNKNOWN = "unknown issuer (no path to a trusted root)"
LACKS_SC = "EKU lacks serverAuth/clientAuth"
LACKS_C = "EKU lacks clientAuth"
CA_EKU = "intermediate CA EKU does not allow clientAuth"
NC = "name constraints violated"

# leaf -> expected error prefix ("" = valid) under server-or-client, client, any
EXPECTED: dict[str, tuple[str, str, str]] = {
    "client": (OK, OK, OK),
    "server": (OK, LACKS_C, OK),
    "both": (OK, OK, OK),
    "codesigning": (LACKS_SC, LACKS_C, OK),
    "expired": (EXPIRED, EXPIRED, EXPIRED),
    "not-yet-valid": (NOT_YET, NOT_YET, NOT_YET),
    "unknown-ca": (UNKNOWN, UNKNOWN, UNKNOWN),
    "cn-only": (OK, OK, OK),
    "san-only": (OK, OK, OK),
    "san-not-cn": (OK, LACKS_C, OK),
    "wildcard": (OK, OK, OK),
    "other-host": (OK, OK, OK),
    "eku-server-intermediate": (CA_EKU, CA_EKU, OK),
    "name-constrained": (NC, NC, NC),
    "name-constrained-ok": (OK, OK, OK),
    "mx-server": (OK, LACKS_C, OK),
}
CASES = [
    pytest.param(leaf, policy, expected[i], id=f"{leaf}-{policy}")
    for leaf, expected in EXPECTED.items()
    for i, policy in enumerate((SOC, CLI, ANY))
]


def now() -> datetime:
    return datetime.now(UTC)


def test_every_fixed_leaf_is_in_the_table(pki: TestPki) -> None:
    assert set(pki.leaves) == set(EXPECTED)


@pytest.mark.parametrize(("leaf", "policy", "expected"), CASES)
def test_policy_table(
    pki: TestPki, trust_anchors: TrustAnchors, leaf: str, policy: EkuPolicy, expected: str
) -> None:
    issued = pki.leaves[leaf]
    verdict = ChainValidator(trust_anchors, policy).validate_client(issued.chain, now())
    assert verdict.valid is (expected == OK), verdict
    if expected:
        assert verdict.error.startswith(expected), verdict.error
    else:
        assert verdict.error == ""
    assert verdict.leaf_sha256 == fingerprint_sha256(issued.cert)
    assert verdict.names == certificate_names(issued.cert)


def test_expired_error_names_the_instant(pki: TestPki, validator: ChainValidator) -> None:
    cert = pki.leaves["expired"].cert
    verdict = validator.validate_client(pki.leaves["expired"].chain, now())
    assert verdict.error == f"certificate expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"


def test_chain_order_and_duplicates(pki: TestPki, validator: ChainValidator) -> None:
    leaf, inter, root = pki.leaves["client"].cert, pki.intermediate.cert, pki.root.cert
    for chain in itertools.permutations([leaf, inter, root]):
        assert validator.validate_client(chain, now()).valid, chain
    for dup in ([inter, leaf, inter], [leaf, leaf, inter], [inter, inter, leaf, leaf, root]):
        verdict = validator.validate_client(dup, now())
        assert verdict.valid, verdict
        assert verdict.leaf_sha256 == fingerprint_sha256(leaf)


def test_leaf_without_intermediate_is_unknown_issuer(
    pki: TestPki, validator: ChainValidator
) -> None:
    verdict = validator.validate_client([pki.leaves["both"].cert], now())
    assert (verdict.valid, verdict.error) == (False, UNKNOWN)
    assert verdict.names == ("out.sender.test",)


def test_empty_and_oversized_chains(pki: TestPki, validator: ChainValidator) -> None:
    assert validator.validate_client([], now()).error == "no certificate presented"
    extra = [pki.issue(f"bulk{i}", sans=[f"h{i}.sender.test"]).cert for i in range(MAX_CHAIN_CERTS)]
    verdict = validator.validate_client([pki.leaves["both"].cert, *extra], now())
    assert not verdict.valid
    assert verdict.error == f"chain has {MAX_CHAIN_CERTS + 1} certificates (limit 20)"


def test_leaf_without_eku(pki: TestPki, trust_anchors: TrustAnchors) -> None:
    issued = pki.issue("no-eku", cn="out.sender.test", sans=["out.sender.test"], eku=None)
    results = {
        p: ChainValidator(trust_anchors, p).validate_client(issued.chain, now()) for p in EkuPolicy
    }
    assert results[SOC].error == "EKU lacks serverAuth/clientAuth (no EKU extension)"
    assert results[CLI].error == "EKU lacks clientAuth (no EKU extension)"
    assert results[ANY].valid


def test_any_eku_leaf_is_not_enough(pki: TestPki, trust_anchors: TrustAnchors) -> None:
    anyeku = [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]
    issued = pki.issue("any-eku", sans=["out.sender.test"], eku=anyeku)
    assert not ChainValidator(trust_anchors, SOC).validate_client(issued.chain, now()).valid
    assert ChainValidator(trust_anchors, ANY).validate_client(issued.chain, now()).valid


def test_ca_eku_intersection(pki: TestPki, trust_anchors: TrustAnchors) -> None:
    server_ca = pki.issue("srv-ca", cn="Srv CA", issuer=pki.root, is_ca=True, eku=[SERVER_AUTH])
    client_ca = pki.issue("cli-ca", cn="Cli CA", issuer=pki.root, is_ca=True, eku=[CLIENT_AUTH])
    any_ca = pki.issue(
        "any-ca",
        cn="Any CA",
        issuer=pki.root,
        is_ca=True,
        eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE],
    )
    soc = ChainValidator(trust_anchors, SOC)
    cli = ChainValidator(trust_anchors, CLI)
    sans = ["out.sender.test"]
    both_under_server = pki.issue("b-s", sans=sans, issuer=server_ca)
    server_under_client = pki.issue("s-c", sans=sans, eku=[SERVER_AUTH], issuer=client_ca)
    client_under_any = pki.issue("c-a", sans=sans, eku=[CLIENT_AUTH], issuer=any_ca)
    # A both-purpose leaf under a serverAuth CA is usable as serverAuth.
    assert soc.validate_client(both_under_server.chain, now()).valid
    assert cli.validate_client(both_under_server.chain, now()).error == CA_EKU
    verdict = soc.validate_client(server_under_client.chain, now())
    assert verdict.error == "intermediate CA EKU does not allow serverAuth"
    assert soc.validate_client(client_under_any.chain, now()).valid
    assert cli.validate_client(client_under_any.chain, now()).valid


def test_cn_only_leaf_obeys_name_constraints(pki: TestPki, validator: ChainValidator) -> None:
    constrained = pki.issue(
        "nc-ca", cn="NC CA", issuer=pki.root, is_ca=True, eku=None, name_constraints=["sender.test"]
    )
    bad = pki.issue("nc-cn-bad", cn="out.other.test", issuer=constrained)
    good = pki.issue("nc-cn-good", cn="out.sender.test", issuer=constrained)
    assert validator.validate_client(bad.chain, now()).error == NC
    assert validator.validate_client(good.chain, now()).valid


def test_validate_client_leaves_internal_errors_to_the_engine(validator: ChainValidator) -> None:
    # A bug (here: a caller passing a string) is no verdict on the chain; Engine.evaluate maps
    # it to temperror, where an invalid verdict would have meant fail.
    with pytest.raises(AttributeError):
        validator.validate_client(["not a certificate"], now())  # type: ignore[list-item]


class _BuggyCaCheck(ChainValidator):
    """A validator whose CA key check has a bug (cryptography runs it as a callback)."""

    def _ca_key_problem(self, cert: x509.Certificate) -> str:
        raise KeyError("bug")


def test_bug_inside_a_validation_callback_is_no_verdict_on_the_chain(
    pki: TestPki, trust_anchors: TrustAnchors
) -> None:
    # cryptography wraps callback exceptions into a verification error: without re-raising
    # them, a bug would read as "chain invalid" and so as fail instead of temperror.
    with pytest.raises(KeyError):
        _BuggyCaCheck(trust_anchors).validate_client(pki.leaves["both"].chain, now())


def test_naive_time_is_utc(pki: TestPki, validator: ChainValidator) -> None:
    naive = datetime.now(UTC).replace(tzinfo=None)
    assert validator.validate_client(pki.leaves["both"].chain, naive).valid


# -- cache ---------------------------------------------------------------------------------


def test_cache_reuses_verdict_inside_window(pki: TestPki, validator: ChainValidator) -> None:
    chain = pki.leaves["both"].chain
    first = validator.validate_client(chain, now())
    second = validator.validate_client(chain, now())
    assert first == second
    assert second is first  # served from the cache


def test_cache_revalidates_outside_window(pki: TestPki, validator: ChainValidator) -> None:
    chain = pki.leaves["both"].chain
    assert validator.validate_client(chain, now()).valid
    later = chain[0].not_valid_after_utc + timedelta(seconds=1)
    verdict = validator.validate_client(chain, later)
    assert not verdict.valid
    assert verdict.error.startswith(EXPIRED)
    # At notAfter itself the leaf is still valid (RFC 5280: inclusive).
    assert validator.validate_client(chain, chain[0].not_valid_after_utc).valid
    early = chain[0].not_valid_before_utc - timedelta(microseconds=1)
    assert validator.validate_client(chain, early).error.startswith(NOT_YET)


def test_cache_is_bounded(pki: TestPki, trust_anchors: TrustAnchors) -> None:
    small = ChainValidator(trust_anchors, cache_size=2)
    chains = [pki.leaves[n].chain for n in ("client", "server", "both")]
    verdicts = [small.validate_client(c, now()) for c in chains]
    assert small.validate_client(chains[2], now()) is verdicts[2]
    assert small.validate_client(chains[0], now()) is not verdicts[0]  # evicted, recomputed
    assert small.validate_client(chains[0], now()) == verdicts[0]


def _median_us(fn: object, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - t) * 1e6)
    return statistics.median(samples)


def test_cached_validation_is_fast(pki: TestPki, trust_anchors: TrustAnchors) -> None:
    chain = pki.leaves["both"].chain
    at = now()
    uncached = ChainValidator(trust_anchors, cache_size=0)
    cached = ChainValidator(trust_anchors)
    cached.validate_client(chain, at)
    cold = _median_us(lambda: uncached.validate_client(chain, at), 200)
    warm = _median_us(lambda: cached.validate_client(chain, at), 2000)
    print(f"\nvalidate_client median: cold {cold:.1f} µs, cached {warm:.1f} µs")
    assert warm < 50, f"cached validate_client took {warm:.1f} µs (budget 50)"


# -- server profile ------------------------------------------------------------------------


def test_validate_server(pki: TestPki, validator: ChainValidator) -> None:
    chain = pki.leaves["mx-server"].chain
    assert validator.validate_server(chain, now(), "mx.receiver.test").valid
    assert validator.validate_server(chain, now(), "MX.receiver.test.").valid
    wrong = validator.validate_server(chain, now(), "other.test")
    assert wrong.error == "leaf certificate has no matching subjectAltName"
    assert not validator.validate_server(chain, now(), "192.0.2.1").valid
    assert not validator.validate_server(pki.leaves["client"].chain, now(), "out.sender.test").valid
    assert validator.validate_server([], now(), "x.test").error == "no certificate presented"
    assert not validator.validate_server(chain, now(), "bad name!").valid


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("leaf", "names"),
    [
        ("both", ("out.sender.test",)),
        ("cn-only", ("out.sender.test",)),
        ("san-only", ("out.sender.test", "alt.sender.test")),
        ("san-not-cn", ("mail.sender.test", "out2.sender.test")),
        ("wildcard", ("*.sender.test",)),
    ],
)
def test_certificate_names(pki: TestPki, leaf: str, names: tuple[str, ...]) -> None:
    assert certificate_names(pki.leaves[leaf].cert) == names


def test_certificate_names_normalises(pki: TestPki) -> None:
    issued = pki.issue(
        "messy",
        cn="Not A Host",
        sans=["OUT.Sender.Test.", "out.sender.test", "xn--bcher-kva.test"],
    )
    assert certificate_names(issued.cert) == ("out.sender.test", "xn--bcher-kva.test")
    cn_not_host = pki.issue("cn-not-host", cn="Sender Mail Server")
    assert certificate_names(cn_not_host.cert) == ()
    cn_ip = pki.issue("cn-ip", cn="192.0.2.1")
    assert certificate_names(cn_ip.cert) == ()


def test_cn_with_unicode_is_converted(pki: TestPki) -> None:
    issued = pki.issue("idn-cn", cn="out.bücher.test")
    assert certificate_names(issued.cert) == ("out.xn--bcher-kva.test",)


def test_subject_attributes_ignored_when_san_present(pki: TestPki) -> None:
    cert = pki.leaves["san-not-cn"].cert
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mail.sender.test"
    assert "mail.sender.test" in certificate_names(cert)


@pytest.mark.parametrize(
    ("cert_name", "host", "wildcards", "expected"),
    [
        ("out.sender.test", "out.sender.test", False, True),
        ("OUT.Sender.TEST", "out.sender.test", False, True),
        ("out.sender.test.", "out.sender.test", False, True),
        ("out.sender.test", "OUT.SENDER.TEST.", False, True),
        ("out.sender.test", "sender.test", False, False),
        ("out.sender.test", "x.out.sender.test", False, False),
        ("", "", False, False),
        ("out.sender.test", "", False, False),
        ("*.sender.test", "out.sender.test", False, False),
        ("*.sender.test", "*.sender.test", False, False),
        ("*.sender.test", "*.sender.test", True, False),
        ("*.sender.test", "out.sender.test", True, True),
        ("*.Sender.Test.", "OUT.sender.test", True, True),
        ("*.sender.test", "sender.test", True, False),
        ("*.sender.test", "a.b.sender.test", True, False),
        ("*.sender.test", ".sender.test", True, False),
        ("*.test", "sender.test", True, False),
        ("f*o.sender.test", "foo.sender.test", True, False),
        ("*o.sender.test", "foo.sender.test", True, False),
        ("o*.sender.test", "out.sender.test", True, False),
        ("out.*.test", "out.sender.test", True, False),
        ("xn--bcher-kva.test", "bücher.test", False, True),
        ("bücher.test", "xn--bcher-kva.test", False, True),
        ("*.bücher.test", "out.xn--bcher-kva.test", True, True),
        ("xn--bcher-kva.test", "bucher.test", False, False),
    ],
)
def test_name_matches(cert_name: str, host: str, wildcards: bool, expected: bool) -> None:
    assert name_matches(cert_name, host, allow_wildcards=wildcards) is expected


# -- fingerprints --------------------------------------------------------------------------


def test_fingerprint_format(pki: TestPki) -> None:
    cert = pki.leaves["both"].cert
    fp = fingerprint_sha256(cert)
    assert fp == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert len(fp) == 95
    assert normalize_fingerprint(fp) == fp
    assert normalize_fingerprint(fp.lower()) == fp
    assert normalize_fingerprint(fp.replace(":", "")) == fp
    assert normalize_fingerprint(f"  {fp.replace(':', '').lower()}\n") == fp


@pytest.mark.parametrize(
    "text",
    ["", "garbage", "AB:CD", "G" * 64, "A" * 63, "A" * 65, "AB" + ":AB" * 30, "ABC:D" + ":AB" * 30],
)
def test_normalize_fingerprint_garbage(text: str) -> None:
    assert normalize_fingerprint(text) is None


# -- parsing -------------------------------------------------------------------------------


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def test_parse_pem_chain_and_der(pki: TestPki) -> None:
    leaf = pki.leaves["both"]
    assert parse_certificates(leaf.chain_path.read_bytes()) == leaf.chain
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    assert parse_certificates(der) == (leaf.cert,)
    key_then_cert = leaf.key_path.read_bytes() + leaf.cert_path.read_bytes()
    assert parse_certificates(key_then_cert) == (leaf.cert,)  # other blocks are ignored


def _bad_inputs(pki: TestPki) -> list[tuple[str, bytes, str]]:
    leaf = pki.leaves["both"]
    pem = _pem(leaf.cert)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x.test")]))
        .sign(leaf.key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    lines = pem.splitlines(keepends=True)
    bad_b64 = b"".join([lines[0], b"!!!!not base64!!!!\n", *lines[1:]])
    not_a_cert = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    return [
        ("empty", b"", "no certificate found in input (empty)"),
        ("whitespace", b" \n\t\r\n", "no certificate found in input (empty)"),
        ("garbage", b"\x00\x01hello\xff", "no certificate found in input (neither PEM nor DER)"),
        ("text", b"hello world\n", "no certificate found in input (neither PEM nor DER)"),
        ("truncated", pem[: len(pem) // 2], "malformed PEM block 1: no matching END line"),
        ("bad-base64", bad_b64, "malformed PEM block 1: bad base64"),
        ("second-bad", pem + bad_b64, "malformed PEM block 2: bad base64"),
        ("not-x509", not_a_cert, "malformed PEM block 1: not an X.509 certificate"),
        ("private-key", leaf.key_path.read_bytes(), "input is a private key, not a certificate"),
        ("csr", csr, "no certificate found in input (found CERTIFICATE REQUEST)"),
        ("der-garbage", b"\x30\x82\x01\x00garbage", "no certificate found in input (DER data"),
        ("50-chain", pem * 50, "chain has 50 certificates (limit 20)"),
    ]


def test_parse_bad_inputs(pki: TestPki) -> None:
    for label, data, message in _bad_inputs(pki):
        with pytest.raises(CertificateInputError) as info:
            parse_certificates(data)
        assert str(info.value).startswith(message), (label, str(info.value))
        assert "\n" not in str(info.value), label


def test_parse_limit_none_allows_bundles(pki: TestPki) -> None:
    assert len(parse_certificates(_pem(pki.root.cert) * 50, limit=None)) == 50


# -- trust anchors -------------------------------------------------------------------------


def test_load_trust_anchors_files(pki: TestPki, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle.pem", pki.root, pki.other_root, pki.root)
    anchors = load_trust_anchors([str(pki.root_path), str(bundle)])
    assert anchors.certificates == (pki.root.cert, pki.other_root.cert)  # deduplicated
    assert anchors.sources == (f"{pki.root_path} (1 certificate)", f"{bundle} (3 certificates)")


def test_load_trust_anchors_errors(pki: TestPki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(CertificateInputError, match=f"^{missing}: cannot read"):
        load_trust_anchors([str(missing)])
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    with pytest.raises(CertificateInputError, match=f"^{empty}: no certificate found"):
        load_trust_anchors([str(empty)])
    with pytest.raises(CertificateInputError, match=r"^no trust anchors configured$"):
        load_trust_anchors([])
    with pytest.raises(CertificateInputError, match="private key"):
        load_trust_anchors([str(pki.root.key_path)])


def test_load_trust_anchors_system() -> None:
    try:
        anchors = load_trust_anchors(["system"])
    except CertificateInputError as exc:
        pytest.skip(f"no system trust bundle: {exc}")
    assert len(anchors.certificates) > 10
    assert anchors.sources[0].startswith("system (")
    assert f"{len(anchors.certificates)} certificates" in anchors.sources[0]


# -- test PKI ------------------------------------------------------------------------------


def test_pki_files(pki: TestPki) -> None:
    leaf = pki.leaves["client"]
    assert leaf.key_path.stat().st_mode & 0o777 == 0o600
    assert parse_certificates(leaf.chain_path.read_bytes()) == (leaf.cert, pki.intermediate.cert)
    assert parse_certificates(pki.leaves["unknown-ca"].chain_path.read_bytes()) == (
        pki.leaves["unknown-ca"].cert,
    )
    eku_chain = parse_certificates(pki.leaves["eku-server-intermediate"].chain_path.read_bytes())
    assert len(eku_chain) == 2
    assert pki.root.chain_path == pki.root.cert_path
    assert parse_certificates(pki.root_path.read_bytes()) == (pki.root.cert,)
    assert pki.intermediate.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        pki.intermediate.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
