"""``mtls-milter acme validate`` and ``mtls-milter acme respond`` (docs/acme.md).

validate exit status: 0 valid, 1 invalid, 2 bad usage or unreadable input, 3 DNS error.
respond runs until SIGTERM/SIGINT; exit 1 when a listener cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from mtls_milter.acme.fetch import http_fetch
from mtls_milter.acme.keyauth import JwkError, check_thumbprint, jwk_thumbprint
from mtls_milter.acme.responder import Responder, run_until_signal
from mtls_milter.acme.results import ChallengeType, Status, ValidationResult, ValidatorPolicy
from mtls_milter.acme.validator import validate
from mtls_milter.config import DEFAULT_CLIENT_MX_TYPE, DEFAULT_DNS_TIMEOUT
from mtls_milter.endpoints import check_dns_option, parse_host_port
from mtls_milter.errors import InputError
from mtls_milter.net.dns import DnsResolver
from mtls_milter.runtime.logsetup import add_log_level_option, configure_logging

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_DNS_ERROR = 3
DEFAULT_LISTEN = ("0.0.0.0:80", "[::]:80")


def add_parser(commands: Any) -> None:
    """Register the ``acme`` subcommand group."""
    group = commands.add_parser(
        "acme",
        help="ACME over MX: validate client-mx-http-01 / server-mx-http-01, serve tokens",
        description="ACME challenges over (Client) MX: a CA-side validator and a token "
        "responder for MX hosts.",
    )
    sub = group.add_subparsers(dest="acme_command", metavar="ACTION", parser_class=type(group))
    sub.required = True
    _add_validate(sub)
    _add_respond(sub)


def _add_validate(sub: Any) -> None:
    parser = sub.add_parser(
        "validate",
        help="validate a challenge as a CA would",
        description="Resolve the domain's Client MX or MX hosts and fetch the key authorization "
        "from every address of every host. Exit 0 valid, 1 invalid, 2 bad usage, 3 DNS error.",
    )
    parser.add_argument("--type", required=True, choices=[str(t) for t in ChallengeType])
    parser.add_argument("--domain", required=True, metavar="D", help="the identifier")
    parser.add_argument(
        "--token",
        required=True,
        metavar="T",
        help="the challenge token; write --token=T, since a token may begin with '-'",
    )
    key = parser.add_mutually_exclusive_group(required=True)
    key.add_argument("--account-jwk", metavar="FILE", help="the account key as a JWK (JSON)")
    key.add_argument(
        "--thumbprint",
        metavar="X",
        help="base64url RFC 7638 thumbprint; write --thumbprint=X (it may begin with '-')",
    )
    parser.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="name server to ask (repeatable; default: the system's)",
    )
    parser.add_argument("--dns-timeout", type=float, default=DEFAULT_DNS_TIMEOUT, metavar="S")
    parser.add_argument(
        "--client-mx-type",
        type=int,
        default=DEFAULT_CLIENT_MX_TYPE,
        metavar="N",
        help="Client MX RR type",
    )
    parser.add_argument(
        "--port", type=int, default=80, help="HTTP port (RFC 8555: 80; others for tests)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per request")
    parser.add_argument("--deadline", type=float, default=60.0, metavar="S", help="overall")
    parser.add_argument("--max-redirects", type=int, default=10, metavar="N")
    parser.add_argument("--max-body", type=int, default=8192, metavar="BYTES")
    parser.add_argument(
        "--any-address",
        action="store_true",
        help="a host passes when one of its addresses answers (default: every address)",
    )
    parser.add_argument(
        "--public-only", action="store_true", help="refuse non-public (e.g. RFC 1918) addresses"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run_validate)


def _add_respond(sub: Any) -> None:
    parser = sub.add_parser(
        "respond",
        help="serve /.well-known/acme-challenge/<token> from DIR/<token>",
        description="Serve HTTP-01 key authorizations from files DIR/<token> on each MX host; "
        "404 for everything else. Runs until SIGTERM/SIGINT.",
    )
    parser.add_argument("--dir", required=True, metavar="DIR", help="token directory")
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="address to listen on (repeatable; default 0.0.0.0:80 and [::]:80)",
    )
    add_log_level_option(parser)
    parser.set_defaults(handler=run_respond)


def run_validate(args: argparse.Namespace) -> int:
    """Validate and print; InputError for unusable input."""
    thumbprint = _thumbprint(args)
    check_dns_option(args.dns)
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: not a TCP port")
    for name in ("timeout", "deadline", "dns_timeout"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if args.max_redirects < 0 or args.max_body < 1:
        raise InputError("--max-redirects must be >= 0 and --max-body >= 1")
    resolver = DnsResolver(args.dns, timeout=args.dns_timeout, client_mx_type=args.client_mx_type)
    policy = ValidatorPolicy(
        port=args.port,
        request_timeout=args.timeout,
        deadline=args.deadline,
        max_redirects=args.max_redirects,
        max_body=args.max_body,
        all_addresses=not args.any_address,
        public_only=args.public_only,
    )
    try:
        result = validate(
            args.type,
            args.domain,
            args.token,
            thumbprint,
            resolver=resolver,
            fetch=http_fetch,
            policy=policy,
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        sys.stdout.write(explain(result))
    return {
        Status.VALID: EXIT_VALID,
        Status.INVALID: EXIT_INVALID,
        Status.ERROR: EXIT_DNS_ERROR,
    }[result.status]


def explain(result: ValidationResult) -> str:
    """A readable account of a validation."""
    lines = [
        f"status:  {result.status}",
        f"reason:  {result.reason}",
        f"type:    {result.challenge_type} for {result.domain}",
        f"keyauth: {result.key_authorization}",
    ]
    for host in result.hosts:
        lines.append(f"host {host.host}: {host.status} - {host.reason}")
        for address in host.addresses:
            lines.append(f"  {address.address}: {address.status} - {address.reason}")
    return "\n".join(lines) + "\n"


def _thumbprint(args: argparse.Namespace) -> str:
    if args.thumbprint is not None:
        try:
            return check_thumbprint(args.thumbprint)
        except ValueError as exc:
            raise InputError(f"--thumbprint: {exc}") from None
    try:
        data = json.loads(Path(args.account_jwk).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"--account-jwk {args.account_jwk}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"--account-jwk {args.account_jwk}: not JSON: {exc}") from None
    try:
        return jwk_thumbprint(data)
    except JwkError as exc:
        raise InputError(f"--account-jwk {args.account_jwk}: {exc}") from None


def run_respond(args: argparse.Namespace) -> int:
    """Serve tokens until a signal; InputError for unusable arguments."""
    directory = Path(args.dir)
    if not directory.is_dir():
        raise InputError(f"--dir {args.dir}: not a directory")
    try:
        listen = [parse_host_port(text) for text in args.listen]
        optional = [] if listen else [parse_host_port(text) for text in DEFAULT_LISTEN]
    except ValueError as exc:
        raise InputError(f"--listen: {exc}") from None
    configure_logging(args.log_level)
    responder = Responder(directory, listen, optional=optional)
    try:
        asyncio.run(run_until_signal(responder))
    except OSError as exc:
        logging.getLogger("mtls_milter.acme.respond").error("cannot listen: %s", exc)
        return 1
    return 0
