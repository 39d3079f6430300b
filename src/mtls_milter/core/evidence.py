"""Certificate evidence: what is known about the client's TLS session and certificate.

All MTA-specific macro decoding lives here, so front ends hand over raw macros and never
interpret them themselves. docs/design.md ("Evidence model") describes what each MTA sends.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mtls_milter.core.certs import common_name_host, fingerprint_sha256, normalize_fingerprint
from mtls_milter.core.quote import quote


class CertPresence(StrEnum):
    """Whether the client presented a certificate, as far as the MTA lets us know."""

    ABSENT = "absent"
    PRESENTED = "presented"
    UNKNOWN = "unknown"  # Postfix tells nothing about a certificate it did not trust


class EvidenceKind(StrEnum):
    """The evidence a result rests on, strongest first."""

    CHAIN = "chain"
    MTA = "mta"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class TlsSession:
    """TLS facts of one SMTP session, decoded from the MTA's macros."""

    tls: bool
    version: str = ""
    certificate: CertPresence = CertPresence.UNKNOWN
    mta_verified: bool = False
    mta_cn: str = ""  # the CN the MTA verified; "" when absent, empty or a sentinel
    fingerprint: str = ""  # SHA-256 of the leaf, canonical colon hex; "" when unknown
    fingerprint_md5: str = ""
    notes: tuple[str, ...] = ()  # anomalies worth a log line (garbage macros, sentinels)


NO_TLS = TlsSession(tls=False, certificate=CertPresence.ABSENT)


@dataclass(frozen=True, slots=True)
class Evidence:
    """Everything the evaluation may use about the client certificate."""

    session: TlsSession
    chain: tuple[x509.Certificate, ...] = ()  # bound to the session (leaf fingerprint checked)


def chain_evidence(chain: tuple[x509.Certificate, ...]) -> Evidence:
    """Evidence from a chain the operator supplied directly (``check --chain``), in any order."""
    return Evidence(session=TlsSession(tls=True, certificate=CertPresence.PRESENTED), chain=chain)


def mta_evidence(cn: str) -> Evidence:
    """Evidence of a certificate the MTA verified, known only by its CN."""
    session = TlsSession(
        tls=True, certificate=CertPresence.PRESENTED, mta_verified=True, mta_cn=_clean_cn(cn)
    )
    return Evidence(session=session)


def with_chain(evidence: Evidence, chain: tuple[x509.Certificate, ...]) -> Evidence:
    """Attach a chain, but only if its leaf is the certificate of this session.

    The binding is the SHA-256 fingerprint; the MD5 one is used only when the MTA reported
    nothing else (Sendmail without ``confCERT_FINGERPRINT_ALGORITHM``).
    """
    if chain and chain_binding(evidence.session, chain[0]):
        return replace(evidence, chain=chain)
    return evidence


def chain_binding(session: TlsSession, leaf: x509.Certificate) -> str:
    """``"sha256"`` or ``"md5"`` when ``leaf`` is this session's certificate, else ``""``."""
    if session.fingerprint:
        return "sha256" if fingerprint_sha256(leaf) == session.fingerprint else ""
    if session.fingerprint_md5:
        md5 = leaf.fingerprint(hashes.MD5()).hex(":").upper()  # Sendmail's binding, MD5 by design
        return "md5" if md5 == session.fingerprint_md5 else ""
    return ""


def with_fingerprint(session: TlsSession, fingerprint: str) -> TlsSession:
    """The session with a leaf fingerprint learnt elsewhere (Postfix's policy delegation).

    ``fingerprint`` may be SHA-256 or MD5 (Postfix's ``smtpd_tls_fingerprint_digest``), any
    case, with or without colons; anything else leaves the session unchanged. A fingerprint
    proves a certificate was presented, whether the MTA trusted it or not.
    """
    if not session.tls or session.certificate is CertPresence.ABSENT:
        return session
    sha256 = normalize_fingerprint(fingerprint[:_MAX_MACRO_LENGTH])
    md5 = "" if sha256 else normalize_md5(fingerprint[:_MAX_MACRO_LENGTH])
    if not sha256 and not md5:
        return session
    return replace(
        session,
        certificate=CertPresence.PRESENTED,
        fingerprint=session.fingerprint or (sha256 or ""),
        fingerprint_md5=session.fingerprint_md5 or md5,
    )


# ---------------------------------------------------------------------------------------------
# MTA macros. `macros` maps a macro name as the MTA spells it ("{cert_subject}", "j") to its
# value; None or a missing key means "not sent", "" means "sent empty" (as measured on
# Postfix 3.7 and Sendmail 8.17).

Macros = Mapping[str, str | None]

