"""A null milter on our own inbound transport (mtls_milter.inbound): the peer of null_milter.py.

It asks for the same protocol steps as the null pymilter milter (all of them), answers CONTINUE
everywhere, and at end of message inserts ``X-Null: 1`` at the top and accepts.

Run::

    python bench/null_inbound.py --socket unix:/tmp/null-inbound.sock
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from mtls_milter.inbound.asyncio_driver import MilterServer, run
from mtls_milter.inbound.events import EndOfMessage, Event
from mtls_milter.inbound.negotiation import MilterOptions
from mtls_milter.inbound.replies import Action, InsertHeader, Reply
from mtls_milter.inbound.wire import ActionFlag

END = Reply(Action.ACCEPT, modifications=(InsertHeader(0, "X-Null", "1"),))


class NullHandler:
    """CONTINUE everywhere; X-Null at end of message."""

    async def on_event(self, event: Event) -> Reply | None:
        return END if isinstance(event, EndOfMessage) else None


async def serve(spec: str) -> None:
    server = MilterServer(spec, lambda peer: NullHandler(), MilterOptions(ActionFlag.ADDHDRS))
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"null-inbound: listening on {spec}", file=sys.stderr, flush=True)
    await stop.wait()
    await server.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--socket", required=True, help="libmilter socket spec")
    args = parser.parse_args(argv)
    run(serve(args.socket))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
