"""Trust store loading: the system CA bundle and PEM files named in the configuration.

Reading files is I/O, so it lives here; parsing the bytes is :mod:`mtls_milter.core.certs`.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mtls_milter.core.certs import (
    CertificateInputError,
    TrustAnchors,
    parse_certificates,
    parse_trust_bundle,
)

SYSTEM_BUNDLE_FALLBACK = "/etc/ssl/certs/ca-certificates.crt"


def _plural(n: int) -> str:
    return f"{n} certificate" if n == 1 else f"{n} certificates"


def _system_bundle_path() -> str:
    cafile = ssl.get_default_verify_paths().cafile
    if cafile:
        return cafile
    if Path(SYSTEM_BUNDLE_FALLBACK).is_file():
        return SYSTEM_BUNDLE_FALLBACK
    raise CertificateInputError(
        f"system trust bundle not found (no OpenSSL default CA file, no {SYSTEM_BUNDLE_FALLBACK})"
    )


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CertificateInputError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _load_system() -> tuple[list[x509.Certificate], str]:
    path = _system_bundle_path()
    certs, skipped = parse_trust_bundle(_read(path))
    if not certs:
        raise CertificateInputError(f"{path}: no certificates found in the system trust bundle")
    note = f", {skipped} skipped" if skipped else ""
    return certs, f"system ({path}, {_plural(len(certs))}{note})"


def load_trust_anchors(sources: Sequence[str]) -> TrustAnchors:
    """Load trust anchors from ``"system"`` and/or PEM file paths; duplicates are dropped."""
    certs: list[x509.Certificate] = []
    seen: set[bytes] = set()
    descriptions: list[str] = []
    for source in sources:
        if source == "system":
            loaded, description = _load_system()
        else:
            try:
                loaded = list(parse_certificates(_read(source), limit=None))
            except CertificateInputError as exc:
                if str(exc).startswith(f"{source}:"):
                    raise
                raise CertificateInputError(f"{source}: {exc}") from None
            description = f"{source} ({_plural(len(loaded))})"
        descriptions.append(description)
        for cert in loaded:
            fp = cert.fingerprint(hashes.SHA256())
            if fp not in seen:
                seen.add(fp)
                certs.append(cert)
    if not certs:
        raise CertificateInputError("no trust anchors configured")
    return TrustAnchors(tuple(certs), tuple(descriptions))
