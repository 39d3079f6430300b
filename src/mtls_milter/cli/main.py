"""The ``mtls-milter`` command line: argument parsing and dispatch to the subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from mtls_milter import __version__
from mtls_milter.acme import cli as acme_cli
from mtls_milter.cli import check, config_test, explain, record
from mtls_milter.errors import InputError
from mtls_milter.inbound import daemon as serve
from mtls_milter.outbound import policy_map, probe

EXIT_OK = 0
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad usage or unreadable input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser for all subcommands."""
    parser = _Parser(
        prog="mtls-milter",
        description="Authenticate the MAIL FROM domain of inbound mail by mutual TLS "
        "and Client MX.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    check.add_parser(commands)
    config_test.add_parser(commands)
    explain.add_parser(commands)
    record.add_parser(commands)
    serve.add_parser(commands)
    policy_map.add_parser(commands)
    probe.add_parser(commands)
    acme_cli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.handler(args)
    except InputError as exc:
        print(f"mtls-milter: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return status
