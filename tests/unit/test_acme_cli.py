"""``mtls-milter acme validate|respond``: exit statuses, JSON schema, usage errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fixtures_acme import Account, MxHosts

from mtls_milter.cli.main import main

JSON_FIELDS = {
    "type", "domain", "token", "key_authorization", "status", "reason", "problem",
    "requirement", "null_mx", "implicit_mx", "hosts", "elapsed",
}  # fmt: skip
HOST_FIELDS = {"host", "status", "reason", "problem", "addresses"}
ADDRESS_FIELDS = {
    "address", "status", "reason", "problem", "url", "http_status", "redirects", "elapsed",
}  # fmt: skip


@pytest.fixture
def world(mx_hosts: MxHosts, acme_account: Account, acme_token: str) -> MxHosts:
    dns = mx_hosts.dns
    dns.add("sender.test", 265, "10 mx1.sender.test.", "20 mx2.sender.test.")
    dns.add("half.test", 265, "10 mx1.sender.test.", "20 mx3.sender.test.")
    dns.add("mx1.sender.test", "A", "127.0.0.2")
    dns.add("mx2.sender.test", "A", "127.0.0.3")
    dns.add("mx3.sender.test", "A", "127.0.0.4")
    dns.servfail("broken.test")
    keyauth = acme_account.key_authorization(acme_token)
    mx_hosts.responder("127.0.0.2", {acme_token: keyauth})
    mx_hosts.responder("127.0.0.3", {acme_token: keyauth})
    mx_hosts.responder("127.0.0.4", {})
    return mx_hosts


def run(
    capsys: pytest.CaptureFixture[str], world: MxHosts, *args: str
) -> tuple[int, dict[str, Any], str]:
    argv = ["acme", "validate", *args, "--dns", world.dns.nameserver, "--port", str(world.port)]
    status = main([*argv, "--timeout", "1", "--deadline", "5", "--json"])
    captured = capsys.readouterr()
    return status, json.loads(captured.out) if captured.out else {}, captured.err


def test_valid_exit_0_with_json(
    capsys: pytest.CaptureFixture[str], world: MxHosts, acme_account: Account, acme_token: str
) -> None:
    status, data, _ = run(
        capsys, world, "--type", "client-mx-http-01", "--domain", "sender.test",
        f"--token={acme_token}", f"--thumbprint={acme_account.thumbprint}",
    )  # fmt: skip
    assert status == 0, data
    assert set(data) == JSON_FIELDS and data["status"] == "valid" and data["problem"] is None
    assert data["requirement"] == "all hosts, every address of each"
    assert data["key_authorization"] == acme_account.key_authorization(acme_token)
    assert all(set(h) == HOST_FIELDS for h in data["hosts"])
    assert all(set(a) == ADDRESS_FIELDS for h in data["hosts"] for a in h["addresses"])


def test_account_jwk_file(
    capsys: pytest.CaptureFixture[str],
    world: MxHosts,
    acme_account: Account,
    acme_token: str,
    tmp_path: Path,
) -> None:
    jwk = tmp_path / "account.json"
    jwk.write_text(json.dumps(acme_account.key.to_json()))
    status, data, _ = run(
        capsys, world, "--type", "client-mx-http-01", "--domain", "sender.test",
        f"--token={acme_token}", "--account-jwk", str(jwk),
    )  # fmt: skip
    assert status == 0, data


def test_invalid_exit_1(
    capsys: pytest.CaptureFixture[str], world: MxHosts, acme_account: Account, acme_token: str
) -> None:
    status, data, _ = run(
        capsys, world, "--type", "client-mx-http-01", "--domain", "half.test",
        f"--token={acme_token}", f"--thumbprint={acme_account.thumbprint}",
    )  # fmt: skip
    assert status == 1
    assert data["status"] == "invalid" and data["reason"].startswith("mx3.sender.test: ")
    assert data["problem"] == "unauthorized"


def test_dns_error_exit_3(
    capsys: pytest.CaptureFixture[str], world: MxHosts, acme_account: Account, acme_token: str
) -> None:
    status, data, _ = run(
        capsys, world, "--type", "server-mx-http-01", "--domain", "broken.test",
        f"--token={acme_token}", f"--thumbprint={acme_account.thumbprint}",
    )  # fmt: skip
    assert status == 3
    assert data["status"] == "error" and data["reason"].startswith(
        "DNS: MX lookup failed: SERVFAIL"
    )
    assert data["problem"] == "dns"


def test_readable_output(
    capsys: pytest.CaptureFixture[str], world: MxHosts, acme_account: Account, acme_token: str
) -> None:
    argv = [
        "acme", "validate", "--type", "client-mx-http-01", "--domain", "half.test",
        f"--token={acme_token}", f"--thumbprint={acme_account.thumbprint}",
        "--dns", world.dns.nameserver, "--port", str(world.port),
    ]  # fmt: skip
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert out.startswith("status:  invalid\nreason:  mx3.sender.test: 127.0.0.4: HTTP 404")
    assert "host mx1.sender.test: valid" in out and "  127.0.0.4: invalid - HTTP 404" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--token", "short", "--thumbprint", "A" * 43], "at least 128 bits"),
        (["--token", "A" * 43, "--thumbprint", "bad"], "--thumbprint: thumbprint must be"),
        (["--token", "A" * 43, "--account-jwk", "/nonexistent.json"], "--account-jwk"),
        (["--token", "A" * 43, "--thumbprint", "A" * 43, "--dns", "not-an-ip"], "--dns"),
        (["--token", "A" * 43, "--thumbprint", "A" * 43, "--timeout", "0"], "--timeout"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["acme", "validate", "--type", "client-mx-http-01", "--domain", "x.test", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_bad_jwk_file_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for content, message in (("{not json", "not JSON"), ('{"kty": "oct"}', "unsupported")):
        path = tmp_path / "k.json"
        path.write_text(content)
        argv = ["acme", "validate", "--type", "client-mx-http-01", "--domain", "x.test",
                "--token", "A" * 43, "--account-jwk", str(path)]  # fmt: skip
        assert main(argv) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["acme"],
        ["acme", "validate", "--type", "http-01", "--domain", "x", "--token", "A" * 43,
         "--thumbprint", "A" * 43],
        ["acme", "validate", "--type", "client-mx-http-01", "--domain", "x", "--token", "A" * 43],
        ["acme", "validate", "--type", "client-mx-http-01", "--domain", "x", "--token", "A" * 43,
         "--thumbprint", "A" * 43, "--account-jwk", "f"],
        ["acme", "respond"],
    ],
)  # fmt: skip
def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_respond_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["acme", "respond", "--dir", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["acme", "respond", "--dir", str(tmp_path), "--listen", "nonsense"]) == 2
    assert "--listen" in capsys.readouterr().err


def test_token_and_thumbprint_starting_with_a_dash(
    capsys: pytest.CaptureFixture[str], world: MxHosts
) -> None:
    token, thumbprint = "-" + "A" * 42, "-" + "B" * 42
    world.dns.add("dash.test", 265, "10 mx1.sender.test.")
    status, data, _ = run(
        capsys, world, "--type", "client-mx-http-01", "--domain", "dash.test",
        f"--token={token}", f"--thumbprint={thumbprint}",
    )  # fmt: skip
    assert status == 1 and data["token"] == token  # parsed; mx1 serves no such token
    assert data["key_authorization"] == f"{token}.{thumbprint}"
