"""Replay a captured milter conversation through the protocol core, answering as recorded.

Used by tests/unit/test_milter_captures.py (committed captures) and the end-to-end capture test
(a live one). The core is given the options the recorded milter announced, so when it answers
every event as the recorded milter did, its bytes must equal the recorded ones.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from mtls_milter.inbound import events as ev
from mtls_milter.inbound.negotiation import MilterOptions
from mtls_milter.inbound.protocol import MilterConnection
from mtls_milter.inbound.replies import (
    Action,
    AddHeader,
    ChangeHeader,
    InsertHeader,
    Modification,
    Quarantine,
    Reply,
    SmtpReply,
)
from mtls_milter.inbound.wire import (
    INTERNAL_FLAGS,
    MAX_DATA_SIZE_1M,
    MAX_DATA_SIZE_64K,
    MAX_DATA_SIZE_256K,
    ProtocolFlag,
    Stage,
)
from support.milter_capture import TO_MILTER, TO_MTA, Conversation

_XCODE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")

__all__ = ["Replayed", "frames", "options_from_reply", "recorded_answers", "replay_conversation"]


def frames(data: bytes) -> list[tuple[bytes, bytes]]:
    """(command byte, payload) of every frame in ``data``, which must hold whole frames."""
    out = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        assert 1 <= length <= len(data) - 4, f"truncated frame in capture: {data[:16]!r}"
        out.append((data[4:5], data[5 : 4 + length]))
        data = data[4 + length :]
    return out


def options_from_reply(payload: bytes) -> MilterOptions:
    """The MilterOptions that make the core answer option negotiation as libmilter did."""
    _version, actions, protocol = struct.unpack(">III", payload[:12])
    macros: dict[Stage, list[str]] = {}
    rest = payload[12:]
    while rest:
        (stage,) = struct.unpack(">I", rest[:4])
        names, _, rest = rest[4:].partition(b"\0")
        macros[Stage(stage)] = names.decode("ascii").split(" ")
    size = MAX_DATA_SIZE_64K
    if protocol & ProtocolFlag.MDS_1M:
        size = MAX_DATA_SIZE_1M
    elif protocol & ProtocolFlag.MDS_256K:
        size = MAX_DATA_SIZE_256K
    return MilterOptions(
        actions=actions,  # SETSYMLIST too: pymilter announces it even without lists
        protocol=protocol & ~INTERNAL_FLAGS,
        macros=macros,
        max_data_size=size,
    )


def _modification(command: bytes, payload: bytes) -> Modification:
    if command == b"q":
        return Quarantine(payload.rstrip(b"\0"))
    index = None
    if command in (b"i", b"m"):
        (index,) = struct.unpack(">I", payload[:4])
        payload = payload[4:]
    name, value = payload.split(b"\0")[:2]
    if command == b"h":
        return AddHeader(name, value)
    assert index is not None
    return InsertHeader(index, name, value) if command == b"i" else ChangeHeader(name, index, value)


def smtp_reply(payload: bytes) -> SmtpReply:
    """A SMFIR_REPLYCODE payload as ``smfi_setreply``/``smfi_setmlreply`` built it."""
    rows = payload.rstrip(b"\0").decode("ascii").split("\r\n")
    code, xcode, lines = rows[0][:3], None, []
    for row in rows:
        rest = row[4:]
        first, _, text = rest.partition(" ")
        if _XCODE.fullmatch(first):
            xcode, rest = first, text
        lines.append(rest)
    return SmtpReply(code, xcode, tuple(line for line in lines if line))


def recorded_answers(replies: list[tuple[bytes, bytes]]) -> list[Reply]:
    """libmilter's answers after option negotiation, one Reply per answered command."""
    answers: list[Reply] = []
    pending: list[Modification] = []
    for command, payload in replies:
        if command == b"y":
            smtp = smtp_reply(payload)
            action = Action.REJECT if smtp.code.startswith("5") else Action.TEMPFAIL
            answers.append(Reply(action, smtp, tuple(pending)))
            pending = []
        elif command in (b"h", b"i", b"m", b"q"):
            pending.append(_modification(command, payload))
        else:
            answers.append(Reply(Action(command[0]), None, tuple(pending)))
            pending = []
    assert not pending, "modifications without a final answer in the capture"
    return answers


@dataclass
class Replayed:
    events: list[ev.Event]  # what the core reported
    output: bytes  # what the core wrote
    answered: int  # how many answers it asked for
    recorded: bytes  # what the recorded milter wrote
    recorded_answers: int  # how many answers the recorded milter gave after negotiation


def replay_conversation(conversation: Conversation, size: int) -> Replayed:
    """Feed the MTA side to a fresh core ``size`` bytes at a time (0: all at once)."""
    stream, recorded = conversation.stream(TO_MILTER), conversation.stream(TO_MTA)
    replies = frames(recorded)
    assert replies[0][0] == b"O", "the capture does not start with option negotiation"
    answers = recorded_answers(replies[1:])
    core = MilterConnection(options_from_reply(replies[0][1]), peer="capture")
    result = Replayed([], b"", 0, recorded, len(answers))
    queue = iter(answers)

    def drain() -> None:
        while (event := core.next_event()) is not None:
            result.events.append(event)
            if event.needs_reply:
                core.send_reply(next(queue))
                result.answered += 1
        result.output += core.data_to_send()

    step = size or len(stream)
    for start in range(0, len(stream), step):
        core.receive_data(stream[start : start + step])
        drain()
    core.receive_data(b"")
    drain()
    return result
