"""The ``Authentication-Results`` field (RFC 8601) with method ``mtls``: rendering, forgery removal.

Rendering always sanitizes every part, so whatever the inputs the output is one line of
printable ASCII that `authres` (and so OpenDMARC/OpenARC-like consumers) can parse.  Only the
registered ptype ``smtp`` is used; detail goes into one comment.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import authres

from mtls_milter.core.names import normalize_host
from mtls_milter.errors import InputError

__all__ = [
    "HEADER_NAME",
    "RESULTS",
    "MethodResult",
    "MtlsField",
    "fields_to_delete",
    "render_field",
    "render_folded",
    "render_value",
    "sanitize_authserv_id",
    "sanitize_comment",
    "sanitize_reason",
]

HEADER_NAME = "Authentication-Results"
METHOD = "mtls"
RESULTS = frozenset({"pass", "fail", "none", "temperror", "permerror"})
PTYPE_PROPERTIES = frozenset({"mailfrom", "helo"})
# The further methods our field may carry (RFC 8601 §2.7 result names; dmarc: RFC 9989) and the
# properties we write for them.
METHOD_RESULTS = {
    "spf": frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"}),
    "dkim": frozenset({"pass", "fail", "neutral", "policy", "none", "temperror", "permerror"}),
    "dmarc": RESULTS,
}
METHOD_PROPERTIES = frozenset({"smtp.mailfrom", "header.d", "header.s", "header.from"})
OUR_METHODS = frozenset({METHOD, *METHOD_RESULTS})

COMMENT_MAX_LEN = 200
"""Bound of one sanitized comment part."""
COMMENT_TOTAL_MAX_LEN = 400
"""Bound of the whole rendered comment (parts joined with "; ")."""
REASON_MAX_LEN = 200
AUTHSERV_ID_MAX_LEN = 255
VALUE_MAX_LEN = 255
MAX_PARSED_FIELDS = 50
"""Fields claiming our authserv-id that authres parses per message (each parse ~110 µs); later
ones are judged by a lexical ``method=`` test instead."""
MAX_PARSE_LEN = 8192
"""Values claiming our authserv-id that are longer are not given to authres (its parser is
quadratic); they are treated as unparseable, i.e. deleted as forged."""

_ELLIPSIS = "..."
_PREFIX = HEADER_NAME + ": "
_WS_RUN = re.compile(r"\s+")
# Characters in both an RFC 2045 token and an RFC 5322 dot-atom (authres parses the
# authserv-id as a dot-atom): atext minus "/", "=", "?".
_AUTHSERV_CHAR = re.compile(r"[A-Za-z0-9!#$%&'*+^_`{|}~.-]")
_DOTS = re.compile(r"\.{2,}")
# A domain name rendered unquoted; anything else becomes a quoted-string (authres rejects e.g.
# an unquoted "@.x" since a leading "@" must be followed by a dot-atom).
_DOMAIN_VALUE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")


@dataclass(frozen=True, slots=True)
class MtlsField:
    """One ``mtls`` result: ``authserv-id; mtls=result [reason=".."] [(comment)] [smtp.p=value]``.

    ``reason`` is rendered for every result but ``pass`` when non-empty; ``comment`` parts are
    joined with "; " in one comment; an empty ``value`` omits the property (null sender).
    Raises ValueError for a result or property outside the RFC 8601 vocabulary we use.
    """

    authserv_id: str
    result: str
    reason: str = ""
    comment: tuple[str, ...] = ()
    ptype_property: str = "mailfrom"
    value: str = ""
    more: tuple[MethodResult, ...] = ()  # spf, dkim, dmarc results, each after a ";"

    def __post_init__(self) -> None:
        if self.result not in RESULTS:
            raise ValueError(f"invalid mtls result {self.result!r}")
        if self.ptype_property not in PTYPE_PROPERTIES:
            raise ValueError(f"invalid smtp property {self.ptype_property!r}")


@dataclass(frozen=True, slots=True)
class MethodResult:
    """A further result in our field, after ``mtls``: ``method=result [(comment)] props``.

    Raises ValueError for a method, result or property outside the vocabulary above.
    """

    method: str
    result: str
    comment: str = ""
    properties: tuple[tuple[str, str], ...] = ()  # (ptype.property, value); empty values omitted

    def __post_init__(self) -> None:
        if self.result not in METHOD_RESULTS.get(self.method, ()):
            raise ValueError(f"invalid {self.method!r} result {self.result!r}")
        if any(name not in METHOD_PROPERTIES for name, _ in self.properties):
            raise ValueError(f"invalid property in {self.properties!r}")


# --- sanitizing --------------------------------------------------------------------------------


_CLEAN_ASCII = re.compile(r"[ -~]*")


def _printable(text: str, replacements: dict[str, str]) -> str:
    """Map whitespace (incl. CR/LF) to " ", apply ``replacements``, non-printable-ASCII to "?"."""
    if _CLEAN_ASCII.fullmatch(text):  # the common case: names and reasons we wrote ourselves
        for old, new in replacements.items():
            text = text.replace(old, new)
        return _WS_RUN.sub(" ", text).strip()
    out: list[str] = []
    for ch in text:
        if ch in replacements:
            out.append(replacements[ch])
        elif ch.isspace():
            out.append(" ")
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    return _WS_RUN.sub(" ", "".join(out)).strip()


def _bound(text: str, max_len: int) -> str:
    if len(text) <= max_len:
        return text
    return text[: max_len - len(_ELLIPSIS)].rstrip() + _ELLIPSIS


_COMMENT_MAP = {"(": "[", ")": "]", "\\": "?", '"': "'"}
_REASON_MAP = {"\\": "?", '"': "'"}


def _clean(text: str, replacements: dict[str, str], max_len: int) -> str:
    """Return ``_printable`` of ``text`` bounded to ``max_len`` (huge inputs are cut first)."""
    limit = max_len * 8
    cleaned = _printable(text[:limit], replacements)
    if len(text) > limit and len(cleaned) <= max_len:
        cleaned = cleaned[: max_len - len(_ELLIPSIS)].rstrip() + _ELLIPSIS
    return _bound(cleaned, max_len)


def sanitize_comment(text: str, max_len: int = COMMENT_MAX_LEN) -> str:
    """Return comment content: printable ASCII (others "?"), whitespace and CR/LF collapsed to
    single spaces, "(" ")" replaced by "[" "]" (so the comment stays balanced), backslash by
    "?", '"' by "'", at most ``max_len`` characters (ending "..." when cut)."""
    return _clean(text, _COMMENT_MAP, max_len)


def sanitize_reason(text: str, max_len: int = REASON_MAX_LEN) -> str:
    """Return quoted-string content: printable ASCII (others "?"), whitespace and CR/LF
    collapsed, '"' replaced by "'", backslash by "?", at most ``max_len`` characters."""
    return _clean(text, _REASON_MAP, max_len)


def sanitize_authserv_id(text: str) -> str:
    """Return a safe authserv-id: lower-case, an IDN as A-labels.

    A host name (the usual authserv-id) is normalized like every other name
    (:func:`~mtls_milter.core.names.normalize_host`: ``MX.Exämple.NET`` gives
    ``mx.xn--exmple-cua.net``). Anything else is restricted to what authres accepts (it parses
    an RFC 5322 dot-atom): characters outside ``[A-Za-z0-9!#$%&'*+^_`{|}~.-]`` (whitespace,
    "/", non-ASCII, ...) are dropped, runs of dots collapsed, leading/trailing dots removed,
    length bounded to 255, the result lower-cased. If nothing is left it is ``localhost``.
    """
    try:
        return normalize_host(text.strip(), underscores=True)
    except InputError:
        pass
    kept = "".join(_AUTHSERV_CHAR.findall(text[: AUTHSERV_ID_MAX_LEN * 8]))
    kept = _DOTS.sub(".", kept).strip(".")
    kept = kept[:AUTHSERV_ID_MAX_LEN].rstrip(".")
    return kept.lower() or "localhost"


def _render_pvalue(value: str) -> str:
    """Return the property value: a domain normalized (U-labels as A-labels), else a
    quoted-string."""
    value = value.strip()
    if value and not value.isascii():
        with contextlib.suppress(InputError):
            value = normalize_host(value)
    if len(value) <= VALUE_MAX_LEN and _DOMAIN_VALUE.fullmatch(value):
        return value
    return '"' + sanitize_reason(value, VALUE_MAX_LEN) + '"'


# --- rendering ---------------------------------------------------------------------------------


def _tokens(field: MtlsField) -> list[str]:
    """Return the value's tokens; joined with single spaces they give ``render_value``."""
    tokens = [sanitize_authserv_id(field.authserv_id) + ";", f"{METHOD}={field.result}"]
    if field.result != "pass":
        reason = sanitize_reason(field.reason)
        if reason:  # authres rejects reason="" ("Expected reason")
            tokens.append(f'reason="{reason}"')
    _add_comment(tokens, field.comment)
    if field.value.strip():
        tokens.append(f"smtp.{field.ptype_property}={_render_pvalue(field.value)}")
    for more in field.more:
        tokens[-1] += ";"
        tokens.append(f"{more.method}={more.result}")
        _add_comment(tokens, (more.comment,))
        rendered = ((name, _render_pvalue(value)) for name, value in more.properties)
        # An empty value is left out: authres cannot parse header.d="" before another property.
        tokens.extend(f"{name}={value}" for name, value in rendered if value != '""')
    return tokens


