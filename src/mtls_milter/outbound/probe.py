"""``mtls-milter probe DOMAIN``: check a domain's MX hosts as a strict sender would.

For every MX host and each of its addresses (A, then AAAA): connect, EHLO, STARTTLS with SNI =
the MX host name, record the TLS version and the whole served chain (pyOpenSSL: Python 3.11's
``ssl`` returns only the leaf), validate the chain with the serverAuth policy and check that the
MX name is among the certificate's names. Also reports whether the domain publishes Client MX and
what ``mtls-milter policy-map`` would answer for it.

Every address is probed in its own thread with one deadline (``--timeout``) for the whole
conversation, so a run takes about one timeout plus the DNS time, whatever the hosts do.

Exit status: 0 every address of every MX host verified; 1 some host failed (or the domain has no
MX host to check); 2 bad usage or unreadable input; 3 a DNS lookup failed (SERVFAIL, timeout).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from mtls_milter.config import DEFAULT_DNS_BUDGET, Config, ConfigError, load_config
from mtls_milter.core.certs import CertificateInputError, certificate_names, name_matches
from mtls_milter.core.chain import ChainValidator
from mtls_milter.core.lookups import HostLookup, LookupStatus
from mtls_milter.core.names import normalize_domain
from mtls_milter.core.outbound import tls_policy
from mtls_milter.core.quote import quote
from mtls_milter.endpoints import check_dns_option
from mtls_milter.errors import InputError
from mtls_milter.net.dns import DnsResolver
from mtls_milter.net.starttls import starttls_chain
from mtls_milter.net.trust import load_trust_anchors
from mtls_milter.runtime.options import (
    add_command,
    add_config_option,
    add_dns_option,
    add_trust_options,
)

__all__ = [
    "EXIT_DNS",
    "EXIT_FAILED",
    "EXIT_OK",
    "HostReport",
    "ProbeReport",
    "add_parser",
    "probe_domain",
    "run",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DNS = 3
SCHEMA_VERSION = 1
EHLO_NAME = "mtls-milter-probe.invalid"


def add_parser(commands: Any) -> None:
    """Register the ``probe`` subcommand."""
    parser = add_command(
        commands,
        "probe",
        summary="check the MX hosts of a domain (or the Client MX hosts of a sender)",
        description="Connect to every MX host (every A/AAAA address) of DOMAIN with STARTTLS "
        "and SNI, validate the served chain and the MX name, and report whether DOMAIN "
        "publishes Client MX. With --sender D, check the hosts D's Client MX names instead: "
        "each must serve a valid certificate naming it (what a receiver fetches for chain "
        "evidence). Exit 0 all verified, 1 some failed, 2 usage, 3 DNS failure.",
    )
    parser.add_argument("domain", metavar="DOMAIN", nargs="?", help="recipient domain to check")
    parser.add_argument(
        "--sender", metavar="D", help="check sending domain D's Client MX hosts instead"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--port", type=int, default=25, help="SMTP port (default 25)")
    add_dns_option(parser)
    add_trust_options(parser, "extra trust anchors")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds for the whole conversation with one address (default 10)",
    )
    add_config_option(parser)
    parser.set_defaults(handler=run)


@dataclass
class HostReport:
    """The outcome for one address of one MX host."""

    host: str
    address: str
    port: int
    connected: bool = False
    starttls: bool = False  # the server offered STARTTLS and accepted the command
    tls_version: str = ""
    chain_valid: bool = False
    error: str = ""
    names: tuple[str, ...] = ()
    name_matches: bool = False
    seconds: float = 0.0

    @property
    def verified(self) -> bool:
        """TLS with a valid chain naming the MX host."""
        return self.chain_valid and self.name_matches and not self.error

    def as_dict(self) -> dict[str, Any]:
        """The stable JSON form (see docs/outbound.md)."""
        return {
            "host": self.host,
            "address": self.address,
            "port": self.port,
            "connected": self.connected,
            "starttls": self.starttls,
            "tls_version": self.tls_version,
            "chain_valid": self.chain_valid,
            "names": list(self.names),
            "name_matches": self.name_matches,
            "verified": self.verified,
            "error": self.error,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class ProbeReport:
    """The outcome for a domain."""

    domain: str
    client_mx: HostLookup
    mx: HostLookup
    policy: str
    hosts: list[HostReport]
    dns_errors: list[str]
    sender: bool = False  # the hosts checked are the Client MX hosts, not the MX hosts

    @property
    def opted_in(self) -> bool | None:
        """True when the domain publishes Client MX; None when that lookup failed."""
        if self.client_mx.status is LookupStatus.TEMPFAIL:
            return None
        return self.client_mx.status is not LookupStatus.NOT_FOUND

    @property
    def exit_status(self) -> int:
        """0 all verified, 1 some failed or nothing to check, 3 DNS failure."""
        if self.dns_errors:
            return EXIT_DNS
        if self.hosts and all(h.verified for h in self.hosts):
            return EXIT_OK
        return EXIT_FAILED

    @property
    def verdict(self) -> str:
        """One word: ``verified``, ``failed``, ``no-mx`` or ``dns-error``."""
        if self.dns_errors:
            return "dns-error"
        if not self.hosts:
            return "no-client-mx" if self.sender else "no-mx"
        return "verified" if self.exit_status == EXIT_OK else "failed"

    def as_dict(self) -> dict[str, Any]:
        """The stable JSON form (see docs/outbound.md)."""
        return {
            "schema": SCHEMA_VERSION,
            "domain": self.domain,
            "checked": "client-mx" if self.sender else "mx",
            "opted_in": self.opted_in,
            "client_mx": _lookup_dict(self.client_mx),
            "mx": _lookup_dict(self.mx),
            "policy": self.policy,
            "hosts": [h.as_dict() for h in self.hosts],
            "dns_errors": list(self.dns_errors),
            "verdict": self.verdict,
            "exit_status": self.exit_status,
        }


def _lookup_dict(lookup: HostLookup) -> dict[str, Any]:
    return {
        "status": lookup.status.value,
        "hosts": list(lookup.hosts),
        "null": lookup.null,
        "detail": lookup.detail,
    }


# -- the command --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Probe and print; raises InputError for unusable input."""
    if (args.domain is None) == (args.sender is None):
        raise InputError("give either DOMAIN or --sender D")
    try:
        domain = normalize_domain(args.sender or args.domain)
    except ValueError as exc:
        raise InputError(f"DOMAIN {quote(args.sender or args.domain)}: {exc}") from None
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: expected 1-65535")
    if not 0 < args.timeout <= 600:
        raise InputError(f"--timeout {args.timeout:g}: expected more than 0 and at most 600")
    config = _load(args.config)
    check_dns_option(args.dns)
    nameservers = tuple(args.dns) or config.dns.nameservers
    trust = [s for s in config.tls.trust if not (args.no_system_trust and s == "system")]
    trust += args.trust
    if not trust:
        raise InputError("no trust anchors: --no-system-trust needs at least one --trust PEM")
    try:
        anchors = load_trust_anchors(trust)
        validator = ChainValidator(anchors, min_rsa_bits=config.tls.min_rsa_bits)
    except CertificateInputError as exc:
        raise InputError(f"trust anchors: {exc}") from None
    dns_config = replace(config.dns, nameservers=nameservers)
    try:
        resolver = DnsResolver.from_config(dns_config)
    except ValueError as exc:
        raise InputError(f"DNS: {exc}") from None
    report = probe_domain(
        domain,
        resolver,
        validator,
        port=args.port,
        timeout=args.timeout,
        budget=dns_config.budget,
        sender=args.sender is not None,
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        sys.stdout.write(render_table(report))
    return report.exit_status


def _load(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise InputError(str(exc)) from None


def probe_domain(
    domain: str,
    resolver: DnsResolver,
    validator: ChainValidator,
    *,
    port: int = 25,
    timeout: float = 10.0,
    budget: float = DEFAULT_DNS_BUDGET,
    now: datetime | None = None,
    sender: bool = False,
) -> ProbeReport:
    """Resolve ``domain`` and probe every address of every MX host (with ``sender``: of every
    Client MX host) concurrently."""
    at = now or datetime.now(UTC)
    client_mx = resolver.client_mx(domain, budget)
    mx = resolver.server_mx(domain, budget)
    policy = tls_policy(domain, resolver, budget).reply()  # served from the cache just filled
    dns_errors: list[str] = []
    if client_mx.status is LookupStatus.TEMPFAIL:
        dns_errors.append(f"Client MX: {client_mx.detail}")
    if mx.status is LookupStatus.TEMPFAIL:
        dns_errors.append(f"MX: {mx.detail}")
    targets: list[HostReport] = []
    checked = client_mx if sender else mx
    for host in checked.hosts if checked.status is LookupStatus.OK else ():
        addresses = resolver.addresses(host, budget)
        if addresses.status is LookupStatus.TEMPFAIL:
            dns_errors.append(f"{host}: {addresses.detail}")
        if not addresses.addresses:
            targets.append(HostReport(host, "", port, error=f"DNS: {addresses.detail}"))
        for address in addresses.addresses:
            targets.append(HostReport(host, address, port))
    to_probe = [t for t in targets if t.address]
    if to_probe:
        with ThreadPoolExecutor(min(32, len(to_probe)), thread_name_prefix="probe") as pool:
            list(pool.map(lambda t: _probe_address(t, validator, timeout, at), to_probe))
    return ProbeReport(domain, client_mx, mx, policy, targets, dns_errors, sender)


# -- one address --------------------------------------------------------------------------------


def _probe_address(
    report: HostReport, validator: ChainValidator, timeout: float, at: datetime
) -> None:
    start = time.monotonic()
    result = starttls_chain(
        report.address, report.port, report.host, timeout=timeout, ehlo_name=EHLO_NAME
    )
    report.connected = result.connected
    report.starttls = result.starttls
    report.tls_version = result.tls_version
    report.error = result.error
    if not result.error:
        _judge(report, result.chain, validator, at)
    report.seconds = time.monotonic() - start


def _judge(
    report: HostReport, chain: list[x509.Certificate], validator: ChainValidator, at: datetime
) -> None:
    if not chain:
        report.error = "no certificate presented"
        return
    report.names = certificate_names(chain[0])
    report.name_matches = any(
        name_matches(name, report.host, allow_wildcards=True) for name in report.names
    )
    verdict = validator.validate_server(chain, at, report.host)
    if verdict.valid:
        report.chain_valid = True
        return
    if report.name_matches or not report.names:
        report.error = f"chain invalid: {verdict.error}"
        return
    # Separate "wrong name" from "untrusted": validate again for a name the certificate has.
    other = report.names[0]
    if other.startswith("*."):
        other = "wildcard" + other[1:]
    second = validator.validate_server(chain, at, other)
    report.chain_valid = second.valid
    report.error = f"name mismatch: certificate names {', '.join(report.names)}, not {report.host}"
    if not second.valid:
        report.error += f"; chain invalid: {second.error}"


# -- text output --------------------------------------------------------------------------------


def render_table(report: ProbeReport) -> str:
    """A readable report for an operator."""
    opted = {True: "yes", False: "no", None: "unknown (lookup failed)"}[report.opted_in]
    client = ", ".join(report.client_mx.hosts) or (
        "null (0 .)" if report.client_mx.null else report.client_mx.detail or "-"
    )
    mx = ", ".join(report.mx.hosts) or ("null (0 .)" if report.mx.null else report.mx.detail)
    lines = [
        f"domain:     {report.domain}",
        f"opted in:   {opted} (Client MX: {client})",
        f"MX:         {mx}{' (implicit)' if report.mx.implicit else ''}",
        f"policy-map: {report.policy}",
        "",
    ]
    rows = [("HOST", "ADDRESS", "PORT", "TLS", "CHAIN", "NAME", "RESULT")]
    for h in report.hosts:
        rows.append(
            (
                h.host,
                h.address or "-",
                str(h.port),
                h.tls_version or ("no STARTTLS" if h.connected and not h.starttls else "-"),
                "valid" if h.chain_valid else ("invalid" if h.names else "-"),
                "match" if h.name_matches else ("mismatch" if h.names else "-"),
                "verified" if h.verified else f"FAILED: {h.error}",
            )
        )
    if report.hosts:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
        lines.append("")
    else:
        lines.append(f"no {'Client MX' if report.sender else 'MX'} host to check")
    for error in report.dns_errors:
        lines.append(f"DNS error: {error}")
    lines.append(f"verdict:    {report.verdict} (exit {report.exit_status})")
    return "\n".join(lines) + "\n"
