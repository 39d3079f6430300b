"""What the product layers on cryptography's path builder, beside the path itself.

cryptography's ``x509.verification`` calls the extension callbacks here for every candidate
path: they apply the product's EKU policy and the CA key policy. The DNS name constraints of
the CAs are applied here to CN-derived names (cryptography checks SANs only), and
cryptography's error messages are turned into short verdict reasons. Used by
:mod:`mtls_milter.core.chain`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar, cast

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier
from cryptography.x509.verification import Policy

from mtls_milter.core.quote import clip

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
ANY_EKU = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE
_EKU_NAMES = {SERVER_AUTH: "serverAuth", CLIENT_AUTH: "clientAuth"}


class _PolicyError(ValueError):
    """Raised by our extension callbacks; the message becomes the verdict's error."""


# cryptography turns any exception raised inside an extension callback into a verification
# error, so a bug in a callback would read as "chain invalid" (and so as ``fail``). Callbacks
# park such an exception here; the caller re-raises it after verify() as the internal error it
# is. A ContextVar, because several threads validate at once.
CALLBACK_BUG: ContextVar[BaseException | None] = ContextVar("CALLBACK_BUG", default=None)

_F = TypeVar("_F", bound=Callable[..., None])


def _policy_callback(check: _F) -> _F:
    """Let ``_PolicyError`` through as a policy verdict; park anything else in CALLBACK_BUG."""

    @functools.wraps(check)
    def guarded(*args: Any) -> None:
        try:
            check(*args)
        except _PolicyError:
            raise
        except Exception as exc:
            CALLBACK_BUG.set(exc)
            raise _PolicyError("internal error in a validation callback") from exc

    return cast(_F, guarded)


def raise_parked_bug() -> None:
    """Re-raise an exception a callback parked during the last verify() of this context."""
    bug = CALLBACK_BUG.get()
    if bug is not None:
        CALLBACK_BUG.set(None)
        raise bug


def ekus(cert: x509.Certificate) -> frozenset[ObjectIdentifier] | None:
    try:
        return frozenset(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None


def purpose_text(purposes: Iterable[ObjectIdentifier]) -> str:
    return "/".join(_EKU_NAMES[p] for p in (SERVER_AUTH, CLIENT_AUTH) if p in purposes)


_EECallback = Callable[[Policy, x509.Certificate, x509.ExtendedKeyUsage], None]
_CACallback = Callable[[Policy, x509.Certificate, x509.ExtendedKeyUsage | None], None]


@_policy_callback
def ee_san_check(
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


def ee_eku_check(wanted: frozenset[ObjectIdentifier]) -> _EECallback:
    @_policy_callback
    def check(_policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage) -> None:
        if not wanted.intersection(eku):
            raise _PolicyError(f"EKU lacks {purpose_text(wanted)}")

    return check


def ca_check(
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
        if not purposes or eku is None or ANY_EKU in eku:
            return
        if not purposes.intersection(eku):
            raise _PolicyError(f"intermediate CA EKU does not allow {purpose_text(purposes)}")

    return check


def _in_subtree(name: str, base: str) -> bool:
    base = base.lower().rstrip(".")
    if base.startswith("."):
        return name.endswith(base)
    return not base or name == base or name.endswith("." + base)


def cn_constraint_error(names: Sequence[str], cas: Sequence[x509.Certificate]) -> str:
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


def explain(message: str) -> str:
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
