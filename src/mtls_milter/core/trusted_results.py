"""``"trusted-results"`` inputs: spf= and dkim= from Authentication-Results fields of trusted hosts.

Only fields whose authserv-id (lower-case, a "/jobid" suffix cut, an IDN as A-labels) is one of
the configured trusted ids count; every other field is ignored, whatever it claims. A field
authres cannot parse, or longer than the header module's parse bound, is ignored too. SPF gives
the ``smtp.mailfrom`` domain (the part after the last "@" when it is an address); DKIM gives
``header.d`` (and ``header.s``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import authres

from mtls_milter.core.dmarc import Identifier
from mtls_milter.core.header import MAX_PARSE_LEN, sanitize_authserv_id

__all__ = ["MAX_TRUSTED_RESULTS", "trusted_identifiers"]

MAX_TRUSTED_RESULTS = 10


def trusted_identifiers(
    values: Sequence[str], trusted_ids: Iterable[str], methods: frozenset[str]
) -> tuple[Identifier, ...]:
    """The spf/dkim (as in ``methods``) results of the fields from ``trusted_ids``."""
    trusted = {sanitize_authserv_id(t) for t in trusted_ids}
    found: list[Identifier] = []
    for value in values:
        if len(value) > MAX_PARSE_LEN:
            continue
        try:
            header = authres.AuthenticationResultsHeader.parse_value(value)
        except Exception:  # authres raises several types on malformed fields
            continue
        authserv_id = sanitize_authserv_id(str(header.authserv_id).split("/", 1)[0])
        if authserv_id not in trusted:
            continue
        for result in header.results:
            ident = _identifier(result, methods)
            if ident is not None:
                found.append(ident)
        if len(found) >= MAX_TRUSTED_RESULTS:
            break
    return tuple(found[:MAX_TRUSTED_RESULTS])


def _identifier(result: Any, methods: frozenset[str]) -> Identifier | None:
    method = str(result.method).lower()
    if method not in methods:
        return None
    props = {(str(p.type).lower(), str(p.name).lower()): str(p.value) for p in result.properties}
    if method == "spf":
        domain = props.get(("smtp", "mailfrom"), "").rsplit("@", 1)[-1]
        return Identifier("spf", str(result.result).lower(), domain.strip().lower().rstrip("."))
    domain = props.get(("header", "d"), "") or props.get(("header", "i"), "").rsplit("@", 1)[-1]
    selector = props.get(("header", "s"), "")
    return Identifier("dkim", str(result.result).lower(), domain.strip().lower(), selector)
