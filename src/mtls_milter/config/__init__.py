"""Configuration: one typed, validated, immutable object built once at start-up.

The file format is TOML; key names are those of the README's configuration reference. Every
default lives in this module.
An unknown key or a bad value raises :class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from mtls_milter.config import values as v
from mtls_milter.endpoints import parse_host_port, parse_nameserver, parse_socket_spec
from mtls_milter.errors import MtlsMilterError


class ConfigError(MtlsMilterError, ValueError):
    """A configuration problem, with a message an operator can act on."""


class EkuPolicy(StrEnum):
    """Which extended key usages a client certificate (and CAs carrying an EKU) may have."""

    SERVER_OR_CLIENT = "server-or-client"
    CLIENT = "client"
    ANY = "any"


class FailAction(StrEnum):
    """What to do with a message whose result is ``fail``."""

    ANNOTATE = "annotate"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


class MilterTransport(StrEnum):
    """Who speaks the milter protocol: libmilter via pymilter, or our own core on asyncio."""

    PYMILTER = "pymilter"
    ASYNCIO = "asyncio"


class TemperrorAction(StrEnum):
    """What to do with a message whose result is ``temperror``."""

    ANNOTATE = "annotate"
    TEMPFAIL = "tempfail"


DEFAULT_MILTER_SOCKET = "inet:8898@127.0.0.1"
DEFAULT_POLICY_MAP_SOCKET = "inet:8899@127.0.0.1"
DEFAULT_CLIENT_MX_TYPE = 265
DEFAULT_DNS_TIMEOUT = 2.0  # seconds, one lookup
DEFAULT_DNS_BUDGET = 5.0  # seconds, all DNS work for one message (or one socketmap request)
DEFAULT_DNS_CACHE_SIZE = 10_000  # answers kept
DEFAULT_MAX_CACHE_TTL = 3600  # seconds; longer TTLs are capped
DEFAULT_MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class MilterConfig:
    """``[milter]``: where the milter listens and how it writes its header."""

    socket: str = DEFAULT_MILTER_SOCKET
    authserv_id: str = ""  # empty: the MTA's ``j`` macro, else the host name
    delete_all_own_results: bool = False  # delete every field with our authserv-id, not only mtls
    user: str = ""  # when started as root: drop to this user after opening the socket
    group: str = ""  # ... and this group (default: the user's primary group)
    socket_mode: str = "0660"  # permissions of a unix socket (the MTA must be able to connect)
    transport: MilterTransport = MilterTransport.ASYNCIO
    workers: int = 1  # processes serving the milter socket ("auto": one per CPU)


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """``[dns]``: resolver, time limits, cache and the Client MX type number."""

    nameservers: tuple[str, ...] = ()  # empty: the system resolver (/etc/resolv.conf)
    timeout: float = DEFAULT_DNS_TIMEOUT
    budget: float = DEFAULT_DNS_BUDGET
    client_mx_type: int = DEFAULT_CLIENT_MX_TYPE
    cache_size: int = DEFAULT_DNS_CACHE_SIZE
    max_cache_ttl: int = DEFAULT_MAX_CACHE_TTL


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``[tls]``: trust anchors and the certificate policy."""

    trust: tuple[str, ...] = ("system",)  # "system" or PEM file paths
    eku: EkuPolicy = EkuPolicy.SERVER_OR_CLIENT
    allow_wildcards: bool = False
    min_rsa_bits: int = DEFAULT_MIN_RSA_BITS  # smallest RSA modulus, leaf and CA keys


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """``[policy]``: what to do with each result, fallbacks and exemptions."""

    on_fail: FailAction = FailAction.ANNOTATE
    on_temperror: TemperrorAction = TemperrorAction.ANNOTATE
    server_mx_fallback: bool = False
    helo_fallback: bool = False
    dry_run: bool = False
    internal_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyMapConfig:
    """``[policy_map]``: the Postfix ``smtp_tls_policy_maps`` socketmap service (outbound)."""

    socket: str = DEFAULT_POLICY_MAP_SOCKET  # libmilter syntax: inet:PORT@HOST or unix:/path
    map_name: str = "mtls"  # the NAME in Postfix's socketmap:inet:HOST:PORT:NAME
    report_only: bool = False  # log what would be enforced, answer NOTFOUND
    max_request: int = 1000  # bytes of one netstring payload; longer: PERM and close


