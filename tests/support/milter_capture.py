"""A recording TCP proxy between an MTA and a milter, and the capture file format.

:class:`CaptureProxy` listens on ``127.0.0.1:PORT``; for every connection the MTA opens it
connects to the milter at ``upstream`` and forwards both directions unchanged, recording every
chunk it forwards in the order it forwarded it. :func:`write_capture` stores a list of
conversations as text, one chunk per line::

    # any comment
    = connection 1
    > 0000000d4f000000060000...   (MTA -> milter bytes, hex)
    < 0000000d4f000000060000...   (milter -> MTA bytes, hex)

and :func:`read_capture` reads it back (what ``tests/unit/test_milter_captures.py`` replays).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CaptureProxy", "Conversation", "read_capture", "write_capture"]

TO_MILTER = ">"
TO_MTA = "<"


@dataclass
class Conversation:
    """One milter connection: the chunks forwarded, in order, with their direction."""

    chunks: list[tuple[str, bytes]] = field(default_factory=list)
    directions_ended: int = 0  # 2 once both sides closed (the proxy then closes its sockets)

    @property
    def ended(self) -> bool:
        return self.directions_ended >= 2

    def stream(self, direction: str) -> bytes:
        """Every byte sent in one direction (``">"`` MTA to milter, ``"<"`` milter to MTA)."""
        return b"".join(data for d, data in self.chunks if d == direction)


class CaptureProxy:
    """Forward MTA connections to ``upstream`` (host, port), recording both directions."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.conversations: list[Conversation] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def start(self) -> CaptureProxy:
        thread = threading.Thread(target=self._accept_loop, name="capture-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> CaptureProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def postfix_socket(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    @property
    def sendmail_socket(self) -> str:
        return f"inet:{self.port}@127.0.0.1"

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                mta, _ = self._listener.accept()
            except OSError:
                return
            try:
                milter = socket.create_connection(self.upstream, timeout=30)
            except OSError:  # the milter is down: the MTA sees the connection close
                mta.close()
                continue
            for sock in (mta, milter):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(None)
            conversation = Conversation()
            with self._lock:
                self.conversations.append(conversation)
            for src, dst, direction in ((mta, milter, TO_MILTER), (milter, mta, TO_MTA)):
                args = (src, dst, direction, conversation)
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(
        self, src: socket.socket, dst: socket.socket, direction: str, conv: Conversation
    ) -> None:
        """Copy ``src`` to ``dst``, recording each chunk, until EOF; then half-close ``dst``."""
        try:
            while data := src.recv(65536):
                with self._lock:  # record before forwarding: the order is the order on the wire
                    conv.chunks.append((direction, data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                conv.directions_ended += 1
                both = conv.ended
            if both:
                src.close()
                dst.close()


def write_capture(path: Path, conversations: list[Conversation], comment: str = "") -> None:
    """Store ``conversations`` in the text format described in the module docstring."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    for number, conversation in enumerate(conversations, 1):
        lines.append(f"= connection {number}")
        lines += [f"{direction} {data.hex()}" for direction, data in conversation.chunks]
    path.write_text("\n".join(lines) + "\n")


def read_capture(path: Path) -> list[Conversation]:
    """The conversations stored in ``path``."""
    conversations: list[Conversation] = []
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("="):
            conversations.append(Conversation())
            continue
        direction, _, data = line.partition(" ")
        if direction not in (TO_MILTER, TO_MTA) or not conversations:
            raise ValueError(f"{path}: bad line {line[:80]!r}")
        conversations[-1].chunks.append((direction, bytes.fromhex(data)))
    return conversations