def _add_comment(tokens: list[str], parts_in: tuple[str, ...]) -> None:
    parts = [p for p in (sanitize_comment(c) for c in parts_in) if p]
    comment = _bound("; ".join(parts), COMMENT_TOTAL_MAX_LEN)
    if comment:
        words = comment.split(" ")
        words[0] = "(" + words[0]
        words[-1] += ")"
        tokens.extend(words)


def render_value(field: MtlsField) -> str:
    """Return the field value on one line, e.g.
    ``mx.example.net; mtls=pass (evidence=chain) smtp.mailfrom=sender.example``."""
    return " ".join(_tokens(field))


def render_folded(field: MtlsField, width: int = 78) -> str:
    """Return ``render_value`` folded with "\\n\\t" between tokens (never inside a quoted
    string) so that every line, the first one prefixed by "Authentication-Results: ", stays
    within ``width`` where possible; a token longer than the width is left unbroken."""
    lines: list[str] = []
    line = ""
    budget = width - len(_PREFIX)
    for token in _tokens(field):
        if not line:
            line = token
        elif len(line) + 1 + len(token) <= budget:
            line += " " + token
        else:
            lines.append(line)
            line = token
            budget = width - 1  # the leading tab
    lines.append(line)
    return "\n\t".join(lines)


def render_field(field: MtlsField) -> str:
    """Return the whole field on one line: ``Authentication-Results: <render_value>``."""
    return _PREFIX + render_value(field)


