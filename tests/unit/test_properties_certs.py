"""Properties of certificate input parsing (PEM/DER) and of certificate host names.

A client's chain (fetched from its STARTTLS port), ``check --chain`` files and trust bundles are
outside input: any bytes give certificates or CertificateInputError with a short one-line
message. Names taken from a certificate are compared with DNS names, so whatever a CA (or a
forger) wrote, a name that comes out is a normalized host name.
"""

from __future__ import annotations

import datetime
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from mtls_milter.core.certs import (
    CertificateInputError,
    certificate_names,
    name_matches,
    parse_certificates,
)

# cryptography warns about CNs outside 1..64 characters, which these tests write on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")
SETTINGS = settings(max_examples=100, deadline=None)
PRINTABLE = re.compile(r"[ -~]*")
MESSAGE_MAX = 300

_KEY = ec.generate_private_key(ec.SECP256R1())
_START = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)


def make_cert(
    cn: str | None = "leaf.example", sans: tuple[str, ...] = (), serial: int = 1
) -> x509.Certificate:
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)] if cn is not None else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")]))
        .public_key(_KEY.public_key())
        .serial_number(serial)
        .not_valid_before(_START)
        .not_valid_after(_START + datetime.timedelta(days=365))
    )
    if sans:
        san = x509.SubjectAlternativeName([x509.DNSName(name) for name in sans])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(_KEY, hashes.SHA256())


CERTS = [make_cert(f"host{i}.example", (f"host{i}.example",), serial=i + 1) for i in range(3)]


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def assert_input_error(data: bytes) -> tuple[x509.Certificate, ...] | None:
    """Parse ``data``: certificates, or CertificateInputError with a short one-line message."""
    try:
        certs = parse_certificates(data)
    except CertificateInputError as exc:
        message = str(exc)
        assert isinstance(exc, ValueError)
        assert "\n" not in message and len(message) <= MESSAGE_MAX, message
        assert PRINTABLE.fullmatch(message), message
        return None
    for cert in certs:
        assert_normal_names(certificate_names(cert))
    return certs


def assert_normal_names(names: tuple[str, ...]) -> None:
    assert len(set(names)) == len(names)
    for name in names:
        assert name.isascii() and name == name.lower(), name
        assert 0 < len(name) <= 253 and not name.endswith("."), name
        labels = name.split(".")
        assert all(0 < len(label) <= 63 for label in labels), name
        assert "*" not in name[1:] and (not name.startswith("*") or name.startswith("*.")), name
        assert re.fullmatch(r"[a-z0-9_*-]+(?:\.[a-z0-9_-]+)*", name), name


# --- parsing -----------------------------------------------------------------------------------

junk = st.one_of(
    st.just(b""),
    st.binary(max_size=40).filter(lambda b: b"-----" not in b),
    st.sampled_from(
        [
            b"subject=/CN=x\n",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
            b"\r\n",
        ]
    ),
)


@SETTINGS
@given(
    st.lists(st.sampled_from(CERTS), min_size=1, max_size=3), st.lists(junk, min_size=4, max_size=4)
)
def test_pem_round_trips_with_text_between_blocks(
    certs: list[x509.Certificate], between: list[bytes]
) -> None:
    data = between[0] + b"".join(pem(c) + between[(i + 1) % 4] for i, c in enumerate(certs))
    assert parse_certificates(data) == tuple(certs)
    crlf = data.replace(b"\n", b"\r\n")
    assert parse_certificates(crlf) == tuple(certs)


@SETTINGS
@given(st.sampled_from(CERTS))
def test_der_round_trips(cert: x509.Certificate) -> None:
    assert parse_certificates(der(cert)) == (cert,)


@SETTINGS
@given(st.binary(max_size=600))
@example(b"\x30")
@example(b"\x30\x82\xff\xff" + b"\x00" * 40)
@example(b"-----BEGIN CERTIFICATE-----\n")
@example(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")
@example(b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n")
def test_any_bytes_give_certificates_or_input_error(data: bytes) -> None:
    assert_input_error(data)


@SETTINGS
@given(
    st.sampled_from(CERTS),
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 10_000),
)
def test_mutated_certificates_give_certificates_or_input_error(
    cert: x509.Certificate, as_pem: bool, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(pem(cert) if as_pem else der(cert))
    for position, value in flips:
        data[position % len(data)] = value
    assert_input_error(bytes(data[: max(1, len(data) - cut % 50)]))


@settings(max_examples=20, deadline=None)
@given(st.integers(21, 60))
def test_too_many_certificates_is_refused_before_decoding(count: int) -> None:
    data = pem(CERTS[0]) * count
    try:
        parse_certificates(data)
    except CertificateInputError as exc:
        assert "limit" in str(exc)
    else:
        raise AssertionError("a chain over the limit was accepted")


# --- names ---------------------------------------------------------------------------------------

ascii_name = st.one_of(
    st.from_regex(r"(\*\.)?([A-Za-z0-9_-]{1,12}\.){0,3}[A-Za-z0-9-]{1,12}\.?", fullmatch=True),
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=40),
    st.builds(lambda n: "a" * n + ".example", st.integers(60, 300)),
)
cn_text = st.one_of(ascii_name, st.text(max_size=80))


@SETTINGS
@given(st.one_of(st.none(), cn_text), st.lists(ascii_name, max_size=4))
@example("a" * 64 + ".example", [])
@example("x.example", ["ok.example", "bad\x00.example"])
@example("\u00e9xample.org", [])
def test_certificate_names_are_normalized_host_names(cn: str | None, sans: list[str]) -> None:
    try:
        cert = make_cert(cn, tuple(sans))
    except ValueError:
        assume(False)  # cryptography refuses to write such a name
        raise
    names = certificate_names(cert)
    assert_normal_names(names)
    if sans:
        assert set(names) <= {n.lower().rstrip(".") for n in sans}  # never the CN's instead


host = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){1,3}", fullmatch=True
)


@SETTINGS
@given(cn_text, cn_text, st.booleans())
def test_name_matches_never_raises(name: str, other: str, wildcards: bool) -> None:
    assert name_matches(name, other, allow_wildcards=wildcards) in (True, False)


@SETTINGS
@given(host, st.booleans(), st.booleans())
def test_a_host_matches_itself_in_any_case(name: str, upper: bool, dot: bool) -> None:
    spelled = (name.upper() if upper else name) + ("." if dot else "")
    assert name_matches(spelled, name)
    assert name_matches(name, spelled)


@SETTINGS
@given(
    host,
    st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True),
    st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True),
)
def test_a_wildcard_covers_exactly_one_label_and_only_when_allowed(
    base: str, label: str, extra: str
) -> None:
    wildcard = "*." + base
    one_level = f"{label}.{base}"
    assert name_matches(wildcard, one_level, allow_wildcards=True)
    assert not name_matches(wildcard, one_level, allow_wildcards=False)
    assert not name_matches(wildcard, f"{extra}.{one_level}", allow_wildcards=True)
    assert not name_matches(wildcard, base, allow_wildcards=True)
    assert not name_matches(one_level, wildcard, allow_wildcards=True)  # a host is never "*"
