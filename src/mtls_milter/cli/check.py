"""``mtls-milter check``: evaluate one case offline and explain the result."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from dataclasses import replace
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from mtls_milter.config import Config, ConfigError, load_config
from mtls_milter.core.certs import CertificateInputError, parse_certificates
from mtls_milter.core.clock import Clock, FixedClock, SystemClock
from mtls_milter.core.dmarc_message import DmarcOutcome, MessageFacts
from mtls_milter.core.evaluate import Transaction, Verdict
from mtls_milter.core.evidence import Evidence, chain_evidence, mta_evidence
from mtls_milter.core.header import render_field
from mtls_milter.core.quote import quote
from mtls_milter.endpoints import check_dns_option
from mtls_milter.engine import Engine
from mtls_milter.errors import InputError
from mtls_milter.runtime.options import (
    add_command,
    add_config_option,
    add_dns_option,
    add_trust_options,
)

__all__ = ["InputError", "add_parser", "explain", "run"]  # probe and acme raise InputError too


def add_parser(commands: Any) -> None:
    """Register the ``check`` subcommand."""
    parser = add_command(
        commands,
        "check",
        summary="evaluate one case offline",
        description="Evaluate one transaction offline: the MAIL FROM address and either a "
        "certificate chain or a CN the MTA verified. Exit 0 when a result was computed.",
    )
    parser.add_argument("--mail-from", required=True, metavar="ADDR", help="envelope sender")
    evidence = parser.add_mutually_exclusive_group(required=True)
    evidence.add_argument("--chain", metavar="PEM", help="client chain: leaf + intermediates")
    evidence.add_argument("--mta-cn", metavar="NAME", help="CN of a certificate the MTA verified")
    parser.add_argument("--helo", default="", metavar="NAME", help="HELO/EHLO name")
    add_config_option(parser)
    add_dns_option(parser)
    add_trust_options(parser, "extra trust anchors (repeatable)")
    parser.add_argument("--at", metavar="ISO-8601", help="validation time (default: now)")
    parser.add_argument("--authserv-id", metavar="ID", help="authserv-id for the header")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--message",
        metavar="FILE.eml",
        help="also evaluate DMARC for this raw message (DKIM verified from it; docs/dmarc.md)",
    )
    parser.add_argument(
        "--from", dest="author", metavar="ADDR", help="author address instead of the From field"
    )
    parser.add_argument("--client-ip", metavar="IP", help="SMTP client address, for SPF")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print; raises InputError for unusable input."""
    config = _effective_config(_load(args.config), args)
    try:
        engine = Engine.from_config(config, _clock(args.at))
    except CertificateInputError as exc:
        raise InputError(f"trust anchors: {exc}") from None
    transaction = Transaction(mail_from=args.mail_from, helo=args.helo)
    verdict = engine.evaluate(transaction, _evidence(args))
    authserv_id = args.authserv_id or config.milter.authserv_id or socket.gethostname()
    field = verdict.header_field(authserv_id)
    outcome = None
    if args.message is not None:
        outcome = engine.dmarc(_message_facts(args), verdict)
        field = replace(field, more=outcome.methods)
    header = render_field(field)
    if args.json:
        extra = {"dmarc": outcome.as_dict()} if outcome else {}
        print(json.dumps({**verdict.as_dict(), "header": header, **extra}, indent=2))
    else:
        sys.stdout.write(explain(verdict, header, outcome))
    return 0


def _message_facts(args: argparse.Namespace) -> MessageFacts:
    """The DMARC inputs of ``--message`` (and ``--from``, ``--client-ip``)."""
    try:
        raw = Path(args.message).read_bytes()
    except OSError as exc:
        raise InputError(f"--message {args.message}: {exc.strerror or exc}") from None
    # compat32 keeps every field's value as received (bytes that are not UTF-8 as surrogates).
    headers = BytesParser(policy=compat32).parsebytes(raw, headersonly=True)
    from_fields: list[str | bytes] = [str(v) for v in headers.get_all("From", [])]
    if args.author is not None:
        from_fields = [args.author]
    return MessageFacts(
        from_fields=from_fields,
        results_fields=[str(v) for v in headers.get_all("Authentication-Results", [])],
        raw_message=raw,
        client_ip=args.client_ip or "",
        mail_from=args.mail_from,
        helo=args.helo,
    )


def _effective_config(config: Config, args: argparse.Namespace) -> Config:
    """The configuration with the command line's DNS and trust overrides applied."""
    skip_system = args.no_system_trust
    trust = [source for source in config.tls.trust if not (skip_system and source == "system")]
    trust += args.trust
    if not trust:
        raise InputError("no trust anchors: --no-system-trust needs at least one --trust PEM")
    return replace(
        config,
        # One-shot command: no cache, so every run asks the name server afresh.
        dns=replace(config.dns, nameservers=_nameservers(config, args.dns), cache_size=0),
        tls=replace(config.tls, trust=tuple(trust)),
    )


def explain(verdict: Verdict, header: str, outcome: DmarcOutcome | None = None) -> str:
    """A readable account of a verdict for an operator."""
    lines = [
        f"result:    {verdict.result}",
        f"reason:    {verdict.reason}",
        f"domain:    {verdict.domain or '(none)'} (smtp.{verdict.identity})",
        f"evidence:  {verdict.evidence}",
        f"names:     {', '.join(verdict.names) or '(none)'}",
        f"published: {', '.join(verdict.hosts) or '(none)'}",
    ]
    if verdict.matched:
        lines.append(f"matched:   {verdict.matched} in {verdict.source}")
    if outcome is not None:
        dmarc = outcome.result
        aligned = ",".join(dmarc.aligned) or "nothing"
        lines.append(f"dmarc:     {dmarc.result} for {dmarc.domain or '(no domain)'}")
        lines.append(f"           policy {dmarc.policy or '(none)'}, aligned {aligned}")
        lines.append(f"           {dmarc.reason}; action {outcome.decision.action}")
    lines.append(f"header:    {header}")
    return "\n".join(lines) + "\n"


def _load(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise InputError(str(exc)) from None


def _clock(at: str | None) -> Clock:
    if at is None:
        return SystemClock()
    try:
        instant = datetime.fromisoformat(at)
    except ValueError:
        raise InputError(f"--at {quote(at)} is not an ISO-8601 date/time") from None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return FixedClock(instant)


def _nameservers(config: Config, overrides: list[str]) -> tuple[str, ...]:
    check_dns_option(overrides)
    return tuple(overrides) or config.dns.nameservers


def _evidence(args: argparse.Namespace) -> Evidence:
    if args.mta_cn is not None:
        return mta_evidence(args.mta_cn)
    try:
        data = Path(args.chain).read_bytes()
    except OSError as exc:
        raise InputError(f"--chain {args.chain}: {exc.strerror or exc}") from None
    try:
        return chain_evidence(parse_certificates(data))
    except CertificateInputError as exc:
        raise InputError(f"--chain {args.chain}: {exc}") from None
