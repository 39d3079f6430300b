"""Certificates: parsing, trust bundles, host names and matching, fingerprints.

Validation lives in :mod:`mtls_milter.core.chain` (paths, EKU) and :mod:`mtls_milter.core.keys`
(key policy); reading trust files lives in :mod:`mtls_milter.net.trust`.

Host names come from the SAN dNSNames, or from DNS-like subject CNs only when the certificate
has no SAN dNSName; one SAN dNSName that is not a usable host name leaves the certificate with no
names at all (never a CN fallback). Names are normalized by ``core.names.normalize_host``.
CN-only leaves are accepted (private CAs still issue them), and because
cryptography applies name constraints only to SANs, the product applies the CAs' DNS name
constraints to those CN names itself.
"""

from __future__ import annotations

import binascii
import functools
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from mtls_milter.core.names import normalize_host
from mtls_milter.errors import InputError

__all__ = [
    "MAX_CHAIN_CERTS",
    "CertificateInputError",
    "TrustAnchors",
    "certificate_name",
    "certificate_names",
    "common_name_host",
    "fingerprint_sha256",
    "name_matches",
    "names_and_source",
    "normalize_fingerprint",
    "parse_certificates",
    "parse_trust_bundle",
    "sha256_digest",
    "short_error",
]

MAX_CHAIN_CERTS = 20


class CertificateInputError(InputError):
    """Certificate input that cannot be used, with a one-line message naming the problem."""


# --------------------------------------------------------------------------------------------
# Parsing


_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]{1,64})-----(.*?)(?:-----END ([A-Z0-9 ]{1,64})-----|\Z)", re.DOTALL
)
_CERT_LABELS = frozenset({"CERTIFICATE", "X509 CERTIFICATE"})
_MAX_MESSAGE = 160


