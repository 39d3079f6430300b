"""Cost of one policy-table lookup from a pre-forked worker (docs/operations.md, "Workers").

Run: ``.venv/bin/python bench/bench_workers.py``. Prints figures only.

A forked "parent" process holds a SessionTable and answers over the same SOCK_SEQPACKET channel
the supervisor uses (runtime/prefork.py); this process plays the worker and times
``RemoteSessionTable.get()`` for a recorded session (hit) and an unknown one (miss), against
``SessionTable.get()`` in the same process (what a single process pays).
"""

from __future__ import annotations

import os
import select
import socket
import statistics
import time
from collections.abc import Callable

import benchpath  # noqa: F401  (tests/ on sys.path for support.*)

from mtls_milter.inbound.policy_service import PolicyFacts, SessionTable
from mtls_milter.inbound.shared_sessions import RemoteSessionTable, answer_lookup
from mtls_milter.runtime.worker_link import ID, MAX_MESSAGE, WorkerLink

ROUNDS = 5
LOOKUPS = 5000
FACTS = PolicyFacts(fingerprint="AB:" * 31 + "CD", protocol="TLSv1.3", helo="out.sender.test")


def _parent(sock: socket.socket, table: SessionTable) -> None:
    """Answer requests until the worker closes its end (the supervisor's loop, reduced)."""
    while True:
        select.select([sock], [], [])
        message = sock.recv(MAX_MESSAGE)
        if not message:
            os._exit(0)
        ident, request = message[1 : 1 + ID.size], message[1 + ID.size :]
        sock.send(ident + answer_lookup(table, request))


def _per_lookup_us(lookup: Callable[..., PolicyFacts | None], port: str) -> float:
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(LOOKUPS):
            lookup("192.0.2.7", port, since=0.0)
        samples.append((time.perf_counter() - started) / LOOKUPS * 1e6)
    return statistics.median(samples)


def main() -> None:
    table = SessionTable()
    table.record("192.0.2.7", "40000", FACTS)
    parent_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        worker_end.close()
        _parent(parent_end, table)
    parent_end.close()
    remote = RemoteSessionTable(WorkerLink(worker_end, 0))
    assert remote.get("192.0.2.7", "40000", since=0.0) is not None
    local_hit = _per_lookup_us(table.get, "40000")
    hit = _per_lookup_us(remote.get, "40000")
    miss = _per_lookup_us(remote.get, "40001")
    worker_end.close()
    os.waitpid(pid, 0)
    print(f"SessionTable.get in process (hit):        {local_hit:6.1f} us")
    print(f"RemoteSessionTable.get via parent (hit):  {hit:6.1f} us")
    print(f"RemoteSessionTable.get via parent (miss): {miss:6.1f} us")


if __name__ == "__main__":
    main()