# --- forged field removal ----------------------------------------------------------------------


def _skip_cfws(value: str, pos: int) -> int:
    """Return the index after whitespace and (nested) comments from ``pos``; -1 if unbalanced."""
    depth = 0
    n = len(value)
    while pos < n:
        ch = value[pos]
        if depth:
            if ch == "\\":
                pos += 1
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
        elif ch == "(":
            depth = 1
        elif not ch.isspace():
            return pos
        pos += 1
    return -1 if depth else pos


def _claimed_authserv_id(value: str) -> str | None:
    """Return the authserv-id a field value claims (first token after leading CFWS, or a
    quoted-string's content), without a "/jobid" suffix, normalized like ours (lower-case, an
    IDN as A-labels); None if none.

    Where authres parses a value, this equals its ``authserv_id`` (before the "/" cut)."""
    pos = _skip_cfws(value, 0)
    if pos < 0 or pos >= len(value):
        return None
    if value[pos] == '"':
        chars: list[str] = []
        pos += 1
        while pos < len(value) and value[pos] != '"':
            if value[pos] == "\\":
                pos += 1
            if pos < len(value):
                chars.append(value[pos])
            pos += 1
        if pos >= len(value):
            return None
        token = "".join(chars).strip()
    else:
        end = pos
        while end < len(value) and value[end] not in ";(" and not value[end].isspace():
            end += 1
        token = value[pos:end]
    token = token.split("/", 1)[0]
    try:  # a host name in any spelling (upper case, U-labels) compares as ours does
        return normalize_host(token, underscores=True)
    except InputError:
        return token.lower() or None


