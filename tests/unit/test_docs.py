"""The README and the examples stay true to the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtls_milter.config import defaults_table, known_keys, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("section", "key"), [(s, k) for s, keys in known_keys().items() for k in keys]
)
def test_readme_documents_every_key(section: str, key: str) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert (
        f"`[{section}] {key}`" in readme
        or f"`[{section}] {key}`, " in readme
        or (f", `[{section}] {key}`" in readme)
    )


def test_example_config_loads_and_names_every_key() -> None:
    path = ROOT / "examples" / "mtls-milter.toml"
    load_config(path)
    text = path.read_text(encoding="utf-8")
    for section, keys in defaults_table().items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} = " in text, key
