"""The author domain(s) of a message: the domains of the RFC 5322 From field's addresses.

Outside input, so every case has a defined result and nothing raises:

- no From field, or a From field without any address (an empty field, an empty group
  ``undisclosed:;``) → ``NONE`` with a reason (DMARC has no domain to evaluate);
- an address whose domain is not a valid host name (an encoded word, non-UTF-8 bytes, a literal
  ``[192.0.2.1]``) → ``PERMERROR``;
- more than :data:`MAX_ADDRESSES` addresses or :data:`MAX_DOMAINS` distinct domains →
  ``PERMERROR`` (each domain costs a policy lookup);
- otherwise ``OK`` with the distinct domains in order of appearance; group syntax contributes the
  group's members. Several From fields are read as one list (the caller decides about them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.headerregistry import HeaderRegistry
from enum import StrEnum

from mtls_milter.core.names import normalize_domain
from mtls_milter.core.quote import quote
from mtls_milter.errors import InputError

__all__ = ["MAX_ADDRESSES", "MAX_DOMAINS", "Author", "AuthorStatus", "author_domains"]

MAX_ADDRESSES = 100
MAX_DOMAINS = 5
MAX_FIELD_LEN = 16384

# The shapes nearly every From field has: "Name <local@domain>" or "local@domain". Anything
# else (comments, groups, quoted local parts, encoded words) goes to the full RFC 5322 parser.
_SIMPLE = re.compile(
    r'\s*(?:(?:"[^"\\\r\n]*"|[^<>"@,;:()\\\r\n]*)\s*<([^<>@\s,;:()"\\]+)@([A-Za-z0-9.-]+)>'
    r'|([^<>@\s,;:()"\\]+)@([A-Za-z0-9.-]+))\s*'
)
_REGISTRY = HeaderRegistry()


class AuthorStatus(StrEnum):
    """Outcome of reading the From field(s)."""

    OK = "ok"
    NONE = "none"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class Author:
    """The distinct author domains (lower-case A-labels), or why there are none."""

    status: AuthorStatus
    domains: tuple[str, ...] = ()
    reason: str = ""


def author_domains(fields: list[str | bytes]) -> Author:
    """The author domains of the From field values ``fields`` (raw, unfolded or not)."""
    if not fields:
        return Author(AuthorStatus.NONE, reason="no From header field")
    raw_domains: list[str] = []
    for field in fields:
        text = _text(field)
        if len(text) > MAX_FIELD_LEN:
            return Author(AuthorStatus.PERMERROR, reason=f"From field longer than {MAX_FIELD_LEN}")
        found = _simple_domain(text)
        if found is None:
            try:
                found_list = _parsed_domains(text)
            except InputError as exc:
                return Author(AuthorStatus.PERMERROR, reason=str(exc))
            raw_domains.extend(found_list)
        else:
            raw_domains.append(found)
        if len(raw_domains) > MAX_ADDRESSES:
            return Author(
                AuthorStatus.PERMERROR,
                reason=f"From field with more than {MAX_ADDRESSES} addresses",
            )
    if not raw_domains:
        return Author(AuthorStatus.NONE, reason="From header field without an address")
    return _normalized(raw_domains)


def _text(field: str | bytes) -> str:
    if isinstance(field, bytes):
        # Not UTF-8 → lone surrogates, which the domain check below rejects.
        return field.decode("utf-8", errors="surrogateescape")
    return field


def _simple_domain(text: str) -> str | None:
    match = _SIMPLE.fullmatch(text)
    if match is None:
        return None
    return match.group(2) or match.group(4)


def _parsed_domains(text: str) -> list[str]:
    """Domains of every address by the stdlib RFC 5322 parser; InputError when unusable."""
    try:
        header = _REGISTRY("From", text.replace("\r", "").replace("\n", " "))
        addresses = header.addresses  # type: ignore[attr-defined]
    except Exception as exc:  # the stdlib parser raises several types on hostile input
        raise InputError(f"From field not parseable: {type(exc).__name__}") from None
    domains: list[str] = []
    for address in addresses[: MAX_ADDRESSES + 1]:
        if not address.username and not address.domain:
            continue
        if not address.domain:
            raise InputError(f"From address without a domain: {quote(address.username, 60)}")
        if address.domain not in text:  # decoded from an encoded word: RFC 2047 forbids that
            raise InputError(f"author domain {quote(address.domain, 80)} invalid (encoded word)")
        domains.append(address.domain)
    return domains


def _normalized(raw_domains: list[str]) -> Author:
    domains: list[str] = []
    for raw in raw_domains:
        if "=?" in raw or raw.startswith("["):
            return Author(AuthorStatus.PERMERROR, reason=f"author domain {quote(raw, 80)} invalid")
        try:
            domain = normalize_domain(raw)
        except InputError as exc:
            return Author(AuthorStatus.PERMERROR, reason=f"author domain invalid: {exc}")
        if domain not in domains:
            domains.append(domain)
    if len(domains) > MAX_DOMAINS:
        return Author(
            AuthorStatus.PERMERROR, reason=f"From field with more than {MAX_DOMAINS} domains"
        )
    return Author(AuthorStatus.OK, tuple(domains))
