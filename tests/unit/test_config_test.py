"""``mtls-milter config-test``: exit 0 and silence for a usable configuration, else exit 1 and
the first problem on stderr."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.pki import TestPki

from mtls_milter.cli.main import main


def _run(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["config-test", "--config", str(path)])
    captured = capsys.readouterr()
    assert captured.out == ""
    return status, captured.err.strip()


def _config(tmp_path: Path, pki: TestPki, **milter: str) -> Path:
    keys = {"socket": f"unix:{tmp_path}/milter.sock", "socket_mode": "0660", **milter}
    lines = ["[milter]", *(f'{k} = "{v}"' for k, v in keys.items())]
    lines += ["[tls]", f'trust = ["{pki.root_path}"]']
    path = tmp_path / "mtls-milter.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_usable_configuration(
    tmp_path: Path, pki: TestPki, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(_config(tmp_path, pki, user="root", group="root"), capsys) == (0, "")


@pytest.mark.parametrize(
    ("milter", "problem"),
    [
        ({"user": "no-such-user-here"}, "[milter] user 'no-such-user-here': no such user"),
        ({"group": "no-such-group-here"}, "[milter] group 'no-such-group-here': no such group"),
        (
            {"socket": "unix:/nonexistent/dir/milter.sock"},
            "[milter] socket 'unix:/nonexistent/dir/milter.sock': directory "
            "'/nonexistent/dir' does not exist",
        ),
    ],
)
def test_the_first_problem(
    milter: dict[str, str],
    problem: str,
    tmp_path: Path,
    pki: TestPki,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _config(tmp_path, pki, **milter)
    assert _run(path, capsys) == (1, f"mtls-milter: {path}: {problem}")


def test_a_missing_trust_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[tls]\ntrust = ["{tmp_path}/missing.pem"]\n')
    status, err = _run(path, capsys)
    assert status == 1
    assert err.startswith(f"mtls-milter: {path}: [tls] trust: {tmp_path}/missing.pem")


def test_schema_errors_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[milter]\nsocket_mode = 660\n")
    status, err = _run(path, capsys)
    assert status == 1 and err.startswith("mtls-milter: ") and "socket_mode" in err


def test_an_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, err = _run(tmp_path / "missing.toml", capsys)
    assert (status, err) == (
        1,
        f"mtls-milter: {tmp_path}/missing.toml: cannot read: No such file or directory",
    )


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_any_file_gives_0_or_1(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "c.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        with contextlib.redirect_stderr(io.StringIO()):
            assert main(["config-test", "--config", str(path)]) in (0, 1)
