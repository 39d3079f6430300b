"""Certificates: parsing, trust bundles, RFC 5280 chain validation, host names and matching.

Path validation is pyca/cryptography's ``x509.verification`` (RFC 5280 and the Web PKI profile)
with the product's key and EKU policies layered on top (docs/design.md, "Certificates").

Keys: every certificate of the path (leaf, intermediates and the trust anchor) must hold RSA of
at least ``min_rsa_bits`` bits with an odd exponent of at least 65537, or ECDSA on P-256, P-384
or P-521; the leaf may also hold Ed25519. Anything else makes the chain invalid with a reason
naming the key ("leaf key RSA-1024 is below the 2048-bit minimum"). cryptography checks no leaf
key at all, so the leaf is checked before path building; CA keys are checked in the CA extension
callback, so the path builder can still choose another issuer with a good key.

EKU, through extension policies:

* ``server-or-client`` (default): the leaf's EKU must contain serverAuth or clientAuth. Public
  CAs now issue serverAuth-only certificates, which is what mail servers present as clients.
* ``client``: the leaf's EKU must contain clientAuth (the strict RFC reading).
* ``any``: no EKU requirement on any certificate; everything else in RFC 5280 still applies.

A leaf without an EKU extension is rejected under ``server-or-client`` and ``client``: the Web
PKI requires the extension on subscriber certificates, and "no EKU" would otherwise silently
mean "every purpose". anyExtendedKeyUsage on a leaf does not count either (CA/B Forum forbids it
on subscriber certificates). Under ``any`` both are accepted.

CA certificates may omit the EKU extension (RFC 5280; many roots and private CAs do). A CA that
carries one constrains the chain: the purposes the leaf is accepted for (its EKU intersected with
the policy's) are intersected with every CA's EKU (anyExtendedKeyUsage allows all), and the
result must not be empty. So a serverAuth-only leaf under a clientAuth-only intermediate fails,
as it would in a verifier for either purpose; a serverAuth+clientAuth leaf under a serverAuth-only
intermediate passes as serverAuth.

Host names come from the SAN dNSNames, or from DNS-like subject CNs only when the certificate
has no SAN dNSName; one SAN dNSName that is not a usable host name leaves the certificate with no
names at all (never a CN fallback). Names are normalized by ``core.names.normalize_host``.
CN-only leaves are accepted (private CAs still issue them), and because
cryptography applies name constraints only to SANs, the product applies the CAs' DNS name
constraints to those CN names itself.
"""

from __future__ import annotations

import binascii
import bisect
import functools
import ipaddress
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    Subject,
)

from mtls_milter.config import DEFAULT_MIN_RSA_BITS, EkuPolicy
from mtls_milter.core.lru import ExpiringLRU
from mtls_milter.core.names import normalize_host
from mtls_milter.core.quote import clip
from mtls_milter.errors import InputError

__all__ = [
    "MAX_CHAIN_CERTS",
    "CertificateInputError",
    "ChainValidator",
    "ChainVerdict",
    "TrustAnchors",
    "certificate_name",
    "certificate_names",
    "common_name_host",
    "fingerprint_sha256",
    "key_problem",
    "name_matches",
    "normalize_fingerprint",
    "parse_certificates",
    "parse_trust_bundle",
]

MAX_CHAIN_CERTS = 20


_SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
_CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
_ANY_EKU = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE
_EKU_NAMES = {_SERVER_AUTH: "serverAuth", _CLIENT_AUTH: "clientAuth"}
_ONE_MICROSECOND = timedelta(microseconds=1)


class CertificateInputError(InputError):
    """Certificate input that cannot be used, with a one-line message naming the problem."""


# --------------------------------------------------------------------------------------------
# Parsing


_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]{1,64})-----(.*?)(?:-----END ([A-Z0-9 ]{1,64})-----|\Z)", re.DOTALL
)
_CERT_LABELS = frozenset({"CERTIFICATE", "X509 CERTIFICATE"})
_MAX_MESSAGE = 160


def _short(exc: BaseException) -> str:
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
            f"malformed PEM block {index}: not an X.509 certificate ({_short(exc)})"
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
            f"no certificate found in input (DER data is not an X.509 certificate: {_short(exc)})"
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