def _carries_ours(value: str, methods: frozenset[str]) -> bool:
    """Return whether authres finds a result of one of ``methods``; raises if it cannot parse."""
    header = authres.AuthenticationResultsHeader.parse_value(value)
    return any(str(result.method).lower() in methods for result in header.results)


def _should_delete(value: str, delete_all_ours: bool, methods: frozenset[str], parse: bool) -> bool:
    """For a field claiming our id: delete it when it carries a result of ours (authres's
    parse; past the parse bound a lexical ``method=`` test, which errs towards deleting)."""
    if delete_all_ours or len(value) > MAX_PARSE_LEN:
        return True
    if not parse:
        return any(_method_pattern(m).search(value) for m in methods)
    try:
        return _carries_ours(value, methods)
    except Exception:  # malformed (or too deep) yet claiming us: forged
        return True


@functools.lru_cache(maxsize=32)
def _method_pattern(method: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w.-]){re.escape(method)}\s*=", re.IGNORECASE)


def _may_claim(value: str, our_id: str) -> bool:
    """False when ``value`` cannot claim ``our_id``: plain ASCII without a quoted string that
    does not contain it (the claimed id is then a lower-cased substring). A cheap test before
    the tokenizer: most fields are other hosts' results."""
    if not our_id.isascii() or not value.isascii() or '"' in value:
        return True
    return our_id in value.lower()


def fields_to_delete(
    values: Sequence[str],
    authserv_id: str,
    *,
    delete_all_ours: bool = False,
    methods: frozenset[str] = frozenset({METHOD}),
) -> list[int]:
    """Return the 1-based indexes (descending) of the ``Authentication-Results`` fields to delete.

    ``values`` are the existing fields' values in the order the MTA presents them.  A field is
    deleted when its authserv-id (lower-cased, a "/jobid" suffix cut) equals ours (sanitized,
    lower-cased) and either ``delete_all_ours`` or it carries a result of one of ``methods`` (the
    methods we write: ``mtls``, and with DMARC on ``dmarc`` and the ones verified here) per
    authres.
    A field claiming our id that authres cannot parse, or longer than MAX_PARSE_LEN, is
    deleted as forged; past the first MAX_PARSED_FIELDS fields claiming our id the rest are not
    parsed (a message cannot make us parse without end) but deleted when any of ``methods``
    appears as ``method=`` in them; other fields are left alone.
    Never raises: an internal error keeps the field.
    """
    our_id = sanitize_authserv_id(authserv_id).lower()
    indexes: list[int] = []
    claims = 0  # fields claiming our id so far: each costs a parse (~110 µs)
    for index, value in enumerate(values, start=1):
        try:
            if not _may_claim(value, our_id) or _claimed_authserv_id(value) != our_id:
                continue
            claims += 1
            parse = claims <= MAX_PARSED_FIELDS
            if _should_delete(value, delete_all_ours, methods, parse):
                indexes.append(index)
        except Exception:  # never raise; keep the field
            continue
    indexes.reverse()
    return indexes
