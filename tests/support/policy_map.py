"""Run the socketmap policy service in a background thread (its own event loop) for tests."""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import Future
from types import TracebackType
from typing import Self

from mtls_milter.config import PolicyMapConfig
from mtls_milter.core.lookups import MxResolver
from mtls_milter.outbound.netstring import NetstringReader, encode
from mtls_milter.outbound.policy_map import PolicyMapService
from mtls_milter.runtime.stream_service import Listener

__all__ = ["PolicyMapController", "socketmap_query"]


class PolicyMapController:
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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: Listener | None = None

    def start(self) -> Self:
        """Open the socket and serve."""
        self._thread.start()
        future: Future[Listener] = asyncio.run_coroutine_threadsafe(
            self.service.listen(), self._loop
        )
        self._server = future.result(10)
        sockname = self._server.sockets[0].getsockname()
        if isinstance(sockname, tuple):
            self.host, self.port = str(sockname[0]), int(sockname[1])
        return self

    def stop(self) -> None:
        """Close the server and its connections, stop the loop."""

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            await self.service.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

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