def _names_and_source(cert: x509.Certificate) -> tuple[tuple[str, ...], bool]:
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
    return _names_and_source(cert)[0]


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
    return _sha256(cert).hex(":").upper()


# A memo of a pure function (the one process-wide cache in the code base; it cannot change
# any result): the same certificate objects (cached fetched chains) are fingerprinted several
# times per message, and hashing the DER costs five times a lookup.
@functools.lru_cache(maxsize=1024)
def _sha256(cert: x509.Certificate) -> bytes:
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


# --------------------------------------------------------------------------------------------
# Key policy

MIN_RSA_EXPONENT = 65537  # NIST SP 800-89 and the CA/B Forum's advice: e at least 2**16 + 1
_ALLOWED_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})  # P-256, P-384, P-521
_OTHER_KEYS: tuple[tuple[type, str], ...] = (
    (ed448.Ed448PublicKey, "Ed448"),
    (x25519.X25519PublicKey, "X25519"),
    (x448.X448PublicKey, "X448"),
)


def key_problem(cert: x509.Certificate, role: str, min_rsa_bits: int) -> str:
    """Why the public key of ``cert`` is not allowed as a ``role`` key, or "" if it is.

    ``role`` is "leaf", "intermediate" or "trust anchor" and starts the message. Allowed: RSA
    with at least ``min_rsa_bits`` bits (a multiple of 8) and an odd exponent of at least 65537,
    ECDSA on P-256, P-384 or P-521, and Ed25519 for a leaf (cryptography's Web PKI verifier
    refuses Ed25519 CA keys). Never raises.
    """
    try:
        key = cert.public_key()
    except Exception as exc:  # an algorithm cryptography does not know (GOST...), an even e
        try:
            oid = cert.public_key_algorithm_oid.dotted_string
        except Exception:
            oid = "unknown"
        return f"{role} key (algorithm {clip(oid, 80)}) cannot be used: {clip(_short(exc), 80)}"
    if isinstance(key, rsa.RSAPublicKey):
        label = f"RSA-{key.key_size}"
        exponent = key.public_numbers().e
        if key.key_size < min_rsa_bits:
            return f"{role} key {label} is below the {min_rsa_bits}-bit minimum"
        if key.key_size % 8:  # CA/B Forum: a whole number of bytes; else a broken generator
            return f"{role} key {label} is not a whole number of bytes"
        if exponent < MIN_RSA_EXPONENT:  # (cryptography refuses to load an even exponent)
            return f"{role} key {label} has public exponent {exponent} (at least 65537 required)"
        return ""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in _ALLOWED_CURVES:
            return ""
        return f"{role} key ECDSA {clip(key.curve.name, 40)} is not allowed"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "" if role == "leaf" else f"{role} key Ed25519 is not allowed for a CA"
    if isinstance(key, dsa.DSAPublicKey):
        return f"{role} key DSA-{key.key_size} is not allowed"
    label = next((name for kind, name in _OTHER_KEYS if isinstance(key, kind)), "")
    return f"{role} key {label or type(key).__name__} is not allowed"


# --------------------------------------------------------------------------------------------
# Chain validation


@dataclass(frozen=True, slots=True)
class ChainVerdict:
    """The outcome of validating one presented chain."""

    valid: bool
    error: str  # "" when valid
    names: tuple[str, ...]  # host names of the leaf, also when invalid (for logs)
    leaf_sha256: str  # fingerprint_sha256(leaf), "" when nothing was presented


class _PolicyError(ValueError):
    """Raised by our extension callbacks; the message becomes the verdict's error."""


# cryptography turns any exception raised inside an extension callback into a verification
# error, so a bug in a callback would read as "chain invalid" (and so as ``fail``). Callbacks
# park such an exception here; the caller re-raises it after verify() as the internal error it
# is. A ContextVar, because several threads validate at once.
_CALLBACK_BUG: ContextVar[BaseException | None] = ContextVar("_CALLBACK_BUG", default=None)

_F = TypeVar("_F", bound=Callable[..., None])


