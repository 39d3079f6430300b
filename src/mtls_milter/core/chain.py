"""Chain validation: RFC 5280 paths with the product's key and EKU policies.

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
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    Subject,
)

from mtls_milter.config import DEFAULT_MIN_RSA_BITS, EkuPolicy
from mtls_milter.core.certs import (
    MAX_CHAIN_CERTS,
    TrustAnchors,
    certificate_names,
    fingerprint_sha256,
    names_and_source,
    sha256_digest,
    short_error,
)
from mtls_milter.core.keys import key_problem
from mtls_milter.core.lru import ExpiringLRU
from mtls_milter.core.path_policy import (
    ANY_EKU,
    CALLBACK_BUG,
    CLIENT_AUTH,
    SERVER_AUTH,
    ca_check,
    cn_constraint_error,
    ee_eku_check,
    ee_san_check,
    ekus,
    explain,
    purpose_text,
    raise_parked_bug,
)

__all__ = ["ChainValidator", "ChainVerdict"]

_ONE_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class ChainVerdict:
    """The outcome of validating one presented chain."""

    valid: bool
    error: str  # "" when valid
    names: tuple[str, ...]  # host names of the leaf, also when invalid (for logs)
    leaf_sha256: str  # fingerprint_sha256(leaf), "" when nothing was presented


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
        self._anchor_fps = frozenset(sha256_digest(c) for c in anchors.certificates)
        self._cache: ExpiringLRU[_CacheKey, _CacheEntry] = ExpiringLRU(cache_size)
        self._anchor_transitions = sorted(t for c in anchors.certificates for t in _transitions(c))
        self._wanted: frozenset[ObjectIdentifier] = {
            EkuPolicy.ANY: frozenset(),
            EkuPolicy.CLIENT: frozenset({CLIENT_AUTH}),
            EkuPolicy.SERVER_OR_CLIENT: frozenset({SERVER_AUTH, CLIENT_AUTH}),
        }[self.eku]
        self._policies = self._client_policies()
        # The Web PKI server profile, with our key policy on the CAs (the default CA policy
        # checks the same EKU rule: serverAuth or anyExtendedKeyUsage when present).
        self._server_policies = (
            ExtensionPolicy.webpki_defaults_ca().may_be_present(
                x509.ExtendedKeyUsage,
                Criticality.AGNOSTIC,
                ca_check(frozenset({SERVER_AUTH}), self._ca_key_problem),
            ),
            ExtensionPolicy.webpki_defaults_ee(),
        )

    @property
    def anchor_count(self) -> int:
        """How many distinct trust anchors this validator holds (a metrics gauge)."""
        return len(self._anchor_fps)

    @property
    def min_rsa_bits(self) -> int:
        """The smallest RSA key allowed anywhere in a chain (``[tls] min_rsa_bits``)."""
        return self._min_rsa_bits

    def _ca_key_problem(self, cert: x509.Certificate) -> str:
        role = "trust anchor" if sha256_digest(cert) in self._anchor_fps else "intermediate"
        return key_problem(cert, role, self.min_rsa_bits)

    def _client_policies(
        self,
    ) -> dict[frozenset[ObjectIdentifier], tuple[ExtensionPolicy, ExtensionPolicy]]:
        """(CA policy, EE policy) per set of leaf purposes, built once (they are immutable).

        A CN-only leaf is allowed (names then come from the CN, see :mod:`mtls_milter.core.certs`).
        """
        ee_base = ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, ee_san_check
        )
        ca_base = ExtensionPolicy.webpki_defaults_ca()

        def ca(purposes: frozenset[ObjectIdentifier]) -> ExtensionPolicy:
            check = ca_check(purposes, self._ca_key_problem)
            return ca_base.may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, check)

        if not self._wanted:
            ee = ee_base.may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
            return {frozenset(): (ca(frozenset()), ee)}
        ee = ee_base.require_present(
            x509.ExtendedKeyUsage, Criticality.AGNOSTIC, ee_eku_check(self._wanted)
        )
        return {
            purposes: (ca(purposes), ee)
            for purposes in (
                frozenset({SERVER_AUTH}),
                frozenset({CLIENT_AUTH}),
                frozenset({SERVER_AUTH, CLIENT_AUTH}),
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
            key = (self._policy_key, tuple(dict.fromkeys(sha256_digest(c) for c in chain)))
            entry = self._cache.get(key, lambda entry: entry.valid_from <= at < entry.valid_until)
            if entry is not None:
                return entry.verdict
            verdict, valid_from, valid_until = self._validate_client(chain, at)
            self._cache.put(key, _CacheEntry(verdict, valid_from, valid_until))
            return verdict
        except _MALFORMED_CERTIFICATE as exc:  # lazily parsed fields of a hostile certificate
            return ChainVerdict(False, f"malformed certificate: {short_error(exc)}", (), "")

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
        certs = list({sha256_digest(c): c for c in presented}.values())  # memoized: cache key too
        leaf_index = _pick_leaf(certs)
        leaf = certs[leaf_index]
        others = certs[:leaf_index] + certs[leaf_index + 1 :]
        names, from_cn = names_and_source(leaf)
        fp = fingerprint_sha256(leaf)
        window = self._window(certs, at)

        def fail(error: str) -> tuple[ChainVerdict, datetime, datetime]:
            return ChainVerdict(False, error, names, fp), *window

        if len(certs) > MAX_CHAIN_CERTS:
            return fail(f"chain has {len(certs)} certificates (limit {MAX_CHAIN_CERTS})")
        time_error = _time_error([leaf], at)
        if time_error:
            return fail(time_error)

        leaf_ekus = ekus(leaf)
        purposes = self._wanted.intersection(leaf_ekus or ())
        if self._wanted and leaf_ekus is None:
            return fail(f"EKU lacks {purpose_text(self._wanted)} (no EKU extension)")
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
        CALLBACK_BUG.set(None)
        try:
            built = verifier.verify(leaf, others).chain
        except Exception as exc:
            raise_parked_bug()
            message = str(exc)
            if "not valid at validation time" in message:
                return fail(_time_error(certs, at) or "a CA certificate is not valid at this time")
            return fail(explain(message))

        # Intersect the leaf's purposes with every CA's EKU along the path actually built.
        for ca in built[1:]:
            ca_ekus = ekus(ca)
            if self._wanted and ca_ekus is not None and ANY_EKU not in ca_ekus:
                purposes = purposes & ca_ekus
                if not purposes:
                    return fail(
                        f"intermediate CA EKU does not allow "
                        f"{purpose_text(self._wanted.intersection(leaf_ekus or ()))}"
                    )
        if from_cn and names:
            error = cn_constraint_error(names, built[1:])
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
                    error = explain(message)
                return ChainVerdict(False, error, names, fp)
            return ChainVerdict(True, "", names, fp)
        except Exception as exc:
            return ChainVerdict(False, f"internal error: {short_error(exc)}", (), "")
