"""``mtls-milter config-test``: check a configuration the way the daemons would read it.

Exit 0 and print nothing when it is usable; exit 1 with the first problem on stderr (like
``opendkim -n`` or ``postfix check``). Beyond the schema it checks what only shows at start-up:
trust anchor files, the directory of each unix socket, the ``[milter] user`` and ``group``.
"""

from __future__ import annotations

import argparse
import grp
import pwd
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtls_milter.config import Config, ConfigError, load_config
from mtls_milter.core.quote import quote
from mtls_milter.endpoints import parse_socket_spec
from mtls_milter.errors import MtlsMilterError
from mtls_milter.net.trust import load_trust_anchors
from mtls_milter.runtime.options import add_command, add_config_option

EXIT_OK = 0
EXIT_PROBLEM = 1


def add_parser(commands: Any) -> None:
    parser = add_command(
        commands,
        "config-test",
        summary="check a configuration file: exit 0, or 1 with the first problem",
        description="Read the configuration as `serve` and `policy-map` would and check trust "
        "anchors, socket directories and the user/group to run as. Prints nothing and exits 0 "
        "when it is usable; otherwise prints the first problem on stderr and exits 1.",
    )
    add_config_option(parser)
    parser.set_defaults(handler=run_config_test)


def _socket_problem(name: str, spec: str) -> str | None:
    if not spec:
        return None
    parsed = parse_socket_spec(spec)  # the schema accepted it already
    if parsed.kind != "unix":
        return None
    directory = Path(parsed.path).parent
    if not directory.is_dir():
        return f"{name} {quote(spec)}: directory {quote(str(directory))} does not exist"
    return None


def problems(config: Config) -> Iterator[str]:
    """What would stop or cripple the daemons, in the order they would meet it."""
    try:
        load_trust_anchors(config.tls.trust)
    except MtlsMilterError as exc:
        yield f"[tls] trust: {exc}"
    for name, spec in (
        ("[milter] socket", config.milter.socket),
        ("[policy_service] socket", config.policy_service.socket),
    ):
        problem = _socket_problem(name, spec)
        if problem:
            yield problem
    if config.milter.user:
        try:
            pwd.getpwnam(config.milter.user)
        except KeyError:
            yield f"[milter] user {quote(config.milter.user)}: no such user"
    if config.milter.group:
        try:
            grp.getgrnam(config.milter.group)
        except KeyError:
            yield f"[milter] group {quote(config.milter.group)}: no such group"


def run_config_test(args: argparse.Namespace) -> int:
    source = args.config or "built-in defaults"
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mtls-milter: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    for problem in problems(config):
        print(f"mtls-milter: {source}: {problem}", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK
