"""Agreement of ChainValidator.validate_server with the x509-limbo suite (C2SP/x509-limbo).

Every SERVER test case is run through the project's validator with the case's trust store,
intermediates, validation time, peer name and maximum depth; the suite's verdict is compared
with ours. Disagreements are reported grouped by the case's features, so a regression in the
policy layer stands out from the documented gaps of cryptography (no CRLs, no DN constraints,
lax pedantic checks).
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from mtls_milter.core.certs import MAX_CHAIN_CERTS, ChainValidator, TrustAnchors

MIN_AGREEMENT = 0.995
# validate_server checks the Web PKI server profile: serverAuth.
SUPPORTED_EKU: tuple[list[str], ...] = ([], ["serverAuth"])


def _limbo_path() -> Path:
    env = os.environ.get("MTLS_LIMBO")
    if env:
        return Path(env)
    return Path(__file__).parents[2].parent / "shared/testdata/x509-limbo/limbo.json.gz"


def _certs(pems: list[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in pems]


def _unsupported(case: dict[str, Any]) -> str:
    """Why we cannot run ``case`` faithfully, or "" if we can."""
    peer = case.get("expected_peer_name")
    if not peer or peer.get("kind") not in ("DNS", "IP"):
        return f"peer name kind {peer and peer.get('kind')!r}"
    if case["extended_key_usage"] not in SUPPORTED_EKU:
        return f"extended_key_usage {case['extended_key_usage']}"
    if case["signature_algorithms"] or case["key_usage"]:
        return "signature_algorithms/key_usage constraints"
    if 1 + len(case["untrusted_intermediates"]) > MAX_CHAIN_CERTS:
        # The product refuses such chains on purpose (a bound on work per connection).
        return f"more than {MAX_CHAIN_CERTS} presented certificates (product limit)"
    return ""


# Some cases deliberately hold certificates with non-positive serial numbers.
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_limbo_server_agreement() -> None:
    path = _limbo_path()
    if not path.is_file():
        pytest.skip(f"x509-limbo suite not found at {path} (set MTLS_LIMBO)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        suite = json.load(f)

    now = datetime.now(UTC)
    total = agreed = 0
    false_accepts: Counter[str] = Counter()
    false_rejects: Counter[str] = Counter()
    unsupported: Counter[str] = Counter()
    examples: list[str] = []
    for case in suite["testcases"]:
        if case["validation_kind"] != "SERVER":
            continue
        reason = _unsupported(case)
        if reason:
            unsupported[reason] += 1
            continue
        total += 1
        try:
            trusted = _certs(case["trusted_certs"])
            chain = _certs([case["peer_certificate"], *case["untrusted_intermediates"]])
        except Exception:
            # cryptography refuses to parse some deliberately malformed certificates: that is
            # a rejection, exactly what our parse_certificates would report.
            valid = False
        else:
            at = datetime.fromisoformat(case["validation_time"]) if case["validation_time"] else now
            validator = ChainValidator(TrustAnchors(tuple(trusted), ("limbo",)), cache_size=0)
            verdict = validator.validate_server(
                chain, at, case["expected_peer_name"]["value"], max_depth=case["max_chain_depth"]
            )
            valid = verdict.valid
        expected = case["expected_result"] == "SUCCESS"
        if valid == expected:
            agreed += 1
            continue
        features = ",".join(case["features"] or ["-"])
        (false_accepts if valid else false_rejects)[features] += 1
        if len(examples) < 10:
            examples.append(f"{'accept' if valid else 'reject'} {case['id']}")

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
    assert ratio >= MIN_AGREEMENT, summary
