"""Properties of the MTA macro decoding (core/evidence.py): any macros give a TlsSession.

Postfix's and Sendmail's macros are outside input relayed by the MTA: a client controls part of
them (certificate subject, issuer), an MTA misconfiguration the rest. Any combination of
values - not sent (None), sent empty, arbitrary text - must decode without an exception, and
what the session carries on must be canonical or empty.
"""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mtls_milter.core.certs import normalize_fingerprint
from mtls_milter.core.evidence import (
    NO_TLS,
    CertPresence,
    TlsSession,
    mta_evidence,
    normalize_md5,
    session_from_macros,
    with_fingerprint,
    xtext_decode,
)
from mtls_milter.core.quote import MAX_QUOTE

SETTINGS = settings(max_examples=150, deadline=None)

MACRO_NAMES = (
    "{tls_version}",
    "{cipher}",
    "{cert_subject}",
    "{cert_issuer}",
    "{verify}",
    "{cn_subject}",
    "{cn_issuer}",
    "{cert_fp}",
    "{cert_md5}",
    "j",
)
CN = re.compile(r"[a-z0-9*_-]+(?:\.[a-z0-9*_-]+)*")
SHA256 = re.compile(r"[0-9A-F]{2}(?::[0-9A-F]{2}){31}")
MD5 = re.compile(r"[0-9A-F]{2}(?::[0-9A-F]{2}){15}")
PRINTABLE = re.compile(r"[ -~]*")
NOTE_OVERHEAD = 40  # the fixed words of a note around its quote

hex_fp = st.binary(min_size=32, max_size=32).map(lambda b: b.hex(":"))
macro_value = st.one_of(
    st.none(),
    st.just(""),
    st.text(max_size=200),
    st.sampled_from(["OK", "NO", "NONE", "FAIL", "TLSv1.3", "BadCertificate1", "ok "]),
    st.from_regex(r"[A-Za-z0-9.+-]{1,40}", fullmatch=True),
    hex_fp,
    hex_fp.map(lambda s: s.replace(":", "").lower()),
    st.binary(min_size=16, max_size=16).map(lambda b: b.hex(":")),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "+41", "\x00"]), st.integers(0, 3000)),
)
macros = st.dictionaries(st.sampled_from(MACRO_NAMES), macro_value)


def assert_canonical(session: TlsSession) -> None:
    cn = session.mta_cn
    assert cn == "" or (CN.fullmatch(cn) and len(cn) <= 253), cn
    assert all(len(label) <= 63 for label in cn.split("."))
    assert not cn.startswith("badcertificate")
    assert session.fingerprint == "" or SHA256.fullmatch(session.fingerprint)
    assert session.fingerprint_md5 == "" or MD5.fullmatch(session.fingerprint_md5)
    if not session.tls:
        assert session == NO_TLS
    if session.mta_verified:
        assert session.certificate is CertPresence.PRESENTED
    for note in session.notes:
        assert PRINTABLE.fullmatch(note), note[:300]
        assert len(note) <= NOTE_OVERHEAD + MAX_QUOTE, note[:300]


@SETTINGS
@given(macros)
@example({"{tls_version}": "TLSv1.3", "{cert_issuer}": "CA", "{cert_subject}": "a..b"})
@example({"{verify}": "OK", "{tls_version}": "TLSv1.3", "{cn_subject}": "mx+2Eexample+2Enet"})
@example({"{tls_version}": "TLSv1.3", "{cert_issuer}": "CA", "{cert_subject}": "\u00e9"})
@example({"{verify}": "OK", "{tls_version}": "x", "{cert_fp}": "\u00e9", "{cert_md5}": "\\"})
def test_any_macros_give_a_canonical_session(values: dict[str, str | None]) -> None:
    assert_canonical(session_from_macros(values))


@SETTINGS
@given(macros, st.sampled_from(["Postfix", "Sendmail"]))
def test_not_sent_and_missing_macros_are_the_same(values: dict[str, str | None], mta: str) -> None:
    if mta == "Sendmail":
        values = {**values, "{verify}": values.get("{verify}") or "OK"}
    present = {name: value for name, value in values.items() if value is not None}
    assert session_from_macros(values) == session_from_macros(present)


@SETTINGS
@given(
    st.dictionaries(st.sampled_from(MACRO_NAMES), macro_value).map(
        lambda d: {k: v for k, v in d.items() if k not in ("{tls_version}", "{verify}")}
    )
)
def test_without_a_tls_version_or_verify_there_is_no_tls(values: dict[str, str | None]) -> None:
    assert session_from_macros(values) == NO_TLS


