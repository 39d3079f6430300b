"""Envelope sender parsing and domain-name normalization.

Every name the core compares is a lower-case A-label without the trailing dot (SPEC §2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import idna

_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_NAME_LENGTH = 253


class SenderKind(StrEnum):
    """What kind of envelope sender a MAIL FROM carries."""

    NULL = "null"  # MAIL FROM:<> (bounces, DSNs)
    DOMAIN = "domain"  # a usable domain
    UNUSABLE = "unusable"  # no domain, an address literal, or a malformed domain


@dataclass(frozen=True, slots=True)
class Sender:
    """The parsed envelope sender: its kind, its normalized domain and, if unusable, why."""

    kind: SenderKind
    domain: str = ""
    problem: str = ""


def normalize_domain(text: str) -> str:
    """Return ``text`` as a lower-case A-label without the trailing dot; ValueError if invalid."""
    name = text.strip()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("empty domain")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise ValueError(f"invalid internationalized domain: {exc}") from None
    name = name.lower()
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"domain longer than {MAX_NAME_LENGTH} characters")
    for label in name.split("."):
        if not _LDH_LABEL.fullmatch(label):
            raise ValueError(f"invalid label {label[:70]!r}")
    return name


def parse_mail_from(raw: str) -> Sender:
    """Parse a MAIL FROM argument as a milter or the CLI sees it (with or without ``<>``).

    Handles the null sender, quoted local parts containing ``@``, RFC 5321 source routes
    (``<@relay:user@domain>``), trailing dots, upper case and UTF-8 (SMTPUTF8) domains.
    """
    address = raw.strip()
    if address.startswith("<"):
        address = address[1:].rsplit(">", 1)[0] if ">" in address else address[1:]
    address = address.strip()
    if not address:
        return Sender(SenderKind.NULL)
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]  # source route: the mailbox follows the colon
    at = _last_unquoted_at(address)
    if at < 0:
        return Sender(SenderKind.UNUSABLE, problem="MAIL FROM has no domain")
    domain = address[at + 1 :]
    if domain.startswith("["):
        return Sender(SenderKind.UNUSABLE, problem="MAIL FROM domain is an address literal")
    try:
        return Sender(SenderKind.DOMAIN, domain=normalize_domain(domain))
    except ValueError as exc:
        return Sender(SenderKind.UNUSABLE, problem=f"MAIL FROM domain is invalid: {exc}")


def _last_unquoted_at(address: str) -> int:
    """Index of the ``@`` that separates local part and domain, ignoring quoted ones."""
    in_quotes = escaped = False
    position = -1
    for index, char in enumerate(address):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == "@" and not in_quotes:
            position = index
    return position
