"""DKIM verification with dkimpy, its key lookups through the injected resolver and budget.

Each ``DKIM-Signature`` field (at most :data:`MAX_SIGNATURES`) gives one identifier: ``pass``,
``fail`` (bad signature, body hash mismatch, expired, no key, a key that is malformed, too
small or larger than :data:`MAX_KEY_RECORD` bytes), ``permerror`` (a signature dkimpy cannot
read) or
``temperror`` (DNS failure or budget spent). dkimpy never sees a socket: its ``dnsfunc`` is ours.
"""

from __future__ import annotations

import logging

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from mtls_milter.core.dmarc import Identifier
from mtls_milter.core.dmarc_walk import Budget
from mtls_milter.core.lookups import LookupStatus, TxtResolver

__all__ = ["MAX_KEY_RECORD", "MAX_SIGNATURES", "verify_dkim"]

MAX_SIGNATURES = 5
MAX_KEY_RECORD = 8192  # bytes of a key record; an RSA-16384 key is ~2.8 kB in base64

_QUIET = logging.getLogger("mtls_milter.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False  # dkimpy logs every failure at ERROR level with outside data in it


class _DnsTrouble(Exception):
    """A key lookup failed temporarily; the signature's result is temperror."""


def verify_dkim(message: bytes, resolver: TxtResolver, budget: Budget) -> tuple[Identifier, ...]:
    """One identifier per DKIM signature of the raw ``message`` (headers + body). Never raises."""
    try:
        verifier = dkim.DKIM(message, logger=_QUIET)
        signatures = [v for k, v in verifier.headers if k.lower() == b"dkim-signature"]
    except Exception:  # a message dkimpy cannot split into fields: nothing to verify
        return ()
    return tuple(
        _verify_one(verifier, index, raw, resolver, budget)
        for index, raw in enumerate(signatures[:MAX_SIGNATURES])
    )


def _verify_one(
    verifier: dkim.DKIM, index: int, raw: bytes, resolver: TxtResolver, budget: Budget
) -> Identifier:
    domain, selector = _domain_and_selector(raw)

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        lookup = resolver.txt(text, budget.remaining())
        if lookup.status is LookupStatus.TEMPFAIL:
            raise _DnsTrouble(lookup.detail)
        if lookup.status is not LookupStatus.OK or not lookup.records:
            return None
        record = lookup.records[0]
        return record if len(record) <= MAX_KEY_RECORD else None

    try:
        ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
    except _DnsTrouble:
        return Identifier("dkim", "temperror", domain, selector)
    except dkim.ValidationError:  # body hash mismatch, expired, a tag that does not verify
        return Identifier("dkim", "fail", domain, selector)
    except Exception:  # dkimpy's MessageFormatError/ValidationError and anything else it raises
        return Identifier("dkim", "permerror", domain, selector)
    return Identifier("dkim", "pass" if ok else "fail", domain, selector)


def _domain_and_selector(raw: bytes) -> tuple[str, str]:
    """``d=`` (lower-case) and ``s=`` of a signature, empty when unreadable."""
    try:
        tags = parse_tag_value(raw)
    except (InvalidTagValueList, ValueError, IndexError):
        return "", ""
    domain = tags.get(b"d", b"").decode("ascii", "replace").strip().lower().rstrip(".")
    selector = tags.get(b"s", b"").decode("ascii", "replace").strip()
    return domain, selector
