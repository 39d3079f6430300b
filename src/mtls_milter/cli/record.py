"""``mtls-milter record``: the Client MX records a sending domain publishes, ready to paste.

Client MX is a record type DNS servers do not know by name, so it is written in the generic
syntax of RFC 3597 (``TYPE265 \\# LENGTH HEX``), which BIND, Knot DNS, NSD and PowerDNS accept.
The rdata is MX's: a 16-bit preference and the host name, uncompressed (RFC 3597 §4).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from mtls_milter.config import DEFAULT_CLIENT_MX_TYPE
from mtls_milter.core.names import normalize_domain, normalize_host
from mtls_milter.errors import InputError
from mtls_milter.runtime.options import add_command

DEFAULT_TTL = 3600


def add_parser(commands: Any) -> None:
    parser = add_command(
        commands,
        "record",
        summary="print the Client MX records for a sending domain (BIND, Knot, NSD, PowerDNS)",
        description="Print the Client MX records naming the hosts that send DOMAIN's mail, in "
        "RFC 3597 generic syntax for zone files (BIND, Knot DNS, NSD), as pdnsutil commands "
        "(PowerDNS) and as dnsmasq options, plus what else each host needs.",
    )
    parser.add_argument("--domain", required=True, metavar="D", help="the sending domain")
    parser.add_argument(
        "--host",
        required=True,
        action="append",
        metavar="H",
        help="a host that sends D's mail (repeatable; preferences 10, 20, … in this order)",
    )
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="seconds (default 3600)")
    parser.add_argument(
        "--type",
        type=int,
        default=DEFAULT_CLIENT_MX_TYPE,
        dest="rrtype",
        help=f"record type number (default {DEFAULT_CLIENT_MX_TYPE})",
    )
    parser.set_defaults(handler=run_record)


def mx_rdata(preference: int, host: str) -> bytes:
    """MX wire format: preference, then ``host`` as uncompressed labels (a normalized name)."""
    labels = b"".join(bytes([len(label)]) + label.encode("ascii") for label in host.split("."))
    return preference.to_bytes(2, "big") + labels + b"\x00"


def record_lines(
    domain: str,
    hosts: Sequence[str],
    *,
    ttl: int = DEFAULT_TTL,
    rrtype: int = DEFAULT_CLIENT_MX_TYPE,
) -> list[str]:
    """The text ``record`` prints; InputError for a bad name, TTL or type."""
    if not 0 <= ttl <= 2**31 - 1:
        raise InputError(f"--ttl {ttl}: not between 0 and 2147483647")
    if not 1 <= rrtype <= 65535:
        raise InputError(f"--type {rrtype}: not a record type number")
    domain = normalize_domain(domain)
    names = list(dict.fromkeys(normalize_host(h) for h in hosts))
    rdatas = [mx_rdata(10 * (i + 1), name) for i, name in enumerate(names)]
    generic = [f"\\# {len(r)} {r.hex()}" for r in rdatas]
    return [
        f"; Client MX of {domain}: the hosts that send its mail (type {rrtype}, RFC 3597 syntax)",
        "; BIND, Knot DNS, NSD: zone file lines",
        *(f"{domain}. {ttl} IN TYPE{rrtype} {g}" for g in generic),
        "; PowerDNS (the domain is the zone apex; otherwise give its name relative to the zone)",
        f"pdnsutil add-record {domain} @ TYPE{rrtype} {ttl} " + " ".join(f"'{g}'" for g in generic),
        "; dnsmasq",
        *(f"dns-rr={domain},{rrtype},{r.hex()}" for r in rdatas),
        "; Each host also needs address records (A/AAAA) and a certificate naming it in",
        "; subjectAltName, which it presents as its TLS client certificate when it sends:",
        *(f";   {name}. {ttl} IN A <address of {name}>" for name in names),
        f"; Check from outside: mtls-milter probe --sender {domain}",
    ]


def run_record(args: argparse.Namespace) -> int:
    print("\n".join(record_lines(args.domain, args.host, ttl=args.ttl, rrtype=args.rrtype)))
    return 0
