"""What the core asks of DNS: lookup result types, the resolver protocol, the query-name guard.

The network resolver (:class:`mtls_milter.net.dns.DnsResolver`) implements :class:`MxResolver`;
the core and the tests depend only on this module, so any resolver can be injected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from mtls_milter.core.names import normalize_host
from mtls_milter.core.quote import quote


class LookupStatus(StrEnum):
    """Outcome class of one lookup."""

    OK = "ok"  # hosts found (hosts may be empty only when null=True)
    NOT_FOUND = "not-found"  # NXDOMAIN or NODATA (detail says which)
    TEMPFAIL = "tempfail"  # SERVFAIL, REFUSED, timeout, network error, budget exhausted
    PERMFAIL = "permfail"  # malformed rdata, > MAX_HOSTS Client MX names, bad/too long name


@dataclass(frozen=True, slots=True)
class HostLookup:
    """Result of a Client MX or Server MX lookup."""

    status: LookupStatus
    hosts: tuple[str, ...] = ()  # lower-case, no trailing dot, by preference then name, unique
    null: bool = False  # RFC 7505 null (Client) MX: a single record "0 ." -> hosts=()
    implicit: bool = False  # server MX only: no MX but A/AAAA exists -> hosts=(domain,)
    detail: str = ""
    ttl: int | None = None  # seconds, of the answer as received (capped); None: unknown


@dataclass(frozen=True, slots=True)
class AddressLookup:
    """Result of an address lookup: A records, then AAAA records."""

    status: LookupStatus
    addresses: tuple[str, ...] = ()
    detail: str = ""


class MxResolver(Protocol):
    """What the core needs from DNS. ``budget`` is the seconds left for the message."""

    def client_mx(self, domain: str, budget: float) -> HostLookup: ...

    def server_mx(self, domain: str, budget: float) -> HostLookup: ...

    def addresses(self, host: str, budget: float) -> AddressLookup: ...

    def cached_client_mx(self, domain: str) -> HostLookup | None: ...


@dataclass(frozen=True, slots=True)
class TxtLookup:
    """Result of a TXT lookup: each record's character-strings joined, as raw bytes."""

    status: LookupStatus
    records: tuple[bytes, ...] = ()
    detail: str = ""


class TxtResolver(Protocol):
    """TXT lookups (DMARC policy records, DKIM keys, SPF records), inside the same budget."""

    def txt(self, name: str, budget: float) -> TxtLookup: ...


# A label: 1-63 printable ASCII characters other than "." and "\\" (which would need escapes).
_LABEL = r"[!-\-/-\[\]-~]{1,63}"
_VALID_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")


def query_name(domain: str) -> str:
    """Return ``domain`` as a lower-case A-label without trailing dot; ValueError if invalid.

    Callers pass names already normalized by :func:`mtls_milter.core.names.normalize_domain`;
    this is the resolver's own, more permissive guard (any name DNS can carry without
    escapes), converting a stray non-ASCII name with IDNA rather than querying garbage.
    """
    name = domain[:-1] if domain.endswith(".") else domain
    if not name.isascii():
        # The product's one IDN rule (UTS #46 + IDNA 2008), not dnspython's IDNA 2003 default:
        # "faß.example" must be looked up as the name a certificate would carry for it.
        name = normalize_host(name, underscores=True)
    name = name.lower()
    if len(name) <= 253 and _VALID_NAME.fullmatch(name):
        return name  # the fast path of every warm lookup: one regex, no loop
    if not name:
        raise ValueError("empty domain name")
    if len(name) > 253:
        raise ValueError(f"domain name longer than 253 characters ({len(name)})")
    for label in name.split("."):
        if not label:
            raise ValueError(f"{quote(name)} has an empty label")
        if len(label) > 63:
            raise ValueError(f"{quote(name)} has a label longer than 63 characters")
    raise ValueError(f"{quote(name)} contains characters not allowed in a host name")


def lookup_group(name: str) -> str:
    """The domain group whose lookups share a cap on queries in flight: roughly the
    registered domain, without a public suffix list.

    The last two labels ("mail.example.com" → "example.com"), or the last three under a
    two-letter top-level domain whose second label has at most three characters, the common
    shape of a public second level ("a.example.co.uk" → "example.co.uk"). Erring towards a
    longer group only makes the cap looser; a shorter one would make unrelated senders share
    it. ``name`` is a :func:`query_name`; any string gives a suffix of it, never an error.
    """
    labels = name.rsplit(".", 3)
    if len(labels) >= 3 and len(labels[-1]) == 2 and len(labels[-2]) <= 3:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])
