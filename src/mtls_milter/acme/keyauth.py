"""Tokens, JWK thumbprints (RFC 7638) and key authorizations (RFC 8555 §8.1, §8.3).

Computed by hand for the key types an ACME account can have (RSA, EC, OKP), so that the
validator needs no JOSE library at run time; the tests cross-check against josepy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MAX_TOKEN_LENGTH",
    "MIN_TOKEN_LENGTH",
    "JwkError",
    "b64url",
    "check_thumbprint",
    "check_token",
    "is_token",
    "jwk_thumbprint",
    "key_authorization",
]

# RFC 8555 §8.3: the token has at least 128 bits of entropy, base64url without padding:
# 128 bits are 22 characters. The upper bound only keeps hostile input small.
MIN_TOKEN_LENGTH = 22
MAX_TOKEN_LENGTH = 256
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_THUMBPRINT = re.compile(r"[A-Za-z0-9_-]{43}")  # SHA-256: 32 bytes, 43 base64url characters

# RFC 7638 §3.2: the required members per key type, in lexicographic order.
_REQUIRED = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}


class JwkError(ValueError):
    """The JWK is unusable; the message says why in one line."""


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def is_token(text: str, *, min_length: int = 1) -> bool:
    """True when ``text`` is base64url only (no padding, no '.', '/', '%'), bounded length."""
    return min_length <= len(text) <= MAX_TOKEN_LENGTH and bool(_B64URL.fullmatch(text))


def check_token(token: str) -> str:
    """Return ``token`` if it is a well-formed ACME token, else raise ValueError."""
    if not _B64URL.fullmatch(token):
        raise ValueError("token must contain only base64url characters (A-Z a-z 0-9 - _)")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"token has {len(token)} characters; RFC 8555 needs at least 128 bits "
            f"({MIN_TOKEN_LENGTH} characters)"
        )
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError(f"token longer than {MAX_TOKEN_LENGTH} characters")
    return token


def check_thumbprint(thumbprint: str) -> str:
    """Return ``thumbprint`` if it is a base64url SHA-256 digest, else raise ValueError."""
    if not _THUMBPRINT.fullmatch(thumbprint):
        raise ValueError("thumbprint must be 43 base64url characters (a SHA-256 digest)")
    return thumbprint


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public or private JWK, base64url-encoded.

    Only the required public members take part, so a private JWK (with ``d`` …) gives the
    thumbprint of its public key, as RFC 7638 §3.2.1 intends.
    """
    if not isinstance(jwk, Mapping):
        raise JwkError("a JWK must be a JSON object")
    kty = jwk.get("kty")
    if not isinstance(kty, str) or kty not in _REQUIRED:  # a list or object is unhashable
        raise JwkError(f"unsupported JWK key type {kty!r} (expected RSA, EC or OKP)")
    members: dict[str, str] = {}
    for name in _REQUIRED[kty]:
        value = jwk.get(name)
        if not isinstance(value, str) or not value:
            raise JwkError(f"{kty} JWK lacks the member {name!r}")
        if name != "kty" and name != "crv" and not _B64URL.fullmatch(value):
            raise JwkError(f"JWK member {name!r} is not base64url")
        members[name] = value
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def key_authorization(token: str, thumbprint: str) -> str:
    """``token || '.' || base64url(thumbprint)`` (RFC 8555 §8.1)."""
    return f"{token}.{thumbprint}"
