"""Logging for the foreground daemons (serve, policy-map, acme respond): one option, one format.

``--log-format text`` (the default) writes ``LEVEL logger: message``; ``--log-format json`` one
JSON object per line for every record (``level``, ``logger``, ``message``, ``exception``), and a
record that carries structured fields (the verdict line's ``extra={"fields": {...}}``) has them
as members of that object, not as a string inside a string.

Under systemd stderr is connected to the journal, which reads a ``<N>`` prefix on each line as
the syslog priority (sd-daemon(3)); ``journalctl -p warning`` then shows warnings and errors
only. systemd says stderr is the journal by setting ``JOURNAL_STREAM`` to the stream's
``device:inode``; only then are the prefixes written, so a terminal or a log file sees none.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, TextIO

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=str)


def add_log_level_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level`` to a daemon subcommand."""
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)


def add_log_format_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-format text|json`` to a daemon subcommand."""
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text: LEVEL logger: message; json: one JSON object per line (default: text)",
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per record; structured ``fields`` (``extra``) become its members."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"level": record.levelname, "logger": record.name}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out["message"] = getattr(record, "event", None) or record.getMessage()
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(out)


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


class JournalJsonFormatter(JsonFormatter):
    """JSON lines with the journal's ``<N>`` priority prefix."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>" + super().format(record)


# The --log-format of the running command (set around its handler by runtime.options), so every
# daemon's configure_logging(level) call honours it without passing it along.
command_log_format = "text"


def configure_logging(level: str, log_format: str | None = None) -> None:
    """Log to stderr (journald under systemd, with priorities) at ``level`` in ``log_format``
    (default: the command line's ``--log-format``).

    Records skip what no format shows: the caller's source line, thread and process names
    (each costs a look-up per record on the hot path).
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no stack walk for %(pathname)s/%(funcName)s: nothing shows them
    handler = logging.StreamHandler(sys.stderr)
    journal = stream_is_journal(sys.stderr)
    formatter: logging.Formatter
    if (log_format or command_log_format) == "json":
        formatter = JournalJsonFormatter() if journal else JsonFormatter()
    else:
        formatter = JournalFormatter(LOG_FORMAT) if journal else logging.Formatter(LOG_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler])
