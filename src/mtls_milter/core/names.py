"""Envelope sender parsing and the one host-name normalization of the product.

Every host name the product compares or writes (MAIL FROM and HELO domains, certificate names,
Client MX and MX exchange names, the authserv-id) goes through :func:`normalize_host`: a
lower-case A-label name without the trailing dot, a non-ASCII name mapped by UTS #46 and
encoded by IDNA 2008. A name therefore compares equal however a client, a certificate or a zone
spells it: ``faß.de`` is ``xn--fa-hia.de`` everywhere, never the IDNA 2003 ``fass.de``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import idna

from mtls_milter.core.quote import clip, quote
from mtls_milter.errors import InputError

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
# UTS #46 maps some characters to nothing (soft hyphens), so a longer spelling may still be a
# short name; beyond this a spelling is refused before IDNA sees it.
_MAX_SPELLING = 4 * MAX_NAME_LENGTH
_LDH_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_UNDERSCORE_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_LABELS = {False: re.compile(_LDH_LABEL), True: re.compile(_UNDERSCORE_LABEL)}
# The fast whole-name check; _is_host adds the hyphen rule (no label starts or ends with "-").
_NAMES = {
    False: re.compile(r"[a-z0-9-]{1,63}(?:\.[a-z0-9-]{1,63})*"),
    True: re.compile(r"[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*"),
}


def normalize_host(name: str, *, underscores: bool = False) -> str:
    """``name`` as a lower-case A-label host name without the trailing dot.

    A non-ASCII name goes through UTS #46 and IDNA 2008; ``xn--`` labels must be valid
    A-labels. ``underscores`` tolerates ``_`` in labels (some private PKIs put it in
    certificate names). Raises :class:`InputError`, quoting at most 200 characters of ``name``.
    """
    if len(name) > _MAX_SPELLING:
        raise InputError(f"name longer than {MAX_NAME_LENGTH} characters ({len(name)})")
    text = name[:-1] if name.endswith(".") else name
    if not text:
        raise InputError("empty name")
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            raise InputError(
                f"invalid internationalized name {quote(text)}: {_idna_why(exc)}"
            ) from None
    text = text.lower()
    if not _is_host(text, underscores):
        raise InputError(_why_not_a_host(text, underscores))
    if "xn--" in text:
        _check_a_labels(text)
    return text


def _is_host(text: str, underscores: bool) -> bool:
    """Is lower-case ``text`` a host name (labels of 1-63 LDH characters, at most 253 in all)?"""
    return (
        len(text) <= MAX_NAME_LENGTH
        and _NAMES[underscores].fullmatch(text) is not None
        and text[0] != "-"
        and text[-1] != "-"
        and ".-" not in text
        and "-." not in text
    )


def _check_a_labels(text: str) -> None:
    for label in text.split("."):
        if label.startswith("xn--"):
            try:
                idna.ulabel(label)
            except (idna.IDNAError, UnicodeError, ValueError) as exc:
                raise InputError(f"invalid A-label {quote(label)}: {clip(str(exc), 100)}") from None


_QUOTED_LABEL = re.compile(r""" (?:of|in) (?:'.*?'|".*?")(?=\s|$)""", re.DOTALL)


def _idna_why(exc: Exception) -> str:
    """idna's explanation without the label it repeats (the caller quotes it once)."""
    return clip(_QUOTED_LABEL.sub("", str(exc)), 100)


def _why_not_a_host(text: str, underscores: bool) -> str:
    if len(text) > MAX_NAME_LENGTH:
        return f"name longer than {MAX_NAME_LENGTH} characters ({len(text)})"
    for label in text.split("."):
        if not label:
            return f"empty label in {quote(text)}"
        if len(label) > MAX_LABEL_LENGTH:
            return f"label longer than {MAX_LABEL_LENGTH} characters in {quote(text)}"
        if not _LABELS[underscores].fullmatch(label):
            return f"invalid label {quote(label)}"
    return f"not a host name: {quote(text)}"  # unreachable: some label must be at fault


def normalize_domain(text: str) -> str:
    """A domain as protocol text spells it (blanks around it ignored), by :func:`normalize_host`."""
    return normalize_host(text.strip())


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
