"""Key policy: which public keys a certificate of an accepted chain may hold.

RSA of at least ``[tls] min_rsa_bits`` bits with an odd exponent of at least 65537, ECDSA on
P-256, P-384 or P-521, and Ed25519 for a leaf; anything else is refused with a reason naming the
key (docs/design.md, "Key policy").
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519

from mtls_milter.core.certs import short_error
from mtls_milter.core.quote import clip

__all__ = ["MIN_RSA_EXPONENT", "key_problem"]

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
        return (
            f"{role} key (algorithm {clip(oid, 80)}) cannot be used: {clip(short_error(exc), 80)}"
        )
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
