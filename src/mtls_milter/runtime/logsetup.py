"""Logging for the foreground daemons (serve, policy-map, acme respond): one option, one format."""

from __future__ import annotations

import argparse
import logging
import sys

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_log_level_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level`` to a daemon subcommand."""
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)


def configure_logging(level: str) -> None:
    """Log to stderr (journald under systemd) at ``level``."""
    logging.basicConfig(
        level=level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
