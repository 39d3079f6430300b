"""``make demo``: the README's ``check`` examples, run against a demo PKI and a demo DNS server.

Writes ``demo/`` (a test CA ``demo/ca.pem`` and a client chain for ``out.sender.example``,
``demo/client-chain.pem``), starts dnsmasq on 127.0.0.1:5399 serving the Client MX record that
``mtls-milter record --domain sender.example --host out.sender.example`` prints, runs every
``.venv/bin/mtls-milter check`` line of the README's demo block exactly as written (from the
repository root), prints what they print, and exits 1 unless each shows ``pass``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.pki import CLIENT_AUTH, build_test_pki

from mtls_milter.cli.record import record_lines

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
DNS_PORT = 5399
DNSMASQ = "/usr/sbin/dnsmasq"


def readme_commands() -> list[str]:
    """The ``check`` lines of the README block that follows the ``make demo`` line."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("    make demo", 1)[1].split("\n\n", 1)[0]
    return [
        line.strip()
        for line in block.splitlines()
        if line.strip().startswith(".venv/bin/mtls-milter check")
    ]


def make_pki() -> None:
    pki = build_test_pki(DEMO / "pki")
    name = "out.sender.example"
    leaf = pki.issue("demo-client", cn=name, sans=[name], eku=[CLIENT_AUTH])
    shutil.copyfile(leaf.chain_path, DEMO / "client-chain.pem")
    shutil.copyfile(pki.root_path, DEMO / "ca.pem")


def start_dns() -> subprocess.Popen[bytes]:
    lines = record_lines("sender.example", ["out.sender.example"])
    options = [f"--{line}" for line in lines if line.startswith("dns-rr=")]
    command = [DNSMASQ, "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null"]
    command += ["--pid-file=", f"--port={DNS_PORT}", "--listen-address=127.0.0.1"]
    command += ["--bind-interfaces", "--local=/example/", *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.3)
    if process.poll() is not None:
        error = process.stderr.read().decode(errors="replace") if process.stderr else ""
        sys.exit(f"demo: dnsmasq did not start on 127.0.0.1:{DNS_PORT}: {error.strip()}")
    return process


def main() -> int:
    if not Path(DNSMASQ).exists():
        sys.exit(f"demo: {DNSMASQ} is missing (Debian package dnsmasq-base; make setup)")
    if not (ROOT / ".venv" / "bin" / "mtls-milter").exists():
        sys.exit("demo: .venv/bin/mtls-milter is missing: run make setup first")
    commands = readme_commands()
    if not commands:
        sys.exit("demo: no check command found after 'make demo' in README.md")
    DEMO.mkdir(exist_ok=True)
    make_pki()
    dns = start_dns()
    failed = 0
    try:
        for command in commands:
            print(f"$ {command}", flush=True)
            done = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True)
            sys.stdout.write(done.stdout + done.stderr)
            if done.returncode != 0 or "mtls=pass" not in done.stdout:
                failed += 1
    finally:
        dns.terminate()
        dns.wait(5)
    print(f"demo: {len(commands) - failed} of {len(commands)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
