"""What a session reports after each verdict, for whoever counts (metrics); nothing by default.

:class:`MilterSession` calls :meth:`SessionObserver.verdict` once per judged message, after the
verdict log line, as a side effect: an observer that raises is logged and never changes the
decision or the answer to the MTA.
"""

from __future__ import annotations

from typing import Protocol

from mtls_milter.core.evaluate import Verdict


class SessionObserver(Protocol):
    """Receives each judged message's verdict, action and timings."""

    def verdict(
        self,
        verdict: Verdict,
        action: str,
        dmarc_result: str | None,
        evaluation_seconds: float,
        message_seconds: float,
    ) -> None:
        """``action``: accept|reject|tempfail|quarantine; ``dmarc_result``: None when DMARC is
        off; ``evaluation_seconds``: end of message to decision; ``message_seconds``: MAIL FROM
        to decision."""


class NullObserver:
    """Does nothing; the default."""

    def verdict(
        self,
        verdict: Verdict,
        action: str,
        dmarc_result: str | None,
        evaluation_seconds: float,
        message_seconds: float,
    ) -> None:
        return None


NULL_OBSERVER = NullObserver()
