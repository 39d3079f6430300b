"""A verdict's reason text → one of a small fixed set of reason classes (a metrics label).

The reason texts carry outside data (domains, DNS errors, certificate errors), so they can never
be a label value; the class can. The classes follow the result table in docs/design.md. A text
this module does not know (a future reason, a bug) is ``none_other``, never an exception.
"""

from __future__ import annotations

import re

from mtls_milter.core.evaluate import Result

OK = "ok"
REASON_CLASSES = frozenset(
    {
        OK,
        "no_tls",
        "no_cert",
        "untrusted",
        "chain_invalid",
        "name_mismatch",
        "null_cmx",
        "not_opted_in",
        "no_domain",
        "dns",
        "internal",
        "none_other",
    }
)

# The MAIL FROM domain is a normalized host name: no spaces, so `\S+` takes it as a whole.
_NOT_PUBLISHED = re.compile(r"\S+ does not publish Client MX(;|$)")
_NULL_CMX = re.compile(r"\S+ publishes a null Client MX:")

# fail reasons by prefix. Postfix says nothing about a certificate it did not verify, so "no
# client certificate verified by the MTA" may also be an untrusted one: it counts as no_cert.
_FAIL_PREFIXES = (
    ("no TLS", "no_tls"),
    ("chain invalid:", "chain_invalid"),
    ("no client certificate", "no_cert"),
    ("certificate not trusted by the MTA", "untrusted"),
    ("no certificate name matches", "name_mismatch"),
    ("the certificate has no usable host name", "name_mismatch"),
    ("the MTA-verified certificate has no usable CN", "name_mismatch"),
)
_NO_DOMAIN_PREFIXES = ("MAIL FROM has no domain", "MAIL FROM domain ", "null sender")
# The pre-forked workers' policy table (inbound/shared_sessions.py) not answering is ours too.
_INTERNAL_PREFIXES = ("internal error", "policy table unavailable")
_DNS_PREFIXES = ("Client MX lookup ", "MX lookup failed:", "Client MX unusable:")


def reason_class(result: Result | str, reason: str) -> str:
    """The reason class of a verdict's ``result`` and ``reason``; pass is ``ok``."""
    value = result.value if isinstance(result, Result) else result
    if value == "pass":
        return OK
    if reason.startswith(_INTERNAL_PREFIXES) and value == "temperror":
        return "internal"
    if value in ("temperror", "permerror"):
        return "dns" if reason.startswith(_DNS_PREFIXES) else "none_other"
    if value == "none":
        return _none_class(reason)
    if value == "fail":
        return _fail_class(reason)
    return "none_other"


def _none_class(reason: str) -> str:
    if _NOT_PUBLISHED.match(reason):
        return "not_opted_in"
    if reason.startswith(_NO_DOMAIN_PREFIXES):
        return "no_domain"
    return "none_other"


def _fail_class(reason: str) -> str:
    if _NULL_CMX.match(reason):
        return "null_cmx"
    for prefix, cls in _FAIL_PREFIXES:
        if reason.startswith(prefix):
            return cls
    return "none_other"