@dataclass(frozen=True, slots=True)
class PolicyServiceConfig:
    """``[policy_service]``: Postfix policy delegation next to the milter (certificate facts)."""

    socket: str = ""  # empty: off; else libmilter syntax inet:PORT@HOST or unix:/path
    socket_mode: str = "0660"  # permissions of a unix socket (Postfix must be able to connect)


@dataclass(frozen=True, slots=True)
class ChainFetchConfig:
    """``[chain_fetch]``: fetch the client's chain from its host's SMTP port (docs/evidence.md)."""

    enabled: bool = True  # runs only when a fingerprint is known and the MTA evidence falls short
    port: int = 25
    timeout: float = 3.0  # seconds for the whole STARTTLS conversation with the client's host
    max_concurrent: int = 16  # fetches in flight; beyond that a message goes without
    allow_private: bool = False  # also fetch from private, loopback and other non-global addresses
    cache_ttl: int = 3600  # seconds a fetched chain is kept (by leaf fingerprint)
    negative_ttl: int = 300  # seconds an address whose fetch failed is not asked again


@dataclass(frozen=True, slots=True)
class DmarcConfig:
    """``[dmarc]``: DMARC (RFC 9989) with mtls as an authentication method (docs/dmarc.md)."""

    enabled: bool = False  # off: no From parsing, no DMARC lookups, no body for DKIM
    enforce: bool = False  # act on p=quarantine/p=reject failures; otherwise annotate only
    spf: str = "verify"  # "verify" here, "trusted-results" from trusted fields, or "off"
    dkim: str = "verify"
    trusted_authserv_ids: tuple[str, ...] = ()  # whose spf=/dkim= results "trusted-results" takes


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: Prometheus ``/metrics`` and ``/healthz`` over HTTP (docs/observability.md)."""

    listen: str = ""  # empty: off; else HOST:PORT or [IPv6]:PORT for `mtls-milter serve`
    policy_map_listen: str = ""  # the same for `mtls-milter policy-map` (a process of its own)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    milter: MilterConfig = field(default_factory=MilterConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    policy_map: PolicyMapConfig = field(default_factory=PolicyMapConfig)
    policy_service: PolicyServiceConfig = field(default_factory=PolicyServiceConfig)
    chain_fetch: ChainFetchConfig = field(default_factory=ChainFetchConfig)
    dmarc: DmarcConfig = field(default_factory=DmarcConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = "<built-in defaults>"


DMARC_INPUTS = ("verify", "trusted-results", "off")


_SCHEMA: dict[str, dict[str, v.Converter]] = {
    "milter": {
        "socket": v.checked_by(parse_socket_spec),
        "authserv_id": v.string,
        "delete_all_own_results": v.boolean,
        "user": v.string,
        "group": v.string,
        "socket_mode": v.octal_mode,
        "transport": v.enum_of(MilterTransport),
        "workers": v.workers,
    },
    "dns": {
        "nameservers": v.list_of(v.checked_by(parse_nameserver)),
        "timeout": v.number(0.05, 30),
        "budget": v.number(0.1, 60),
        "client_mx_type": v.integer(1, 65535),
        "cache_size": v.integer(0, 10_000_000),
        "max_cache_ttl": v.integer(0, 7 * 86400),
    },
    "tls": {
        "trust": v.list_of(v.trust_source),
        "eku": v.enum_of(EkuPolicy),
        "allow_wildcards": v.boolean,
        # Below 2048 the Web PKI verifier refuses CA keys anyway, and RSA-1024 is within reach
        # of a well-funded attacker; above 16384 nobody issues certificates.
        "min_rsa_bits": v.integer(2048, 16384),
    },
    "policy": {
        "on_fail": v.enum_of(FailAction),
        "on_temperror": v.enum_of(TemperrorAction),
        "server_mx_fallback": v.boolean,
        "helo_fallback": v.boolean,
        "dry_run": v.boolean,
        "internal_networks": v.list_of(v.network),
    },
    "policy_map": {
        "socket": v.checked_by(parse_socket_spec),
        "map_name": v.map_name,
        "report_only": v.boolean,
        "max_request": v.integer(64, 65536),
    },
    "policy_service": {
        "socket": v.checked_by(parse_socket_spec, optional=True),
        "socket_mode": v.octal_mode,
    },
    "chain_fetch": {
        "enabled": v.boolean,
        "port": v.integer(1, 65535),
        "timeout": v.number(0.1, 30),
        "max_concurrent": v.integer(1, 1024),
        "allow_private": v.boolean,
        "cache_ttl": v.integer(0, 7 * 86400),
        "negative_ttl": v.integer(0, 86400),
    },
    "dmarc": {
        "enabled": v.boolean,
        "enforce": v.boolean,
        "spf": v.one_of(DMARC_INPUTS),
        "dkim": v.one_of(DMARC_INPUTS),
        "trusted_authserv_ids": v.list_of(v.checked_by(v.authserv_id)),
    },
    "metrics": {
        "listen": v.checked_by(parse_host_port, optional=True),
        "policy_map_listen": v.checked_by(parse_host_port, optional=True),
    },
}


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML file; ``None`` gives the built-in defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_mapping(raw, source=str(path))


def config_from_mapping(raw: Mapping[str, Any], source: str = "<mapping>") -> Config:
    """Build a Config from already-parsed TOML data, validating every key."""
    sections: dict[str, dict[str, Any]] = {}
    for section_name, section in raw.items():
        if section_name not in _SCHEMA:
            known = ", ".join(f"[{name}]" for name in _SCHEMA)
            raise ConfigError(f"{source}: unknown section [{section_name}] (known: {known})")
        if not isinstance(section, Mapping):
            raise ConfigError(f"{source}: {section_name} must be a table, like [{section_name}]")
        sections[section_name] = _convert_section(section_name, section, source)
    config = Config(
        milter=replace(MilterConfig(), **sections.get("milter", {})),
        dns=replace(DnsConfig(), **sections.get("dns", {})),
        tls=replace(TlsConfig(), **sections.get("tls", {})),
        policy=replace(PolicyConfig(), **sections.get("policy", {})),
        policy_map=replace(PolicyMapConfig(), **sections.get("policy_map", {})),
        policy_service=replace(PolicyServiceConfig(), **sections.get("policy_service", {})),
        chain_fetch=replace(ChainFetchConfig(), **sections.get("chain_fetch", {})),
        dmarc=replace(DmarcConfig(), **sections.get("dmarc", {})),
        metrics=replace(MetricsConfig(), **sections.get("metrics", {})),
        source=source,
    )
    _check_cross_field(config)
    return config


def _convert_section(name: str, section: Mapping[str, Any], source: str) -> dict[str, Any]:
    schema = _SCHEMA[name]
    converted: dict[str, Any] = {}
    for key, value in section.items():
        if key not in schema:
            raise ConfigError(
                f"{source}: unknown key [{name}] {key} (known: {', '.join(sorted(schema))})"
            )
        try:
            converted[key] = schema[key](value)
        except ValueError as exc:
            raise ConfigError(f"{source}: [{name}] {key} = {value!r}: {exc}") from None
    return converted


def _check_cross_field(config: Config) -> None:
    if config.dns.timeout > config.dns.budget:
        raise ConfigError(
            f"{config.source}: [dns] timeout ({config.dns.timeout:g} s) exceeds [dns] budget "
            f"({config.dns.budget:g} s)"
        )
    dmarc = config.dmarc
    if "trusted-results" in (dmarc.spf, dmarc.dkim) and not dmarc.trusted_authserv_ids:
        raise ConfigError(f'{config.source}: [dmarc] "trusted-results" needs trusted_authserv_ids')
    if not config.tls.trust:
        raise ConfigError(f'{config.source}: [tls] trust is empty; use ["system"] or PEM paths')
    milter = config.milter
    if milter.workers > 1 and milter.transport is not MilterTransport.ASYNCIO:
        raise ConfigError(
            f'{config.source}: [milter] workers = {milter.workers} needs transport = "asyncio": '
            "libmilter (pymilter) opens its own socket and runs its own threads, so its "
            "process cannot be forked into workers (docs/operations.md, Workers)"
        )


def known_keys() -> dict[str, tuple[str, ...]]:
    """Section → key names, for documentation checks."""
    return {section: tuple(keys) for section, keys in _SCHEMA.items()}


def defaults_table() -> dict[str, dict[str, Any]]:
    """Section → key → default value, as written in a TOML file."""
    defaults = Config()
    return {
        section: {f.name: getattr(getattr(defaults, section), f.name) for f in fields(kind)}
        for section, kind in (
            ("milter", MilterConfig),
            ("dns", DnsConfig),
            ("tls", TlsConfig),
            ("policy", PolicyConfig),
            ("policy_map", PolicyMapConfig),
            ("policy_service", PolicyServiceConfig),
            ("chain_fetch", ChainFetchConfig),
            ("metrics", MetricsConfig),
        )
    }
