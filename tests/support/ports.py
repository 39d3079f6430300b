"""Ports for test servers: one free-port finder and one wait-until-listening helper."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

__all__ = ["free_port", "wait_for_port"]


def free_port(addresses: tuple[str, ...] = ("127.0.0.1",), *, udp: bool = False) -> int:
    """A TCP port that is free on every one of ``addresses`` right now (and for UDP too on
    the first address with ``udp``, for servers that bind both, such as dnsmasq)."""
    kinds = (socket.SOCK_DGRAM, socket.SOCK_STREAM) if udp else (socket.SOCK_STREAM,)
    for _ in range(50):
        with socket.socket(socket.AF_INET, kinds[0]) as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
            wanted = [(kind, addresses[0]) for kind in kinds[1:]]
            wanted += [(socket.SOCK_STREAM, address) for address in addresses[1:]]
            if _all_bind(wanted, port):
                return port
    raise OSError("no port free on all of " + ", ".join(addresses))


def _all_bind(wanted: Sequence[tuple[int, str]], port: int) -> bool:
    held: list[socket.socket] = []
    try:
        for kind, address in wanted:
            sock = socket.socket(socket.AF_INET, kind)
            held.append(sock)
            sock.bind((address, port))
    except OSError:
        return False
    finally:
        for sock in held:
            sock.close()
    return True


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)