def short_error(exc: BaseException) -> str:
    """The first line of an exception message, bounded: it ends up in logs and verdicts."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _pem_blocks(data: bytes) -> list[tuple[str, bytes, bool]]:
    """(label, body, complete) for each PEM block; complete is False when END is missing."""
    blocks = []
    for m in _PEM_BLOCK.finditer(data):
        complete = m.group(3) == m.group(1)
        blocks.append((m.group(1).decode("ascii"), m.group(2), complete))
    return blocks


def _load_pem_certificate(index: int, body: bytes, complete: bool) -> x509.Certificate:
    if not complete:
        raise CertificateInputError(f"malformed PEM block {index}: no matching END line")
    try:
        der = binascii.a2b_base64(b"".join(body.split()), strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise CertificateInputError(f"malformed PEM block {index}: bad base64 ({exc})") from None
    try:
        return x509.load_der_x509_certificate(der)
    except Exception as exc:
        raise CertificateInputError(
            f"malformed PEM block {index}: not an X.509 certificate ({short_error(exc)})"
        ) from None


def parse_certificates(
    data: bytes, *, limit: int | None = MAX_CHAIN_CERTS
) -> tuple[x509.Certificate, ...]:
    """Parse PEM (one or more CERTIFICATE blocks) or one DER certificate.

    Other PEM block types are ignored, but input without any certificate block is an error that
    names what was found. ``limit`` bounds the number of certificates (``None``: unbounded, for
    trust bundles). Raises :class:`CertificateInputError` for anything unusable.
    """
    if not data or not data.strip():
        raise CertificateInputError("no certificate found in input (empty)")
    if b"-----BEGIN " in data:
        blocks = _pem_blocks(data)
        cert_blocks = [(i, b, c) for i, (lbl, b, c) in enumerate(blocks, 1) if lbl in _CERT_LABELS]
        if not cert_blocks:
            labels = sorted({lbl for lbl, _, _ in blocks})
            if any(lbl.endswith("PRIVATE KEY") for lbl in labels):
                raise CertificateInputError("input is a private key, not a certificate")
            found = ", ".join(labels) or "an unterminated PEM header"
            raise CertificateInputError(f"no certificate found in input (found {found})")
        # Count before decoding anything: a huge chain must not cost its parsing.
        if limit is not None and len(cert_blocks) > limit:
            raise CertificateInputError(
                f"chain has {len(cert_blocks)} certificates (limit {limit})"
            )
        return tuple(_load_pem_certificate(i, b, c) for i, b, c in cert_blocks)
    if data[:1] != b"\x30":  # every DER certificate starts with a SEQUENCE tag
        raise CertificateInputError("no certificate found in input (neither PEM nor DER)")
    try:
        return (x509.load_der_x509_certificate(data),)
    except Exception as exc:
        raise CertificateInputError(
            "no certificate found in input "
            f"(DER data is not an X.509 certificate: {short_error(exc)})"
        ) from None


# --------------------------------------------------------------------------------------------
# Trust anchors


@dataclass(frozen=True, slots=True)
class TrustAnchors:
    """The trusted root certificates and, for logs, where they came from."""

    certificates: tuple[x509.Certificate, ...]
    sources: tuple[str, ...]


def parse_trust_bundle(data: bytes) -> tuple[list[x509.Certificate], int]:
    """The certificates of a CA bundle and how many of its entries were skipped as unreadable."""
    certs: list[x509.Certificate] = []
    skipped = 0
    # Distribution bundles occasionally hold a certificate cryptography refuses (e.g. a negative
    # serial number); one such entry must not cost the other hundred-odd anchors.
    with warnings.catch_warnings():
        # Old roots with non-positive serials load with a deprecation warning; not our concern.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        for index, (label, body, complete) in enumerate(_pem_blocks(data), 1):
            if label not in _CERT_LABELS:
                continue
            try:
                certs.append(_load_pem_certificate(index, body, complete))
            except CertificateInputError:
                skipped += 1
    return certs, skipped


# --------------------------------------------------------------------------------------------
# Names, matching, fingerprints


def certificate_name(value: str) -> str | None:
    """A host name as a certificate (SAN dNSName or subject CN) spells it, normalized by
    :func:`~mtls_milter.core.names.normalize_host`; None if it is not a usable host name.

    Underscores are tolerated (some private PKIs use them; they can only match a published host
    that has them too) and a left-most ``*`` label is kept for wildcard matching.
    """
    wildcard = value.startswith("*.")
    try:
        host = normalize_host(value[2:] if wildcard else value, underscores=True)
    except InputError:
        return None
    return "*." + host if wildcard else host


def common_name_host(value: str) -> str | None:
    """The host name a subject CN stands for, or None (not DNS-like, an IP address, garbage)."""
    name = certificate_name(value)
    return name if name is not None and _looks_like_host(name) else None


def _looks_like_host(name: str) -> bool:
    """A DNS-like CN: at least two labels, and a last label that is not all digits (no IP)."""
    labels = name.split(".")
    return len(labels) >= 2 and not labels[-1].isdigit()


def _dedup(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _san_dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


def _cn_names(cert: x509.Certificate) -> list[str]:
    names = []
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value if isinstance(attr.value, str) else attr.value.decode("utf-8", "replace")
        name = common_name_host(value)
        if name is not None:
            names.append(name)
    return names


def names_and_source(cert: x509.Certificate) -> tuple[tuple[str, ...], bool]:
    """(names, from_cn); never raises.

    A certificate with any SAN dNSName is named by its SAN dNSNames alone, and a single one that
    is not a usable host name (a NUL, 65 kB, not LDH) leaves it with no names: never a CN
    fallback, which would let a CA-checked SAN be bypassed by an unchecked CN.
    """
    try:
        sans = _san_dns_names(cert)
    except Exception:  # a malformed extension: cryptography parses extensions lazily
        return (), False
    if sans:
        names = [certificate_name(s) for s in sans]
        usable = [n for n in names if n is not None]
        return (_dedup(usable) if len(usable) == len(names) else ()), False
    try:
        return _dedup(_cn_names(cert)), True
    except Exception:
        return (), True


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """Host names of ``cert``: SAN dNSNames, else DNS-like subject CNs. Normalised, never raises."""
    return names_and_source(cert)[0]


def name_matches(cert_name: str, host: str, *, allow_wildcards: bool = False) -> bool:
    """Does a certificate name match ``host``? Exact by default; RFC 6125 wildcards if allowed."""
    c = certificate_name(cert_name)
    try:
        h = normalize_host(host, underscores=True)
    except InputError:
        return False
    if not c:
        return False
    if c == h:
        return not c.startswith("*")
    if not allow_wildcards or not c.startswith("*."):
        return False
    # "*.a.b": the wildcard covers exactly one label and at least two labels must follow it,
    # so "*.test" (a whole TLD) never matches.
    base = c[2:]
    if base.count(".") < 1:
        return False
    first, _, rest = h.partition(".")
    return bool(first) and rest == base


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, upper-case colon hex (Postfix ccert_fingerprint, Sendmail {cert_fp})."""
    return sha256_digest(cert).hex(":").upper()


# A memo of a pure function (the one process-wide cache in the code base; it cannot change
# any result): the same certificate objects (cached fetched chains) are fingerprinted several
# times per message, and hashing the DER costs five times a lookup.
@functools.lru_cache(maxsize=1024)
def sha256_digest(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


_FP_PLAIN = re.compile(r"[0-9A-Fa-f]{64}")
_FP_COLONS = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}")


def normalize_fingerprint(text: str) -> str | None:
    """A SHA-256 fingerprint in any case, with or without colons -> canonical form, else None."""
    text = text.strip()
    if _FP_COLONS.fullmatch(text):
        return text.upper()
    if _FP_PLAIN.fullmatch(text):
        return bytes.fromhex(text).hex(":").upper()
    return None
