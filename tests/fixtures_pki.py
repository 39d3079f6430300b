"""Fixtures: the generated test PKI, trust anchors holding its root, and a chain validator."""

from __future__ import annotations

import pytest
from support.pki import TestPki, build_test_pki

from mtls_milter.core.certs import TrustAnchors
from mtls_milter.core.chain import ChainValidator
from mtls_milter.net.trust import load_trust_anchors


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """The test PKI, generated once per session (validity windows relative to now)."""
    return build_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def trust_anchors(pki: TestPki) -> TrustAnchors:
    """Trust anchors holding only the test root."""
    return load_trust_anchors([str(pki.root_path)])


@pytest.fixture
def validator(trust_anchors: TrustAnchors) -> ChainValidator:
    """A fresh validator (empty cache) with the default EKU policy."""
    return ChainValidator(trust_anchors)
