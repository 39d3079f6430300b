"""Run the socketmap policy service in a background thread (its own event loop) for tests."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from mtls_milter.config import PolicyMapConfig
from mtls_milter.core.lookups import MxResolver
from mtls_milter.outbound.netstring import NetstringReader, encode
from mtls_milter.outbound.policy_map import PolicyMapService
from mtls_milter.runtime.service_thread import ServiceThread

__all__ = ["PolicyMapController", "socketmap_query"]


class PolicyMapController(ServiceThread):
    """``with PolicyMapController(resolver) as pm:`` serves on ``pm.host:pm.port``."""

    def __init__(
        self,
        resolver: MxResolver,
        *,
        config: PolicyMapConfig | None = None,
        budget: float = 5.0,
    ) -> None:
        self.config = config or PolicyMapConfig(socket="inet:0@127.0.0.1")
        self.service = PolicyMapService(self.config, resolver, budget=budget)
        self.host = "127.0.0.1"
        self.port = 0
        super().__init__(self._serve_map, name="policy-map", log=logging.getLogger(__name__))

    async def _serve_map(self, stop: asyncio.Event, ready: Callable[[], None]) -> None:
        server = await self.service.listen()
        sockname = server.sockets[0].getsockname()
        if isinstance(sockname, tuple):
            self.host, self.port = str(sockname[0]), int(sockname[1])
        ready()
        try:
            await stop.wait()
        finally:
            server.close()
            await self.service.close()

    def query(self, *keys: str, name: str = "mtls") -> list[str]:
        """Send ``name key`` requests pipelined on one connection; return the replies."""
        return socketmap_query(
            (self.host, self.port), [f"{name} {key}".encode() for key in keys], len(keys)
        )


def socketmap_query(
    address: tuple[str, int], payloads: list[bytes], expect: int, *, raw: bytes = b""
) -> list[str]:
    """Send ``payloads`` as netstrings (then ``raw`` bytes) in one write; read ``expect`` replies
    or until the server closes."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"".join(encode(p) for p in payloads) + raw)
        reader = NetstringReader(100_000)
        replies: list[str] = []
        while len(replies) < expect:
            data = sock.recv(4096)
            if not data:
                break
            reader.feed(data)
            while (payload := reader.next_payload()) is not None:
                replies.append(payload.decode())
        return replies
