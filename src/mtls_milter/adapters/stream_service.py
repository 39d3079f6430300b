"""What the asyncio services (policy-map socketmap, Postfix policy listener) share: opening a
``unix:``/``inet:`` socket, serving each connection in a tracked task, and closing them all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

STREAM_LIMIT = 2**16  # asyncio's default buffer limit for readuntil/readline


def parse_listen_spec(spec: str) -> tuple[str, str | int, str]:
    """``unix:/path`` → ("unix", path, ""); ``inet:PORT@HOST``/``inet6:…`` → ("inet", port, host).

    Port 0 (an ephemeral port, for tests) is allowed here; the configuration never accepts it.
    """
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local") and rest.startswith("/"):
        return "unix", rest, ""
    if kind in ("inet", "inet6"):
        port, _, host = rest.partition("@")
        if port.isdigit() and int(port) < 65536 and host:
            return "inet", int(port), host.strip("[]")
    raise ValueError(f"bad socket {spec!r}: expected unix:/path or inet:PORT@HOST")


class StreamService:
    """Base class: subclasses implement :meth:`serve_connection`."""

    def __init__(
        self,
        spec: str,
        *,
        socket_mode: int,
        log: logging.Logger,
        max_connections: int = 0,
        limit: int = STREAM_LIMIT,
    ) -> None:
        self.spec = spec
        self.port = 0  # the bound TCP port (useful with inet:0@HOST in tests)
        self._socket_mode = socket_mode
        self._log = log
        self._max_connections = max_connections  # 0: unlimited
        self._limit = limit
        self._connections: set[asyncio.Task[None]] = set()

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one client until it is done."""
        raise NotImplementedError

    async def listen(self) -> asyncio.Server:
        """Open the socket (a stale unix socket is replaced); OSError/ValueError if impossible."""
        kind, where, host = parse_listen_spec(self.spec)
        if kind == "unix":
            path = Path(str(where))
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()  # a stale socket from an earlier run
            server = await asyncio.start_unix_server(
                self._on_connect, path=str(path), limit=self._limit
            )
            os.chmod(path, self._socket_mode)
            return server
        server = await asyncio.start_server(
            self._on_connect, host=host, port=int(where), reuse_address=True, limit=self._limit
        )
        self.port = int(server.sockets[0].getsockname()[1])
        return server

    async def close_connections(self) -> None:
        """Cancel the open connections and wait for them."""
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._max_connections and len(self._connections) >= self._max_connections:
            self._log.warning(
                "too many connections (%d): closing a new one", len(self._connections)
            )
            writer.close()
            return
        if task is not None:
            self._connections.add(task)
        try:
            await self.serve_connection(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:  # one bad connection must never take the service down
            self._log.exception("connection failed")
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
