"""The chain fetch survives ``MemoryDenyWriteExecute=yes`` (the shipped units set it).

systemd implements that setting with a seccomp filter; Linux >= 6.3 offers the same rule per
process as ``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)``. A child process sets it first, then
fetches a chain over STARTTLS: a cffi callback (pyOpenSSL's verify callback) needs memory that is
writable and executable and fails there with "Cannot allocate write+execute memory".
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from support.pki import TestPki
from support.smtp_tls_server import StartTlsServer

CHILD = """
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print(json.dumps({"mdwe": ctypes.get_errno()}))
    sys.exit(0)
from mtls_milter.net.starttls import starttls_chain
result = starttls_chain("127.0.0.1", int(sys.argv[1]), "out.sender.test", timeout=10.0,
                        ehlo_name="mx.receiver.test")
print(json.dumps({"error": result.error, "chain": len(result.chain), "tls": result.tls_version}))
"""


@pytest.fixture
def served(pki: TestPki) -> Iterator[StartTlsServer]:
    leaf = pki.leaves["server"]
    with StartTlsServer("127.0.0.1", chain=leaf.chain_path, key=leaf.key_path) as server:
        yield server


def test_chain_fetch_under_memory_deny_write_execute(served: StartTlsServer, pki: TestPki) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(served.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    if "mdwe" in outcome:
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux >= 6.3; errno {outcome['mdwe']})")
    assert outcome == {
        "error": "",
        "chain": len(pki.leaves["server"].chain),
        "tls": "TLSv1.3",
    }, done.stderr
