"""``mtls-milter explain``: why a message got its mtls result, step by step, and what now.

Finds the milter's verdict line for a queue id in the log (or reads one on stdin), then looks up
the sender domain's Client MX again and re-runs the evaluation with the current configuration
on what the line recorded (:mod:`.explain_rerun`). docs/troubleshooting.md shows how to use it.
Exit status: 0 the re-run agrees with the log, 1 it differs (DNS or the configuration changed),
2 usage or input errors, 3 the queue id is not in the log.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from mtls_milter.cli.explain_line import LoggedVerdict, has_verdict, parse_verdict_line
from mtls_milter.cli.explain_report import render_json, render_text, report
from mtls_milter.config import Config, ConfigError, load_config
from mtls_milter.core.quote import clip, quote
from mtls_milter.endpoints import check_dns_option
from mtls_milter.errors import InputError
from mtls_milter.net.dns import DnsResolver
from mtls_milter.runtime.options import add_command, add_config_option, add_dns_option

EXIT_AGREES = 0
EXIT_DIFFERS = 1
EXIT_NOT_FOUND = 3
JOURNAL_UNIT = "mtls-milter"
DEFAULT_LOG_FILES = ("/var/log/mail.log", "/var/log/maillog")
MAX_STDIN = 1024 * 1024  # characters of a verdict line (or a few) on stdin
_QUEUE_ID = re.compile(r"[!-~]{1,100}")  # Postfix and Sendmail ids are letters and digits


class NotFound(Exception):
    """The queue id has no verdict line in the searched logs."""


def add_parser(commands: Any) -> None:
    """Register the ``explain`` subcommand."""
    parser = add_command(
        commands,
        "explain",
        summary="explain the verdict of one message, and re-run it now",
        description="Find the milter's verdict line for QUEUEID in the log (or read one on "
        "stdin with '-'), show what was logged, look up the sender domain's Client MX again, "
        "compare the certificate names from the log with each published host, and re-run the "
        "evaluation with the current configuration. Exit 0 the re-run agrees with the log, 1 "
        "it differs, 2 usage or input error, 3 QUEUEID not found.",
    )
    parser.add_argument(
        "queue_id", metavar="QUEUEID", help="the message's queue id; '-': a verdict line on stdin"
    )
    parser.add_argument(
        "--log",
        action="append",
        default=[],
        metavar="FILE",
        help="log file to search (repeatable; .gz read too; '-' for stdin; default: the journal "
        f"of {JOURNAL_UNIT}.service, else {' and '.join(DEFAULT_LOG_FILES)})",
    )
    add_config_option(parser)
    add_dns_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Find, re-run, print; raises InputError for unusable input."""
    try:
        logged = _from_stdin() if args.queue_id == "-" else find(args.queue_id, args.log)
    except NotFound as exc:
        print(f"mtls-milter: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    config = _effective_config(_load(args.config), args.dns)
    explanation = report(logged, config, DnsResolver.from_config(config.dns))
    if args.json:
        print(json.dumps(render_json(explanation), indent=2))
    else:
        sys.stdout.write(render_text(explanation))
    return EXIT_AGREES if explanation.agrees else EXIT_DIFFERS


def _load(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise InputError(str(exc)) from None


def _effective_config(config: Config, dns: list[str]) -> Config:
    """``--dns`` instead of the configured name servers; no cache: a one-shot asks afresh."""
    check_dns_option(dns)
    nameservers = tuple(dns) or config.dns.nameservers
    return replace(config, dns=replace(config.dns, nameservers=nameservers, cache_size=0))


def _from_stdin() -> LoggedVerdict:
    """The last verdict line on stdin."""
    text = sys.stdin.read(MAX_STDIN + 1)
    if len(text) > MAX_STDIN:
        raise InputError(f"more than {MAX_STDIN} characters on stdin; pass one verdict line")
    lines = [line for line in text.splitlines() if has_verdict(line)]
    if not lines:
        raise InputError("no verdict line on stdin (expected '... verdict {...}')")
    return parse_verdict_line(lines[-1])


def find(queue_id: str, logs: list[str]) -> LoggedVerdict:
    """The last verdict line for ``queue_id`` in ``logs`` (default: journal, then mail logs)."""
    if not _QUEUE_ID.fullmatch(queue_id):
        raise InputError(f"{quote(queue_id, 60)} is not a queue id (printable, no spaces)")
    searched: list[str] = []
    for name, lines in _sources(logs):
        searched.append(name)
        found = search(lines, queue_id)
        if found is not None:
            return found
    if not searched:
        raise InputError(f"no log to search: none of {', '.join(DEFAULT_LOG_FILES)}; use --log")
    raise NotFound(f"no verdict line for queue id {queue_id} in {', '.join(searched)}")


def search(lines: Iterable[str], queue_id: str) -> LoggedVerdict | None:
    """The last parsable verdict line whose ``queue_id`` is ``queue_id``.

    A line that mentions the id but cannot be read is an error only when no readable one does.
    """
    found: LoggedVerdict | None = None
    problem: InputError | None = None
    for line in lines:
        if queue_id not in line or not has_verdict(line):
            continue  # cheap: most lines of a mail log are someone else's
        try:
            logged = parse_verdict_line(line)
        except InputError as exc:
            problem = exc
            continue
        if logged.queue_id == queue_id:
            found = logged
    if found is None and problem is not None:
        raise InputError(f"the verdict line for {queue_id} is unreadable: {problem}")
    return found


def _sources(logs: list[str]) -> Iterator[tuple[str, Iterable[str]]]:
    """(name, lines) of each log to search, in order."""
    if logs:
        for path in logs:
            yield path, _file_lines(path)
        return
    if shutil.which("journalctl"):
        yield f"the journal of {JOURNAL_UNIT}.service", _journal_lines()
    for path in DEFAULT_LOG_FILES:
        if Path(path).exists():
            yield path, _file_lines(path)


def _file_lines(path: str) -> Iterator[str]:
    if path == "-":
        yield from sys.stdin
        return
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as opened:
            yield from opened
    except (OSError, EOFError) as exc:  # EOFError: a cut-off .gz
        raise InputError(f"--log {clip(path)}: {getattr(exc, 'strerror', None) or exc}") from None


def _journal_lines() -> Iterator[str]:
    """The unit's journal with a time on each line (short-iso; the marker finds the message)."""
    command = ["journalctl", "-u", JOURNAL_UNIT, "-o", "short-iso", "--no-pager", "-q"]
    try:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace"
        ) as process:
            assert process.stdout is not None
            yield from process.stdout
    except OSError as exc:
        raise InputError(f"journalctl: {exc.strerror or exc}") from None
