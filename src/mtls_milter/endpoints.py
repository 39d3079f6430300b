"""Addresses as operators write them: socket specs and ``HOST:PORT`` texts, parsed in one place.

Two grammars, each with one parser used everywhere it appears:

* a **socket spec**, libmilter's syntax, for every listening service (``[milter] socket``,
  ``[policy_service] socket``, ``[policy_map] socket``): ``unix:/path`` (or ``local:/path``),
  ``inet:PORT@HOST`` or ``inet6:PORT@HOST``;
* a **host and port**: ``IP[:PORT]`` / ``[IPv6]:PORT`` for name servers (``[dns] nameservers``,
  ``--dns``) and ``HOST:PORT`` / ``[IPv6]:PORT`` for ``acme respond --listen``.

Parsing only: nothing here opens a socket. Every malformed text is a :class:`ValueError` whose
message names the text; callers put it in a configuration or usage error.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from mtls_milter.errors import InputError

DNS_PORT = 53


@dataclass(frozen=True, slots=True)
class SocketSpec:
    """A parsed socket spec: ``kind`` is ``"unix"`` (with ``path``) or ``"inet"`` (host, port)."""

    kind: str
    path: str = ""
    host: str = ""  # without the brackets of an IPv6 literal
    port: int = 0


def parse_socket_spec(text: str, *, ephemeral_port: bool = False) -> SocketSpec:
    """Parse ``unix:/path``, ``inet:PORT@HOST`` or ``inet6:PORT@HOST``; ValueError says why not.

    Port 0 (an ephemeral port, for tests) is accepted only with ``ephemeral_port``; the
    configuration never accepts it.
    """
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError("expected unix:/path, inet:PORT@HOST or inet6:PORT@HOST")
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError("a unix socket needs an absolute path")
        return SocketSpec("unix", path=rest)
    if kind not in ("inet", "inet6"):
        raise ValueError(f"unknown socket family {kind!r}; expected unix, inet or inet6")
    port, _, host = rest.partition("@")
    if _port_number(port, lowest=0 if ephemeral_port else 1) is None:
        raise ValueError(f"bad port {port!r}")
    if not host:
        raise ValueError("expected inet:PORT@HOST")
    return SocketSpec("inet", host=host.strip("[]"), port=int(port))


def parse_nameserver(text: str) -> tuple[str, int]:
    """Split ``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or ``IPv6`` into (address, port)."""
    host, port_text = text, None
    if text.startswith("["):
        bracketed = _split_bracketed(text)
        if bracketed is None or (bracketed[1] and not bracketed[1].startswith(":")):
            raise ValueError(f"bad name server {text!r}")
        host = bracketed[0]
        if bracketed[1]:
            port_text = bracketed[1][1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    port = DNS_PORT if port_text is None else _port_number(port_text, lowest=1)
    if port is None:
        raise ValueError(f"bad port in {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"name server {text!r} is not an IP address (optionally :PORT)") from None
    return host, port


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port); port 0 allowed; ValueError if malformed."""
    if text.startswith("["):
        bracketed = _split_bracketed(text)
        if bracketed is None or not bracketed[1].startswith(":"):
            raise ValueError(f"bad listen address {text!r} (expected [IPv6]:PORT)")
        host, port_text = bracketed[0], bracketed[1][1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"bad listen address {text!r} (expected HOST:PORT or [IPv6]:PORT)")
    port = _port_number(port_text, lowest=0)
    if port is None:
        raise ValueError(f"bad port in listen address {text!r}")
    return host, port


def check_dns_option(servers: Sequence[str]) -> None:
    """Reject a bad ``--dns`` value of a command with an InputError naming the option."""
    for server in servers:
        try:
            parse_nameserver(server)
        except ValueError as exc:
            raise InputError(f"--dns: {exc}") from None


def _split_bracketed(text: str) -> tuple[str, str] | None:
    """``[ADDRESS]TAIL`` → (ADDRESS, TAIL); None without the closing bracket."""
    address, sep, tail = text[1:].partition("]")
    return (address, tail) if sep else None


def _port_number(text: str, *, lowest: int) -> int | None:
    if not text.isdigit() or not lowest <= int(text) < 65536:
        return None
    return int(text)
