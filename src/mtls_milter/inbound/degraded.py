"""What a milter does when the MTA withholds an action: degrade, say so once, never break mail.

Both transports call :func:`note_mta_actions` at option negotiation with what the MTA allows.
Without the header actions the results are logged only; without SETSYMLIST the milter sees the
macros the MTA's own configuration lists; without QUARANTINE a DMARC quarantine is logged only.
"""

from __future__ import annotations

from mtls_milter.inbound.session import MilterSession, warn_once


def note_mta_actions(
    session: MilterSession, *, add_headers: bool, change_headers: bool, symlist: bool
) -> None:
    """Tell ``session`` what the MTA allows; one warning per process for what it withholds."""
    session.header_actions = add_headers and change_headers
    if not session.header_actions:
        missing = [n for n, ok in (("ADDHDRS", add_headers), ("CHGHDRS", change_headers)) if not ok]
        warn_once(
            "header",
            "MTA withholds header actions (%s): results will be logged only, no "
            "Authentication-Results field is added or removed",
            " ".join(missing),
        )
    if not symlist:
        warn_once(
            "symlist",
            "MTA withholds SETSYMLIST: the milter sees only the macros the MTA's own "
            "configuration lists",
        )
