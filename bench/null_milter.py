"""A null pymilter milter: the baseline for bench_milter.py.

It registers the same libmilter callbacks as mtls-milter and implements the same optional ones
(connect, helo, envelope sender, header, end of message, abort, close), so the MTA sends it the
same protocol steps; every callback only answers CONTINUE, and end of message adds one header
field and accepts.

Run::

    python bench/null_milter.py --socket unix:/tmp/null.sock
    python bench/null_milter.py --socket unix:/tmp/null.sock --no-reply
    python bench/null_milter.py --socket inet:PORT@127.0.0.1 --nodelay

``--nodelay`` sets TCP_NODELAY on the listening socket after ``opensocket`` (accepted sockets
inherit it), the way ``mtls-milter serve`` does; without it this is stock pymilter/libmilter.
``--no-reply`` negotiates "no reply" (SMFIP_NR_*) for every step before end of message, as
mtls-milter does on a unix socket (pymilter's ``@Milter.noreply``).
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import Any

import Milter
import milter

from mtls_milter.inbound.daemon import set_nodelay_on_listeners  # the same as ours

CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT


class NullMilter(Milter.Base):  # type: ignore[misc]
    """Answers CONTINUE everywhere; adds ``X-Null: 1`` at end of message."""

    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return CONTINUE

    def hello(self, heloname: str) -> int:
        return CONTINUE

    def envfrom(self, mailfrom: str, *params: str) -> int:
        return CONTINUE

    def header(self, name: str, value: str) -> int:
        return CONTINUE

    def eom(self) -> int:
        self.addheader("X-Null", "1", 0)
        return ACCEPT

    def abort(self) -> int:
        return CONTINUE

    def close(self) -> int:
        return CONTINUE


class NoReplyNullMilter(NullMilter):
    """The same, sending no reply before end of message (SMFIP_NR_CONN/HELO/MAIL/HDR)."""

    @Milter.noreply  # type: ignore[untyped-decorator]
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return CONTINUE

    @Milter.noreply  # type: ignore[untyped-decorator]
    def hello(self, heloname: str) -> int:
        return CONTINUE

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envfrom(self, mailfrom: str, *params: str) -> int:
        return CONTINUE

    @Milter.noreply  # type: ignore[untyped-decorator]
    def header(self, name: str, value: str) -> int:
        return CONTINUE


def _register() -> None:
    """What ``Milter.runmilter`` does, without entering the main loop."""
    milter.set_flags(Milter.ADDHDRS)
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)
    milter.register(
        "null-milter",
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )


def _on_term(signum: int, frame: FrameType | None) -> None:
    milter.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--socket", required=True, help="libmilter socket spec")
    parser.add_argument("--nodelay", action="store_true", help="force TCP_NODELAY")
    parser.add_argument("--no-reply", action="store_true", help="no reply before end of message")
    args = parser.parse_args(argv)
    Milter.factory = NoReplyNullMilter if args.no_reply else NullMilter
    _register()
    milter.setconn(args.socket)
    milter.settimeout(600)
    milter.opensocket(True)
    if args.nodelay:
        print(
            f"null-milter: TCP_NODELAY set on {set_nodelay_on_listeners()} listener(s)",
            file=sys.stderr,
            flush=True,
        )
    signal.signal(signal.SIGTERM, _on_term)
    print(f"null-milter: listening on {args.socket}", file=sys.stderr, flush=True)
    milter.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