# Sendmail {verify} values meaning a certificate was presented but not accepted.
_SENDMAIL_NO_CERT = "NO"
_SENDMAIL_NO_TLS = "NONE"
_SENDMAIL_OK = "OK"
_SENTINEL_PREFIX = "BadCertificate"  # Sendmail's {cn_subject} placeholders, never host names
_MAX_MACRO_LENGTH = 1024


def session_from_macros(macros: Macros) -> TlsSession:
    """Decode the TLS facts of a session from Postfix's or Sendmail's macros.

    Only Sendmail sends ``{verify}``; its presence selects Sendmail's rules.
    """
    if macros.get("{verify}") is not None:
        return _sendmail_session(macros)
    return _postfix_session(macros)


def _postfix_session(macros: Macros) -> TlsSession:
    version = _macro(macros, "{tls_version}")
    if version is None:
        return NO_TLS
    issuer = _macro(macros, "{cert_issuer}")
    subject = _macro(macros, "{cert_subject}")
    if issuer is None:
        # Postfix sends nothing for an untrusted certificate, so absence proves nothing.
        notes = ("{cert_subject} without {cert_issuer}",) if subject else ()
        return TlsSession(tls=True, version=version, notes=notes)
    cn = _clean_cn(subject or "")
    notes = () if cn or not subject else (f"unusable CN {quote(subject, 80)}",)
    return TlsSession(
        tls=True,
        version=version,
        certificate=CertPresence.PRESENTED,
        mta_verified=True,
        mta_cn=cn,
        notes=notes,
    )


def _sendmail_session(macros: Macros) -> TlsSession:
    verify = (_macro(macros, "{verify}") or "").strip().upper()
    version = _macro(macros, "{tls_version}") or ""
    if verify in ("", _SENDMAIL_NO_TLS) and not version:
        return NO_TLS
    fingerprint, md5, notes = _sendmail_fingerprints(macros)
    if verify == _SENDMAIL_NO_CERT:
        return TlsSession(tls=True, version=version, certificate=CertPresence.ABSENT)
    verified = verify == _SENDMAIL_OK
    raw_cn = _macro(macros, "{cn_subject}") or ""
    cn = ""
    if verified:
        cn = _clean_cn(xtext_decode(raw_cn))
        if raw_cn and not cn:
            notes += (f"unusable {{cn_subject}} {quote(raw_cn, 80)}",)
    return TlsSession(
        tls=True,
        version=version,
        certificate=CertPresence.PRESENTED,
        mta_verified=verified,
        mta_cn=cn,
        fingerprint=fingerprint,
        fingerprint_md5=md5,
        notes=notes,
    )


def _sendmail_fingerprints(macros: Macros) -> tuple[str, str, tuple[str, ...]]:
    notes: tuple[str, ...] = ()
    fingerprint = ""
    raw_fp = _macro(macros, "{cert_fp}")
    if raw_fp:
        fingerprint = normalize_fingerprint(raw_fp) or ""
        if not fingerprint:
            notes += (f"unusable {{cert_fp}} {quote(raw_fp, 100)}",)
    md5 = ""
    raw_md5 = _macro(macros, "{cert_md5}")
    if raw_md5:
        md5 = normalize_md5(raw_md5)
        if not md5:
            notes += (f"unusable {{cert_md5}} {quote(raw_md5, 100)}",)
    return fingerprint, md5, notes


def _macro(macros: Macros, name: str) -> str | None:
    value = macros.get(name)
    if value is None:
        return None
    return value[:_MAX_MACRO_LENGTH]


_XTEXT_HEX = re.compile(rb"\+([0-9A-Fa-f]{2})")


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 xtext (``+20`` → space), as Sendmail encodes certificate macros.

    The decoded bytes are read as UTF-8 (an internationalized CN arrives as ``+C3+9F``...);
    bytes that are not UTF-8 become U+FFFD, which no host name contains.
    """
    if "+" not in text:
        return text
    raw = _XTEXT_HEX.sub(
        lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8", "surrogatepass")
    )
    return raw.decode("utf-8", "replace")


def _clean_cn(cn: str) -> str:
    """The CN as a normalized host name; "" for empty values, sentinels and garbage.

    The same rules as for a CN read from a certificate (:func:`common_name_host`), so the MTA's
    CN and a chain's CN give the same name.
    """
    cn = cn.strip()
    if not cn or cn.startswith(_SENTINEL_PREFIX):
        return ""
    return common_name_host(cn) or ""


def normalize_md5(text: str) -> str:
    """An MD5 fingerprint (colons optional) in canonical colon hex, else ""."""
    digits = text.replace(":", "").strip().upper()
    if len(digits) != 32 or any(c not in "0123456789ABCDEF" for c in digits):
        return ""
    return ":".join(digits[i : i + 2] for i in range(0, 32, 2))
