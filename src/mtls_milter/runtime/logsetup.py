"""Logging for the foreground daemons (serve, policy-map, acme respond): one option, one format.

Under systemd stderr is connected to the journal, which reads a ``<N>`` prefix on each line as
the syslog priority (sd-daemon(3)); ``journalctl -p warning`` then shows warnings and errors
only. systemd says stderr is the journal by setting ``JOURNAL_STREAM`` to the stream's
``device:inode``; only then are the prefixes written, so a terminal or a log file sees none.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TextIO

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def add_log_level_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level`` to a daemon subcommand."""
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: err 3, warning 4, info 6, debug 7, crit 2."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """Prefixes every line of a record with ``<N>`` (continuation lines too: the journal reads
    each line as its own entry)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def stream_is_journal(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd names in ``JOURNAL_STREAM``."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        stat = os.fstat(stream.fileno())
        return (int(device), int(inode)) == (stat.st_dev, stat.st_ino)
    except (ValueError, OSError):
        return False


def configure_logging(level: str) -> None:
    """Log to stderr (journald under systemd, with priorities) at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    journal = stream_is_journal(sys.stderr)
    handler.setFormatter(JournalFormatter(LOG_FORMAT) if journal else logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
