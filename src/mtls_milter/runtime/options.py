"""Command-line options several subcommands share, declared once.

Each subcommand's module registers its own parser (the CLI only collects them), so the shared
pieces live here, below every surface: the daemons' ``--config``, ``--log-level`` and
``--log-format``, and the ``--dns``/``--trust`` options of the offline commands (check, probe).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from mtls_milter.runtime import logsetup
from mtls_milter.runtime.logsetup import add_log_format_option, add_log_level_option

Handler = Callable[[argparse.Namespace], int]


def add_command(commands: Any, name: str, *, summary: str, description: str) -> Any:
    """Register subcommand ``name`` (``summary`` for the command list) and return its parser."""
    return commands.add_parser(name, help=summary, description=description)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: the TOML configuration (the built-in defaults without it)."""
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")


def add_daemon_options(parser: argparse.ArgumentParser, handler: Handler) -> None:
    """What every foreground service takes: ``--config``, ``--log-level``, ``--log-format``;
    then its handler."""
    add_config_option(parser)
    add_log_level_option(parser)
    add_log_format_option(parser)
    parser.set_defaults(handler=_with_log_format(handler))


def _with_log_format(handler: Handler) -> Handler:
    """``handler`` with the command's ``--log-format`` in force while it runs (its
    ``configure_logging`` call reads it)."""

    def run(args: argparse.Namespace) -> int:
        logsetup.command_log_format = getattr(args, "log_format", "text")
        try:
            return handler(args)
        finally:
            logsetup.command_log_format = "text"

    run.__doc__ = handler.__doc__
    return run


def add_dns_option(parser: argparse.ArgumentParser) -> None:
    """``--dns IP[:PORT]`` (repeatable): name servers replacing the configured ones."""
    parser.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="name server to ask (repeatable; default: the configuration, else the system's)",
    )


def add_trust_options(parser: argparse.ArgumentParser, trust_help: str) -> None:
    """``--trust PEM`` (repeatable) and ``--no-system-trust``."""
    parser.add_argument("--trust", action="append", default=[], metavar="PEM", help=trust_help)
    parser.add_argument(
        "--no-system-trust", action="store_true", help="do not trust the system CA bundle"
    )