@SETTINGS
@given(
    version=st.text(min_size=1, max_size=20),
    subject=macro_value,
    issuer=st.text(min_size=1, max_size=100),
)
def test_postfix_trusted_certificate_is_presented_and_verified(
    version: str, subject: str | None, issuer: str
) -> None:
    session = session_from_macros(
        {"{tls_version}": version, "{cert_subject}": subject, "{cert_issuer}": issuer}
    )
    assert session.tls and session.mta_verified
    assert session.certificate is CertPresence.PRESENTED
    assert_canonical(session)


@SETTINGS
@given(st.text(max_size=300))
@example("a..b")
@example("-")
@example(".example")
def test_mta_evidence_cn_is_empty_or_a_plausible_host_name(cn: str) -> None:
    assert_canonical(mta_evidence(cn).session)


@SETTINGS
@given(
    st.from_regex(
        r"([a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\.){1,4}[a-z]([a-z0-9-]{0,20}[a-z0-9])?",
        fullmatch=True,
    )
)
def test_a_host_name_cn_survives_any_case_and_a_trailing_dot(host: str) -> None:
    assert mta_evidence(host.upper() + ".").session.mta_cn == host
    session = session_from_macros(
        {"{tls_version}": "TLSv1.3", "{cert_subject}": host, "{cert_issuer}": "CA"}
    )
    assert session.mta_cn == host


# --- xtext (RFC 3461), as Sendmail encodes {cn_subject} -----------------------------------------


def xtext_encode(text: str) -> str:
    """RFC 3461 §4: "+", "=" and characters outside "!".."~" as "+HH" (ASCII input)."""
    return "".join(f"+{ord(c):02X}" if c in "+=" or not "!" <= c <= "~" else c for c in text)


@SETTINGS
@given(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=200))
def test_xtext_round_trips(text: str) -> None:
    assert xtext_decode(xtext_encode(text)) == text


@SETTINGS
@given(st.text(max_size=300))
def test_xtext_decode_never_raises_and_never_grows(text: str) -> None:
    decoded = xtext_decode(text)
    assert len(decoded) <= len(text)
    if "+" not in text:
        assert decoded == text


@SETTINGS
@given(st.from_regex(r"[a-z0-9.-]{1,60}", fullmatch=True))
def test_sendmail_xtext_cn_is_decoded(host: str) -> None:
    macros: dict[str, str | None] = {
        "{verify}": "OK",
        "{tls_version}": "TLSv1.3",
        "{cn_subject}": xtext_encode(host).replace(".", "+2E"),
    }
    expected = mta_evidence(host).session.mta_cn
    assert session_from_macros(macros).mta_cn == expected


# --- fingerprints ------------------------------------------------------------------------------


@SETTINGS
@given(st.binary(min_size=32, max_size=32), st.booleans(), st.booleans())
def test_sha256_fingerprint_in_any_spelling_is_canonical(
    digest: bytes, colons: bool, upper: bool
) -> None:
    text = digest.hex(":") if colons else digest.hex()
    text = text.upper() if upper else text
    canonical = digest.hex(":").upper()
    assert normalize_fingerprint(text) == canonical
    assert normalize_fingerprint(f" {text}\t") == canonical


@SETTINGS
@given(st.binary(min_size=16, max_size=16), st.booleans())
def test_md5_fingerprint_in_any_spelling_is_canonical(digest: bytes, colons: bool) -> None:
    text = digest.hex(":") if colons else digest.hex()
    assert normalize_md5(text) == digest.hex(":").upper()


@SETTINGS
@given(st.one_of(st.text(max_size=200), macro_value.filter(lambda v: v is not None)))
def test_fingerprint_normalizers_never_raise(text: str) -> None:
    sha = normalize_fingerprint(text)
    assert sha is None or SHA256.fullmatch(sha)
    md5 = normalize_md5(text)
    assert md5 == "" or MD5.fullmatch(md5)


@SETTINGS
@given(
    macros,
    st.one_of(st.text(max_size=200), hex_fp, st.builds(lambda n: "A" * n, st.integers(0, 5000))),
)
def test_with_fingerprint_keeps_the_session_canonical(
    values: dict[str, str | None], fingerprint: str
) -> None:
    before = session_from_macros(values)
    after = with_fingerprint(before, fingerprint)
    assert_canonical(after)
    assert after.tls == before.tls and after.mta_cn == before.mta_cn
    if before.fingerprint:
        assert after.fingerprint == before.fingerprint  # the MTA's own binding is never replaced
