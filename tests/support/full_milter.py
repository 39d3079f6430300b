"""A pymilter milter that asks for every protocol step and uses the answers libmilter can send.

For captures (tests/support/capture_milter_fixtures.py): every step is sent by the MTA (RCPT,
body, unknown commands too), a recipient containing ``reject`` is refused with a two-line
``smfi_setmlreply`` text, and end of message adds a field, inserts one at the top, changes
``Subject``, deletes ``X-Folded``, quarantines and accepts. Run::

    python tests/support/full_milter.py inet:PORT@127.0.0.1
"""

from __future__ import annotations

import sys
from typing import Any

import Milter

CONTINUE: int = Milter.CONTINUE
REJECT: int = Milter.REJECT
ACCEPT: int = Milter.ACCEPT


class FullMilter(Milter.Base):  # type: ignore[misc]
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return CONTINUE

    def hello(self, heloname: str) -> int:
        return CONTINUE

    def envfrom(self, mailfrom: str, *params: str) -> int:
        return CONTINUE

    def envrcpt(self, rcpt: str, *params: str) -> int:
        if "reject" in rcpt:
            self.setreply("550", "5.7.1", "Recipient refused", "by the full milter")
            return REJECT
        return CONTINUE

    def data(self) -> int:
        return CONTINUE

    def header(self, name: str, value: str) -> int:
        return CONTINUE

    def eoh(self) -> int:
        return CONTINUE

    def body(self, chunk: bytes) -> int:
        return CONTINUE

    def eom(self) -> int:
        self.addheader("X-Full", "added")
        self.addheader("X-Top", "inserted", 0)
        self.chgheader("Subject", 1, "changed")
        self.chgheader("X-Folded", 1, "")
        self.quarantine("held by the full milter")
        return ACCEPT

    def unknown(self, command: str) -> int:
        return CONTINUE

    def abort(self) -> int:
        return CONTINUE

    def close(self) -> int:
        return CONTINUE


def main(argv: list[str]) -> int:
    Milter.factory = FullMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE)
    Milter.runmilter("full-milter", argv[0], 600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
