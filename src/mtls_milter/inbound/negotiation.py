"""What a milter asks for at option negotiation, and what it gets from the MTA's offer.

This follows libmilter's ``st_optionneg``: the version is the lower of ours (6) and the MTA's;
every action we need must be offered, or the conversation ends; "no reply" flags the MTA does not
offer are dropped and the core answers CONTINUE in their place; "do not send DATA/unknown
commands" is dropped when the MTA cannot honour it; a larger frame size is used only when the MTA
offers it and we allow it. Macro lists (``smfi_setsymlist``) are appended to the reply; an MTA
that gets them sends, for every stage not listed, no macros at all (Postfix starts from empty
lists), so list every stage whose macros matter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .wire import (
    ALL_ACTIONS,
    ALL_PROTOCOL,
    INTERNAL_FLAGS,
    MAX_DATA_SIZE_1M,
    MAX_DATA_SIZE_64K,
    MAX_DATA_SIZE_256K,
    MIN_PROTOCOL_VERSION,
    NO_REPLY_FLAGS,
    PROTOCOL_VERSION,
    V1_ACTIONS,
    V1_PROTOCOL,
    ActionFlag,
    ProtocolFlag,
    Stage,
    WireError,
    flag_names,
)

MAX_HEADERS = 10_000  # per message; a real message has dozens
MAX_MACROS = 256  # per macro packet (Sendmail lets a milter request 50 names per stage)
MAX_MACRO_NAME = 128  # bytes, braces included
_MACRO_NAME = re.compile(r"[\x21-\x7e]+")
# Plain ints: IntFlag arithmetic costs microseconds, and negotiation happens per connection.
_DROPPABLE = (int(ProtocolFlag.NODATA), int(ProtocolFlag.NOUNKNOWN))
_MDS_1M, _MDS_256K = int(ProtocolFlag.MDS_1M), int(ProtocolFlag.MDS_256K)
_SETSYMLIST = int(ActionFlag.SETSYMLIST)


@dataclass(frozen=True)
class Limits:
    """Input limits; past any of them the conversation ends (with a log line)."""

    max_headers: int = MAX_HEADERS
    max_macros: int = MAX_MACROS
    max_macro_name: int = MAX_MACRO_NAME


@dataclass(frozen=True)
class MilterOptions:
    """What a milter wants from the MTA.

    ``actions``: the SMFIF_* actions it needs (SETSYMLIST is added when ``macros`` is given).
    ``protocol``: SMFIP_* flags: steps it does not want (NO*), replies it will not send (NR_*),
    SKIP, RCPT_REJ, HDR_LEADSPC. ``macros``: per stage, the macro names to request.
    ``max_data_size``: the largest payload it accepts if the MTA offers a larger one (64 KiB - 1,
    256 KiB - 1 or 1 MiB - 1; MTAs send body chunks of at most 64 KiB - 1 otherwise).
    """

    actions: int = 0
    protocol: int = 0
    macros: Mapping[Stage, Sequence[str]] = field(default_factory=dict)
    max_data_size: int = MAX_DATA_SIZE_64K
    limits: Limits = field(default_factory=Limits)
    _lists: dict[Stage, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.actions & ~ALL_ACTIONS:
            raise ValueError(f"unknown action flags 0x{self.actions:x}")
        if self.protocol & ~ALL_PROTOCOL:
            raise ValueError(f"unknown protocol flags 0x{self.protocol:x}")
        if self.max_data_size not in (MAX_DATA_SIZE_64K, MAX_DATA_SIZE_256K, MAX_DATA_SIZE_1M):
            raise ValueError(f"max_data_size must be 64K, 256K or 1M - 1: {self.max_data_size}")
        for stage, names in self.macros.items():
            Stage(stage)
            for name in names:
                if not _MACRO_NAME.fullmatch(name) or len(name) > MAX_MACRO_NAME:
                    raise ValueError(f"bad macro name {name!r}")
        lists = {Stage(s): " ".join(n).encode("ascii") for s, n in self.macros.items() if n}
        object.__setattr__(self, "_lists", lists)  # computed once: asked on every connection

    def macro_lists(self) -> dict[Stage, bytes]:
        """The lists as sent: space-separated names per stage."""
        return self._lists


@dataclass(frozen=True)
class Agreement:
    """The outcome of option negotiation."""

    version: int
    actions: int  # what we may do (our required actions)
    protocol: int  # what we sent the MTA
    wanted: int  # what we asked for (before dropping what the MTA lacks)
    fake_no_reply: int  # NR_* flags we wanted that the MTA lacks: the core answers for us
    max_data_size: int
    reply: tuple[int, int, int]  # version, actions, protocol of our answer
    macro_lists: dict[Stage, bytes] = field(default_factory=dict)  # sent when SETSYMLIST agreed


def negotiate(options: MilterOptions, version: int, actions: int, protocol: int) -> Agreement:
    """Our agreement with an MTA offering ``version``/``actions``/``protocol``.

    Raises WireError when the MTA cannot give what we need (the conversation then ends).
    """
    if version < MIN_PROTOCOL_VERSION:
        raise WireError(f"MTA protocol version {version} < {MIN_PROTOCOL_VERSION}")
    agreed_version = min(version, PROTOCOL_VERSION)
    mta_actions = actions or V1_ACTIONS
    mta_protocol = protocol or V1_PROTOCOL
    internal, size = _data_size(options.max_data_size, mta_protocol)
    mta_protocol &= ~INTERNAL_FLAGS
    # An action the MTA withholds is dropped, not a reason to end the conversation: the
    # handler learns what was agreed from the Negotiate event and degrades (as a libmilter
    # milter does), e.g. logs results instead of adding a header field.
    ours = int(options.actions) | (_SETSYMLIST if options.macro_lists() else 0)
    ours &= mta_actions
    wanted = int(options.protocol) & ~INTERNAL_FLAGS
    fake = wanted & NO_REPLY_FLAGS & ~mta_protocol
    to_mta = wanted & ~fake
    for optional in _DROPPABLE:
        if to_mta & optional and not mta_protocol & optional:
            to_mta &= ~optional
    if to_mta & ~mta_protocol:
        missing = flag_names(ProtocolFlag, to_mta & ~mta_protocol)
        raise WireError(f"MTA offers protocol 0x{mta_protocol:x}, missing {missing}")
    to_mta |= internal
    return Agreement(
        version=agreed_version,
        actions=int(ours),
        protocol=int(to_mta),
        wanted=int(wanted),
        fake_no_reply=int(fake),
        max_data_size=size,
        reply=(agreed_version, int(ours), int(to_mta)),
        macro_lists=options.macro_lists() if ours & _SETSYMLIST else {},
    )


def _data_size(allowed: int, mta_protocol: int) -> tuple[int, int]:
    """(flag to echo, payload limit): the MTA's larger size when offered and allowed."""
    if mta_protocol & _MDS_1M and allowed >= MAX_DATA_SIZE_1M:
        return _MDS_1M, MAX_DATA_SIZE_1M
    if mta_protocol & _MDS_256K and allowed >= MAX_DATA_SIZE_256K:
        return _MDS_256K, MAX_DATA_SIZE_256K
    return 0, MAX_DATA_SIZE_64K
