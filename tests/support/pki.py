"""A generated test PKI: a root, an intermediate and the leaves the tests and benchmarks need.

Keys are EC P-256 (fast to generate) unless a test asks for another shape (:data:`KEY_KINDS`:
weak RSA, RSA with e = 3, DSA, other curves, EdDSA); serial numbers and keys are random,
everything else is fixed, so the PKI is deterministic in structure. The sender domain is
``sender.test`` and its Client MX host ``out.sender.test``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
BOTH_EKU: tuple[ObjectIdentifier, ...] = (SERVER_AUTH, CLIENT_AUTH)

SENDER_HOST = "out.sender.test"

_CA_LIFETIME = timedelta(days=3650)
_LEAF_LIFETIME = timedelta(days=365)
_BACKDATE = timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """One certificate with its key and the files written for it."""

    name: str
    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    cert_path: Path  # this certificate alone, PEM
    key_path: Path  # PKCS#8 PEM, unencrypted, mode 0600
    chain_path: Path  # this certificate + its issuing CA(s) below the root; = cert_path for roots
    chain: tuple[x509.Certificate, ...] = ()  # the certificates in chain_path, leaf first


@dataclass(frozen=True)
class TestPki:
    """The generated PKI; :meth:`issue` makes more certificates in the same directory."""

    __test__ = False  # not a pytest test class despite the name

    directory: Path
    now: datetime
    root: Issued  # "Test Root CA"
    intermediate: Issued  # "Test Intermediate CA", no EKU
    other_root: Issued  # an unrelated root, for unknown-CA cases
    leaves: Mapping[str, Issued] = field(default_factory=dict)
    root_path: Path = Path()  # the root PEM alone: a trust store file

    def issue(
        self,
        name: str,
        *,
        sans: Sequence[str] = (),
        cn: str | None = None,
        eku: Sequence[ObjectIdentifier] | None = BOTH_EKU,
        issuer: Issued | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        is_ca: bool = False,
        name_constraints: Sequence[str] | None = None,
        key: str | CertificateIssuerPrivateKeyTypes = "p256",
        self_signed: bool = False,
    ) -> Issued:
        """Issue a certificate (default issuer: the intermediate; ``eku=None``: no EKU).

        ``key`` is one of :data:`KEY_KINDS` or a private key. ``self_signed`` makes a new root
        (``is_ca`` too), which :attr:`root_path` does not trust.
        """
        return _issue(
            self.directory,
            self.now,
            name,
            sans=sans,
            cn=cn,
            eku=eku,
            issuer=None if self_signed else issuer or self.intermediate,
            not_before=not_before,
            not_after=not_after,
            is_ca=is_ca or self_signed,
            name_constraints=name_constraints,
            key=KEY_KINDS[key]() if isinstance(key, str) else key,
        )


# --------------------------------------------------------------------------------------------
# Key shapes, including ones the product must refuse


def _is_probable_prime(n: int, rounds: int = 40) -> bool:
    if n < 4:
        return n in (2, 3)
    if n % 2 == 0:
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _rsa_prime(bits: int, exponent: int) -> int:
    while True:
        # The two top bits set: the product of two such primes has exactly 2 * bits bits.
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if (candidate - 1) % exponent and _is_probable_prime(candidate):
            return candidate


def rsa_key(bits: int, exponent: int = 65537) -> rsa.RSAPrivateKey:
    """An RSA key of any size and odd exponent, also those cryptography refuses to generate
    (below 1024 bits, an exponent other than 3 or 65537). Test material only."""
    if bits >= 1024 and exponent in (3, 65537):
        return rsa.generate_private_key(exponent, bits)
    while True:
        p, q = _rsa_prime(bits - bits // 2, exponent), _rsa_prime(bits // 2, exponent)
        if p != q and (p * q).bit_length() == bits:
            break
    d = pow(exponent, -1, (p - 1) * (q - 1))
    public = rsa.RSAPublicNumbers(exponent, p * q)
    private = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public)
    return private.private_key(unsafe_skip_rsa_key_validation=True)


# The key shapes issue() accepts: the allowed ones and one of each kind the product refuses.
KEY_KINDS: Mapping[str, Callable[[], CertificateIssuerPrivateKeyTypes]] = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa2048": lambda: rsa_key(2048),
    "rsa3072": lambda: rsa_key(3072),
    "rsa2048-e3": lambda: rsa_key(2048, 3),
    "rsa2052": lambda: rsa_key(2052),  # a modulus that is not a whole number of bytes
    "rsa1024": lambda: rsa_key(1024),
    "rsa512": lambda: rsa_key(512),
    "dsa2048": lambda: dsa.generate_private_key(2048),
    "secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
    "ed448": ed448.Ed448PrivateKey.generate,
}


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_bundle(path: Path, *issued: Issued | x509.Certificate) -> Path:
    """Write the PEMs of ``issued`` (certificates or :class:`Issued`) into one file."""
    certs = [i.cert if isinstance(i, Issued) else i for i in issued]
    path.write_bytes(b"".join(_pem(c) for c in certs))
    return path


def _write_key(path: Path, key: CertificateIssuerPrivateKeyTypes) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create with 0600 from the start: no window in which the key is world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # O_CREAT honours the umask and leaves an existing file's mode


def _issue(
    directory: Path,
    now: datetime,
    name: str,
    *,
    sans: Sequence[str],
    cn: str | None,
    eku: Sequence[ObjectIdentifier] | None,
    issuer: Issued | None,
    not_before: datetime | None,
    not_after: datetime | None,
    is_ca: bool,
    name_constraints: Sequence[str] | None,
    organization: str | None = None,
    key: CertificateIssuerPrivateKeyTypes | None = None,
) -> Issued:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if cn:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    subject = x509.Name(attrs)
    issuer_name = issuer.cert.subject if issuer else subject
    signing_key = issuer.key if issuer else key
    lifetime = _CA_LIFETIME if is_ca else _LEAF_LIFETIME
    nb = not_before or (now - _BACKDATE)
    na = not_after or (now + lifetime)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = (
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
        if issuer
        else x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(nb)
        .not_valid_after(na)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if sans:
        # RFC 5280 4.2.1.6: the SAN must be critical when the subject is empty.
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=not attrs
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if name_constraints is not None:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(n) for n in name_constraints],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    # EdDSA signs the message itself: no separate hash algorithm.
    eddsa = isinstance(signing_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
    cert = builder.sign(signing_key, None if eddsa else hashes.SHA256())

    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(_pem(cert))
    _write_key(key_path, key)
    # The chain a server would send: this certificate and every issuing CA below the root.
    chain: tuple[x509.Certificate, ...] = (cert,)
    if issuer is not None and issuer.cert.subject != issuer.cert.issuer:
        chain += issuer.chain or (issuer.cert,)
    if len(chain) == 1:
        chain_path = cert_path
    else:
        chain_path = directory / f"{name}-chain.pem"
        chain_path.write_bytes(b"".join(_pem(c) for c in chain))
    return Issued(name, cert, key, cert_path, key_path, chain_path, chain)


def build_test_pki(directory: Path, *, now: datetime | None = None) -> TestPki:
    """Generate the test PKI into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = now or datetime.now(UTC)

    def ca(
        name: str,
        cn: str,
        issuer: Issued | None,
        eku: Sequence[ObjectIdentifier] | None = None,
        name_constraints: Sequence[str] | None = None,
    ) -> Issued:
        return _issue(
            directory,
            now,
            name,
            sans=(),
            cn=cn,
            eku=eku,
            issuer=issuer,
            not_before=None,
            not_after=None,
            is_ca=True,
            name_constraints=name_constraints,
        )

    root = ca("root", "Test Root CA", None)
    other_root = ca("other-root", "Other Root CA", None)
    intermediate = ca("intermediate", "Test Intermediate CA", root)
    eku_server_ca = ca("eku-server-ca", "Test serverAuth-only CA", root, eku=[SERVER_AUTH])
    constrained_ca = ca(
        "constrained-ca", "Test sender.test-constrained CA", root, name_constraints=["sender.test"]
    )
    pki = TestPki(directory, now, root, intermediate, other_root, {}, root.cert_path)

    h = SENDER_HOST
    day = timedelta(days=1)
    leaves = {
        "client": pki.issue("client", cn=h, sans=[h], eku=[CLIENT_AUTH]),
        "server": pki.issue("server", cn=h, sans=[h], eku=[SERVER_AUTH]),
        "both": pki.issue("both", cn=h, sans=[h]),
        "codesigning": pki.issue(
            "codesigning", cn=h, sans=[h], eku=[ExtendedKeyUsageOID.CODE_SIGNING]
        ),
        "expired": pki.issue(
            "expired", cn=h, sans=[h], not_before=now - 400 * day, not_after=now - 35 * day
        ),
        "not-yet-valid": pki.issue(
            "not-yet-valid", cn=h, sans=[h], not_before=now + 30 * day, not_after=now + 395 * day
        ),
        "unknown-ca": pki.issue("unknown-ca", cn=h, sans=[h], issuer=other_root),
        "cn-only": pki.issue("cn-only", cn=h),
        # No CN at all: the subject is only O=Sender, the names are in the SAN.
        "san-only": _issue(
            directory,
            now,
            "san-only",
            sans=[h, "alt.sender.test"],
            cn=None,
            eku=BOTH_EKU,
            issuer=intermediate,
            not_before=None,
            not_after=None,
            is_ca=False,
            name_constraints=None,
            organization="Sender",
        ),
        "san-not-cn": pki.issue(
            "san-not-cn",
            cn="mail.sender.test",
            sans=["mail.sender.test", "out2.sender.test"],
            eku=[SERVER_AUTH],
        ),
        "wildcard": pki.issue("wildcard", cn="*.sender.test", sans=["*.sender.test"]),
        "other-host": pki.issue("other-host", cn="out.other.test", sans=["out.other.test"]),
        "eku-server-intermediate": pki.issue(
            "eku-server-intermediate", cn=h, sans=[h], eku=[CLIENT_AUTH], issuer=eku_server_ca
        ),
        "name-constrained": pki.issue(
            "name-constrained", cn="out.other.test", sans=["out.other.test"], issuer=constrained_ca
        ),
        "name-constrained-ok": pki.issue(
            "name-constrained-ok", cn=h, sans=[h], issuer=constrained_ca
        ),
        "mx-server": pki.issue(
            "mx-server", cn="mx.receiver.test", sans=["mx.receiver.test"], eku=[SERVER_AUTH]
        ),
    }
    return TestPki(directory, now, root, intermediate, other_root, leaves, root.cert_path)
