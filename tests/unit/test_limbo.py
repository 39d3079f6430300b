"""Agreement of the product's chain validation with the x509-limbo suite (C2SP/x509-limbo).

Two runs over the same cases, each with the case's trust store, intermediates, validation time
and expected peer name:

* server mode: ``ChainValidator.validate_server`` (the probe and the outbound checks), against
  the SERVER cases;
* client mode: exactly what inbound mail uses, ``validate_client`` under the default policy and
  then our name matching of the expected peer name against the names the verdict carries, against
  every case.

Client mode differs from the Web PKI server profile that the suite encodes on purpose in a few
ways (names from the CN, the EKU policy, exact names...). Each case is put in the first class
of :data:`CLIENT_DIFFERENCES` that applies; the agreement threshold covers the remaining cases,
and the size of each class is asserted, so docs/design.md cannot drift from the code.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtls_milter.core.certs import MAX_CHAIN_CERTS, TrustAnchors, certificate_names, name_matches
from mtls_milter.core.chain import ChainValidator
from mtls_milter.core.keys import key_problem

# Some cases deliberately hold certificates with non-positive serial numbers.
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")

MIN_SERVER_AGREEMENT = 0.995
MIN_CLIENT_AGREEMENT = 0.99
# validate_server checks the Web PKI server profile: serverAuth.
SUPPORTED_EKU: tuple[list[str], ...] = ([], ["serverAuth"])

# Client mode: class -> (cases in the class, cases where our verdict differs from the suite's).
# The same figures are in docs/design.md ("Certificates"); change both together.
CLIENT_DIFFERENCES: dict[str, tuple[int, int]] = {
    "IP-address peer name (inbound compares host names only; not run)": (4455, 412),
    f"more than {MAX_CHAIN_CERTS} presented certificates (our input limit)": (24, 8),
    "the case sets a maximum chain depth (inbound uses the default)": (6, 2),
    "the case restricts signature algorithms or key usage (we do not)": (2, 0),
    "leaf named by its subject CN: no SAN dNSName": (499, 70),
    "EKU policy: a clientAuth-only leaf or CA, or a leaf without EKU": (7, 4),
    "the peer name matches only a wildcard (off by default)": (8, 3),
    "underscore in a SAN dNSName (tolerated for private PKIs)": (1, 1),
}
# Cases with a key (leaf or CA) that our key policy refuses: (cases, cases decided differently).
# Not a difference: the suite rejects all of them too.
CLIENT_KEY_POLICY = (9, 0)

_SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
_CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
_ANY_EKU = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE


def _limbo_path() -> Path:
    env = os.environ.get("MTLS_LIMBO")
    if env:
        return Path(env)
    return Path(__file__).parents[2].parent / "shared/testdata/x509-limbo/limbo.json.gz"


@dataclass(frozen=True)
class Case:
    """One x509-limbo test case with its certificates parsed (once, for both runs)."""

    raw: dict[str, Any]
    expected: bool  # the suite expects the chain to validate
    trusted: tuple[x509.Certificate, ...]
    chain: tuple[x509.Certificate, ...]  # the peer certificate, then the intermediates
    parsed: bool  # False: cryptography refuses a certificate, which is a rejection
    at: datetime | None

    @property
    def id(self) -> str:
        return str(self.raw["id"])

    @property
    def peer(self) -> dict[str, str] | None:
        peer: dict[str, str] | None = self.raw.get("expected_peer_name")
        return peer


def _load_cases(path: Path) -> list[Case]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        suite = json.load(f)
    parsed: dict[str, x509.Certificate | None] = {}

    def load(pem: str) -> x509.Certificate | None:
        if pem not in parsed:
            try:
                parsed[pem] = x509.load_pem_x509_certificate(pem.encode())
            except Exception:
                parsed[pem] = None
        return parsed[pem]

    cases = []
    for raw in suite["testcases"]:
        trusted = [load(p) for p in raw["trusted_certs"]]
        chain = [load(p) for p in (raw["peer_certificate"], *raw["untrusted_intermediates"])]
        ok = None not in trusted and None not in chain
        at = datetime.fromisoformat(raw["validation_time"]) if raw["validation_time"] else None
        cases.append(
            Case(
                raw,
                raw["expected_result"] == "SUCCESS",
                tuple(c for c in trusted if c is not None),
                tuple(c for c in chain if c is not None),
                ok,
                at,
            )
        )
    return cases


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    path = _limbo_path()
    if not path.is_file():
        pytest.skip(f"x509-limbo suite not found at {path} (set MTLS_LIMBO)")
    return _load_cases(path)


Validators = Callable[[Case], ChainValidator]


@pytest.fixture(scope="module")
def validator_for() -> Validators:
    """A validator per trust store (the suite has 200 for 9,780 cases), without verdict cache."""
    made: dict[tuple[str, ...], ChainValidator] = {}

    def get(case: Case) -> ChainValidator:
        key = tuple(case.raw["trusted_certs"])
        if key not in made:
            made[key] = ChainValidator(TrustAnchors(case.trusted, ("limbo",)), cache_size=0)
        return made[key]

    return get


def _at(case: Case) -> datetime:
    return case.at or datetime.now(UTC)


# -- server mode ---------------------------------------------------------------------------


def _server_unsupported(case: Case) -> str:
    """Why validate_server cannot run ``case`` faithfully, or "" if it can."""
    peer = case.peer
    if not peer or peer.get("kind") not in ("DNS", "IP"):
        return f"peer name kind {peer and peer.get('kind')!r}"
    if case.raw["extended_key_usage"] not in SUPPORTED_EKU:
        return f"extended_key_usage {case.raw['extended_key_usage']}"
    if case.raw["signature_algorithms"] or case.raw["key_usage"]:
        return "signature_algorithms/key_usage constraints"
    if 1 + len(case.raw["untrusted_intermediates"]) > MAX_CHAIN_CERTS:
        # The product refuses such chains on purpose (a bound on work per connection).
        return f"more than {MAX_CHAIN_CERTS} presented certificates (product limit)"
    return ""


def _server_valid(case: Case, validator_for: Validators) -> bool:
    if not case.parsed:
        return False
    assert case.peer is not None
    verdict = validator_for(case).validate_server(
        case.chain, _at(case), case.peer["value"], max_depth=case.raw["max_chain_depth"]
    )
    return verdict.valid


def test_limbo_server_agreement(cases: list[Case], validator_for: Validators) -> None:
    total = agreed = 0
    false_accepts: Counter[str] = Counter()
    false_rejects: Counter[str] = Counter()
    unsupported: Counter[str] = Counter()
    examples: list[str] = []
    for case in cases:
        if case.raw["validation_kind"] != "SERVER":
            continue
        reason = _server_unsupported(case)
        if reason:
            unsupported[reason] += 1
            continue
        total += 1
        valid = _server_valid(case, validator_for)
        if valid == case.expected:
            agreed += 1
            continue
        (false_accepts if valid else false_rejects)[_features(case)] += 1
        if len(examples) < 10:
            examples.append(f"{'accept' if valid else 'reject'} {case.id}")

    assert total, "no SERVER cases in the suite"
    ratio = agreed / total
    summary = "\n".join(
        [
            f"x509-limbo SERVER cases: {total} run, {agreed} agreed ({ratio:.2%}), "
            f"{sum(false_accepts.values())} false accepts, "
            f"{sum(false_rejects.values())} false rejects, "
            f"{sum(unsupported.values())} unsupported",
            f"  false accepts by feature: {dict(false_accepts.most_common())}",
            f"  false rejects by feature: {dict(false_rejects.most_common())}",
            f"  unsupported by reason: {dict(unsupported.most_common())}",
            "  first disagreements: " + "; ".join(examples),
        ]
    )
    print("\n" + summary)
    assert ratio >= MIN_SERVER_AGREEMENT, summary


def _features(case: Case) -> str:
    return ",".join(case.raw["features"] or ["-"])


# -- client mode: what inbound mail does -----------------------------------------------------


def _ekus(cert: x509.Certificate) -> frozenset[x509.ObjectIdentifier] | None:
    try:
        return frozenset(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None
    except Exception:  # malformed: not a policy question
        return frozenset({_SERVER_AUTH})


def _san_dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except Exception:  # malformed: not a policy question
        return ["malformed"]
    return list(san.get_values_for_type(x509.DNSName))


def _eku_differs(
    chain: tuple[x509.Certificate, ...], trusted: tuple[x509.Certificate, ...]
) -> bool:
    """Our EKU policy (serverAuth or clientAuth, an EKU required on the leaf) decides otherwise
    than the server profile (serverAuth, an absent EKU allowed)."""
    leaf_ekus = _ekus(chain[0])
    if leaf_ekus is None or (_CLIENT_AUTH in leaf_ekus and _SERVER_AUTH not in leaf_ekus):
        return True
    for ca in (*chain[1:], *trusted):
        ekus = _ekus(ca)
        if ekus and _CLIENT_AUTH in ekus and not {_SERVER_AUTH, _ANY_EKU} & ekus:
            return True
    return False


def _client_class(case: Case) -> str:
    """The first class of CLIENT_DIFFERENCES that ``case`` is in, or ""."""
    labels = list(CLIENT_DIFFERENCES)
    peer = case.peer
    if peer and peer.get("kind") == "IP":
        return labels[0]
    if 1 + len(case.raw["untrusted_intermediates"]) > MAX_CHAIN_CERTS:
        return labels[1]
    if case.raw["max_chain_depth"] is not None:
        return labels[2]
    if case.raw["signature_algorithms"] or case.raw["key_usage"]:
        return labels[3]
    if not case.parsed:
        return ""
    leaf = case.chain[0]
    names = certificate_names(leaf)
    if names and not _san_dns_names(leaf):
        return labels[4]
    if _eku_differs(case.chain, case.trusted):
        return labels[5]
    exact = peer and any(name_matches(n, peer["value"]) for n in names)
    wild = peer and any(name_matches(n, peer["value"], allow_wildcards=True) for n in names)
    if wild and not exact:
        return labels[6]
    if any("_" in name for name in _san_dns_names(leaf)):
        return labels[7]
    return ""


def _key_refused(case: Case) -> bool:
    if not case.parsed:
        return False
    leaf, cas = case.chain[0], (*case.chain[1:], *case.trusted)
    return bool(key_problem(leaf, "leaf", 2048) or any(key_problem(c, "CA", 2048) for c in cas))


def _client_valid(case: Case, validator_for: Validators) -> bool:
    """What inbound concludes: a valid chain and (given a peer name) a matching name."""
    peer = case.peer
    if not case.parsed or (peer and peer.get("kind") != "DNS"):
        return False  # inbound matches host names only: an IP peer never passes
    verdict = validator_for(case).validate_client(case.chain, _at(case))
    if not verdict.valid:
        return False
    return peer is None or any(name_matches(n, peer["value"]) for n in verdict.names)


def test_limbo_client_agreement(cases: list[Case], validator_for: Validators) -> None:
    members: Counter[str] = Counter()
    differ: Counter[str] = Counter()
    key_cases = key_differ = 0
    examples: list[str] = []
    for case in cases:
        label = _client_class(case)
        valid = _client_valid(case, validator_for)
        members[label] += 1
        differ[label] += valid != case.expected
        if _key_refused(case):
            key_cases += 1
            key_differ += valid != case.expected
        if not label and valid != case.expected and len(examples) < 30:
            examples.append(f"{'accept' if valid else 'reject'} {case.id}")

    total, disagreed = members.pop(""), differ.pop("")
    ratio = (total - disagreed) / total
    classes = {label: (members[label], differ[label]) for label in CLIENT_DIFFERENCES}
    summary = "\n".join(
        [
            f"x509-limbo, client mode (inbound): {total} cases where our policy and the Web PKI "
            f"agree, {total - disagreed} agreed ({ratio:.2%}); deliberately different:",
            *(
                f"  {label}: {n} cases, {d} decided differently"
                for label, (n, d) in classes.items()
            ),
            f"  a key the key policy refuses: {key_cases} cases, {key_differ} decided differently",
            "  disagreements: " + "; ".join(examples),
        ]
    )
    print("\n" + summary)
    assert ratio >= MIN_CLIENT_AGREEMENT, summary
    assert classes == CLIENT_DIFFERENCES, summary
    assert (key_cases, key_differ) == CLIENT_KEY_POLICY, summary