def _policy_callback(check: _F) -> _F:
    """Let ``_PolicyError`` through as a policy verdict; park anything else in _CALLBACK_BUG."""

    @functools.wraps(check)
    def guarded(*args: Any) -> None:
        try:
            check(*args)
        except _PolicyError:
            raise
        except Exception as exc:
            _CALLBACK_BUG.set(exc)
            raise _PolicyError("internal error in a validation callback") from exc

    return cast(_F, guarded)


def _raise_parked_bug() -> None:
    """Re-raise an exception a callback parked during the last verify() of this context."""
    bug = _CALLBACK_BUG.get()
    if bug is not None:
        _CALLBACK_BUG.set(None)
        raise bug


def _ekus(cert: x509.Certificate) -> frozenset[ObjectIdentifier] | None:
    try:
        return frozenset(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None


def _purpose_text(purposes: Iterable[ObjectIdentifier]) -> str:
    return "/".join(_EKU_NAMES[p] for p in (_SERVER_AUTH, _CLIENT_AUTH) if p in purposes)


_EECallback = Callable[[Policy, x509.Certificate, x509.ExtendedKeyUsage], None]
_CACallback = Callable[[Policy, x509.Certificate, x509.ExtendedKeyUsage | None], None]


@_policy_callback
def _ee_san_check(
    _policy: Policy, cert: x509.Certificate, san: x509.SubjectAlternativeName | None
) -> None:
    """The Web PKI's SAN criticality rule, kept while the SAN itself becomes optional (RFC 5280
    4.2.1.6: critical exactly when the subject is empty)."""
    if san is None:
        return
    critical = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    if len(cert.subject) == 0 and not critical:
        raise _PolicyError("subjectAltName must be critical when the subject is empty")
    if len(cert.subject) and critical:
        raise _PolicyError("subjectAltName must not be critical when the subject is not empty")


def _ee_eku_check(wanted: frozenset[ObjectIdentifier]) -> _EECallback:
    @_policy_callback
    def check(_policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage) -> None:
        if not wanted.intersection(eku):
            raise _PolicyError(f"EKU lacks {_purpose_text(wanted)}")

    return check


def _ca_check(
    purposes: frozenset[ObjectIdentifier], ca_key_problem: Callable[[x509.Certificate], str]
) -> _CACallback:
    """The callback every CA certificate of a candidate path (trust anchor included) passes.

    Raising here makes the path builder try another candidate issuer, so a weak-key or wrong-EKU
    intermediate does not hide a good one. An empty ``purposes`` means no EKU requirement.
    """

    @_policy_callback
    def check(_policy: Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
        problem = ca_key_problem(cert)
        if problem:
            raise _PolicyError(problem)
        if not purposes or eku is None or _ANY_EKU in eku:
            return
        if not purposes.intersection(eku):
            raise _PolicyError(f"intermediate CA EKU does not allow {_purpose_text(purposes)}")

    return check


def _utc(at: datetime) -> datetime:
    """``at`` in UTC (naive means UTC), in whole seconds: X.509 validity times have no fractions
    (RFC 5280 4.1.2.5) and cryptography compares in seconds, so our own time checks must too."""
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.replace(microsecond=0)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _transitions(cert: x509.Certificate) -> tuple[datetime, datetime]:
    """The instants at which ``cert`` becomes valid and stops being valid (half-open)."""
    return cert.not_valid_before_utc, cert.not_valid_after_utc + _ONE_MICROSECOND


def _pick_leaf(certs: Sequence[x509.Certificate]) -> int:
    """Index of the leaf: not the issuer of another presented certificate, preferably not a CA."""
    issuers = {c.issuer for c in certs if c.issuer != c.subject}
    candidates = [i for i, c in enumerate(certs) if c.subject not in issuers] or list(
        range(len(certs))
    )
    for i in candidates:
        try:
            bc = certs[i].extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            return i
        except Exception:
            continue
        if not bc.ca:
            return i
    return candidates[0]


def _in_subtree(name: str, base: str) -> bool:
    base = base.lower().rstrip(".")
    if base.startswith("."):
        return name.endswith(base)
    return not base or name == base or name.endswith("." + base)


def _cn_constraint_error(names: Sequence[str], cas: Sequence[x509.Certificate]) -> str:
    """cryptography checks name constraints only on SANs: check CN-derived names here."""
    for ca in cas:
        try:
            nc = ca.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            continue
        permitted = [g.value for g in nc.permitted_subtrees or () if isinstance(g, x509.DNSName)]
        excluded = [g.value for g in nc.excluded_subtrees or () if isinstance(g, x509.DNSName)]
        for name in names:
            bare = name.removeprefix("*.")
            if permitted and not any(_in_subtree(bare, b) for b in permitted):
                return "name constraints violated"
            if any(_in_subtree(bare, b) for b in excluded):
                return "name constraints violated"
    return ""


_CRYPTOGRAPHY_NOISE = re.compile(
    r"^(?:validation failed: )?(?:candidates exhausted: )?|"
    r" \(encountered processing <Certificate\(.*$|"
    r"^Python extension validator failed: \w+: ",
)


def _explain(message: str) -> str:
    """Turn a cryptography VerificationError message into a short verdict error."""
    if "all candidates exhausted with no interior errors" in message:
        return "unknown issuer (no path to a trusted root)"
    if "name constraint" in message:
        return "name constraints violated"
    # The verifier's own key checks; our CA callback normally names the key first.
    if "RSA key is too weak" in message:
        return "a CA key is RSA below 2048 bits"
    if "Forbidden public key algorithm" in message:  # followed by a dump of the parameters
        return "a CA key algorithm is not allowed"
    text = message
    for _ in range(3):  # the prefixes nest
        text = _CRYPTOGRAPHY_NOISE.sub("", text)
    return clip(text.strip() or message)


def _time_error(certs: Sequence[x509.Certificate], at: datetime) -> str:
    for i, cert in enumerate(certs):
        who = "certificate" if i == 0 else "CA certificate"
        if at > cert.not_valid_after_utc:
            return f"{who} expired at {_iso(cert.not_valid_after_utc)}"
        if at < cert.not_valid_before_utc:
            return f"{who} not yet valid until {_iso(cert.not_valid_before_utc)}"
    return ""


# What cryptography raises for certificate bytes it cannot parse (it parses lazily).
_MALFORMED_CERTIFICATE = (
    ValueError,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.InvalidVersion,
)
_CacheKey = tuple[tuple[str, int], tuple[bytes, ...]]  # (policy, SHA-256 of each certificate)


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    verdict: ChainVerdict
    valid_from: datetime  # inclusive
    valid_until: datetime  # exclusive


class ChainValidator:
    """Validates presented client (and server) chains against fixed trust anchors.

    Thread-safe. Client verdicts are cached in a bounded LRU keyed by the presented chain, and a
    cached verdict is reused only while the validation time stays in the interval in which no
    presented certificate or trust anchor becomes valid or expires, so it equals a fresh one.
    """

    def __init__(
        self,
        anchors: TrustAnchors,
        eku: EkuPolicy = EkuPolicy.SERVER_OR_CLIENT,
        *,
        min_rsa_bits: int = DEFAULT_MIN_RSA_BITS,
        cache_size: int = 4096,
    ) -> None:
        self.anchors = anchors
        self.eku = EkuPolicy(eku)
        self._min_rsa_bits = min_rsa_bits
        # Part of every cache key: a verdict made under another policy is never reused.
        self._policy_key = (self.eku.value, min_rsa_bits)
        self._store = Store(list(anchors.certificates))
        self._anchor_fps = frozenset(_sha256(c) for c in anchors.certificates)
        self._cache: ExpiringLRU[_CacheKey, _CacheEntry] = ExpiringLRU(cache_size)
        self._anchor_transitions = sorted(t for c in anchors.certificates for t in _transitions(c))
        self._wanted: frozenset[ObjectIdentifier] = {
            EkuPolicy.ANY: frozenset(),
            EkuPolicy.CLIENT: frozenset({_CLIENT_AUTH}),
            EkuPolicy.SERVER_OR_CLIENT: frozenset({_SERVER_AUTH, _CLIENT_AUTH}),
        }[self.eku]
        self._policies = self._client_policies()
        # The Web PKI server profile, with our key policy on the CAs (the default CA policy
        # checks the same EKU rule: serverAuth or anyExtendedKeyUsage when present).
        self._server_policies = (
            ExtensionPolicy.webpki_defaults_ca().may_be_present(
                x509.ExtendedKeyUsage,
                Criticality.AGNOSTIC,
                _ca_check(frozenset({_SERVER_AUTH}), self._ca_key_problem),
            ),
            ExtensionPolicy.webpki_defaults_ee(),
        )

    @property
    def min_rsa_bits(self) -> int:
        """The smallest RSA key allowed anywhere in a chain (``[tls] min_rsa_bits``)."""
        return self._min_rsa_bits

    def _ca_key_problem(self, cert: x509.Certificate) -> str:
        role = "trust anchor" if _sha256(cert) in self._anchor_fps else "intermediate"
        return key_problem(cert, role, self.min_rsa_bits)

    def _client_policies(
        self,
    ) -> dict[frozenset[ObjectIdentifier], tuple[ExtensionPolicy, ExtensionPolicy]]:
        """(CA policy, EE policy) per set of leaf purposes, built once (they are immutable).

        A CN-only leaf is allowed (names then come from the CN, see the module docstring).
        """
        ee_base = ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, _ee_san_check
        )
        ca_base = ExtensionPolicy.webpki_defaults_ca()

        def ca(purposes: frozenset[ObjectIdentifier]) -> ExtensionPolicy:
            check = _ca_check(purposes, self._ca_key_problem)
            return ca_base.may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, check)

        if not self._wanted:
            ee = ee_base.may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
            return {frozenset(): (ca(frozenset()), ee)}
        ee = ee_base.require_present(
            x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ee_eku_check(self._wanted)
        )
        return {
            purposes: (ca(purposes), ee)
            for purposes in (
                frozenset({_SERVER_AUTH}),
                frozenset({_CLIENT_AUTH}),
                frozenset({_SERVER_AUTH, _CLIENT_AUTH}),
            )
            if purposes <= self._wanted
        }

    # -- client ---------------------------------------------------------------------------

    def validate_client(self, chain: Sequence[x509.Certificate], at: datetime) -> ChainVerdict:
        """Validate a client chain (leaf + intermediates in any order) at ``at``.

        A certificate that cryptography cannot parse gives an invalid verdict. Any other
        exception is an internal error and propagates: it says nothing about the chain, and
        the engine turns it into ``temperror`` (never the ``fail`` an invalid verdict means).
        """
        try:
            if not chain:
                return ChainVerdict(False, "no certificate presented", (), "")
            at = _utc(at)
            key = (self._policy_key, tuple(dict.fromkeys(_sha256(c) for c in chain)))
            entry = self._cache.get(key, lambda entry: entry.valid_from <= at < entry.valid_until)
            if entry is not None:
                return entry.verdict
            verdict, valid_from, valid_until = self._validate_client(chain, at)
            self._cache.put(key, _CacheEntry(verdict, valid_from, valid_until))
            return verdict
        except _MALFORMED_CERTIFICATE as exc:  # lazily parsed fields of a hostile certificate
            return ChainVerdict(False, f"malformed certificate: {_short(exc)}", (), "")

    def _window(self, certs: Sequence[x509.Certificate], at: datetime) -> tuple[datetime, datetime]:
        """The largest [from, until) around ``at`` in which no certificate's validity changes."""
        points = self._anchor_transitions
        i = bisect.bisect_right(points, at)
        lo = points[i - 1] if i else datetime.min.replace(tzinfo=UTC)
        hi = points[i] if i < len(points) else datetime.max.replace(tzinfo=UTC)
        for cert in certs:
            for t in _transitions(cert):
                if t <= at:
                    lo = max(lo, t)
                else:
                    hi = min(hi, t)
        return lo, hi

    def _validate_client(
        self, presented: Sequence[x509.Certificate], at: datetime
    ) -> tuple[ChainVerdict, datetime, datetime]:
        certs = list({_sha256(c): c for c in presented}.values())  # memoized: cache key too
        leaf_index = _pick_leaf(certs)
        leaf = certs[leaf_index]
        others = certs[:leaf_index] + certs[leaf_index + 1 :]
        names, from_cn = _names_and_source(leaf)
        fp = fingerprint_sha256(leaf)
        window = self._window(certs, at)

        def fail(error: str) -> tuple[ChainVerdict, datetime, datetime]:
            return ChainVerdict(False, error, names, fp), *window

        if len(certs) > MAX_CHAIN_CERTS:
            return fail(f"chain has {len(certs)} certificates (limit {MAX_CHAIN_CERTS})")
        time_error = _time_error([leaf], at)
        if time_error:
            return fail(time_error)

        leaf_ekus = _ekus(leaf)
        purposes = self._wanted.intersection(leaf_ekus or ())
        if self._wanted and leaf_ekus is None:
            return fail(f"EKU lacks {_purpose_text(self._wanted)} (no EKU extension)")
        key_error = key_problem(leaf, "leaf", self.min_rsa_bits)
        if key_error:
            return fail(key_error)
        ca_policy, ee_policy = self._policies[purposes or self._wanted]
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(at)
            .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
            .build_client_verifier()
        )
        _CALLBACK_BUG.set(None)
        try:
            built = verifier.verify(leaf, others).chain
        except Exception as exc:
            _raise_parked_bug()
            message = str(exc)
            if "not valid at validation time" in message:
                return fail(_time_error(certs, at) or "a CA certificate is not valid at this time")
            return fail(_explain(message))

        # Intersect the leaf's purposes with every CA's EKU along the path actually built.
        for ca in built[1:]:
            ca_ekus = _ekus(ca)
            if self._wanted and ca_ekus is not None and _ANY_EKU not in ca_ekus:
                purposes = purposes & ca_ekus
                if not purposes:
                    return fail(
                        f"intermediate CA EKU does not allow "
                        f"{_purpose_text(self._wanted.intersection(leaf_ekus or ()))}"
                    )
        if from_cn and names:
            error = _cn_constraint_error(names, built[1:])
            if error:
                return fail(error)
        return ChainVerdict(True, "", names, fp), *window

    # -- server ---------------------------------------------------------------------------

    def validate_server(
        self,
        chain: Sequence[x509.Certificate],
        at: datetime,
        server_name: str,
        *,
        max_depth: int | None = None,
    ) -> ChainVerdict:
        """Validate a TLS server chain for ``server_name`` (DNS name or IP) with the Web PKI
        server profile (EKU serverAuth). Never raises.

        ``chain[0]`` is the leaf, as TLS requires; the rest are untrusted intermediates in any
        order. ``max_depth`` limits the number of intermediates (cryptography's default
        otherwise); no cache: the outbound probe validates rarely.
        """
        try:
            if not chain:
                return ChainVerdict(False, "no certificate presented", (), "")
            leaf = chain[0]
            names = certificate_names(leaf)
            fp = fingerprint_sha256(leaf)
            if len(chain) > MAX_CHAIN_CERTS:
                return ChainVerdict(
                    False,
                    f"chain has {len(chain)} certificates (limit {MAX_CHAIN_CERTS})",
                    names,
                    fp,
                )
            key_error = key_problem(leaf, "leaf", self.min_rsa_bits)
            if key_error:
                return ChainVerdict(False, key_error, names, fp)
            subject: Subject
            try:
                subject = x509.IPAddress(ipaddress.ip_address(server_name))
            except ValueError:
                subject = x509.DNSName(server_name.rstrip("."))
            ca_policy, ee_policy = self._server_policies
            builder = (
                PolicyBuilder()
                .store(self._store)
                .time(_utc(at))
                .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
            )
            if max_depth is not None:
                builder = builder.max_chain_depth(max_depth)
            try:
                builder.build_server_verifier(subject).verify(leaf, list(chain[1:]))
            except Exception as exc:
                message = str(exc)
                if "not valid at validation time" in message:
                    error = _time_error(chain, _utc(at)) or "a CA certificate is not valid now"
                else:
                    error = _explain(message)
                return ChainVerdict(False, error, names, fp)
            return ChainVerdict(True, "", names, fp)
        except Exception as exc:
            return ChainVerdict(False, f"internal error: {_short(exc)}", (), "")
