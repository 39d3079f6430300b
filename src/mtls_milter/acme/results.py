"""What an ACME over (Client) MX validation is asked and what it answers.

The challenge types, the validator's policy (limits and choices) and the result of one
validation, per host and per address, with RFC 8555 problem types. The validation itself is
:mod:`mtls_milter.acme.validator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "AddressResult",
    "ChallengeType",
    "HostResult",
    "Problem",
    "Status",
    "ValidationResult",
    "ValidatorPolicy",
]


class ChallengeType(StrEnum):
    """The two challenge types of the draft."""

    CLIENT_MX = "client-mx-http-01"
    SERVER_MX = "server-mx-http-01"

    @property
    def record(self) -> str:
        """The record name used in messages."""
        return "Client MX" if self is ChallengeType.CLIENT_MX else "MX"


class Status(StrEnum):
    """Outcome: RFC 8555 challenge statuses ``valid``/``invalid``, plus ``error`` for DNS."""

    VALID = "valid"
    INVALID = "invalid"
    ERROR = "error"  # DNS trouble (SERVFAIL, timeout, malformed answer): no verdict possible


class Problem(StrEnum):
    """RFC 8555 §6.7 error type (``urn:ietf:params:acme:error:<value>``); "" when valid."""

    NONE = ""
    DNS = "dns"
    CONNECTION = "connection"
    UNAUTHORIZED = "unauthorized"


@dataclass(frozen=True, slots=True)
class ValidatorPolicy:
    """Limits and choices; the defaults are what a production CA should use."""

    port: int = 80  # RFC 8555 §8.3 says 80; other values are for tests
    request_timeout: float = 10.0  # one HTTP exchange (connect + TLS + request + response)
    deadline: float = 60.0  # the whole validation, DNS included
    max_redirects: int = 10
    max_body: int = 8192
    all_addresses: bool = True  # every address of every host must answer (else: any address)
    public_only: bool = False  # refuse non-global addresses (loopback, RFC 1918, ...)
    max_parallel: int = 16
    # Every host must answer, so each one costs the CA fetches. Client MX never has more than
    # 10 hosts; ordinary MX has no limit in RFC 5321, so a domain could name thousands.
    max_hosts: int = 32

    @property
    def redirect_ports(self) -> frozenset[int]:
        """Ports a redirect may name: 80 and 443, plus the configured port."""
        return frozenset({80, 443, self.port})


@dataclass(frozen=True, slots=True)
class AddressResult:
    """The check of one address of one host (after any redirects)."""

    address: str
    status: Status
    reason: str
    problem: Problem = Problem.NONE
    url: str = ""  # the last URL requested
    http_status: int | None = None
    redirects: tuple[str, ...] = ()  # URLs redirected to, in order
    elapsed: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "address": self.address,
            "status": str(self.status),
            "reason": self.reason,
            "problem": str(self.problem) or None,
            "url": self.url,
            "http_status": self.http_status,
            "redirects": list(self.redirects),
            "elapsed": round(self.elapsed, 3),
        }


@dataclass(frozen=True, slots=True)
class HostResult:
    """The check of one (Client) MX host: all its addresses."""

    host: str
    status: Status
    reason: str
    problem: Problem = Problem.NONE
    addresses: tuple[AddressResult, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "host": self.host,
            "status": str(self.status),
            "reason": self.reason,
            "problem": str(self.problem) or None,
            "addresses": [a.as_dict() for a in self.addresses],
        }


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """The outcome of one challenge validation."""

    challenge_type: ChallengeType
    domain: str
    token: str
    key_authorization: str
    status: Status
    reason: str
    problem: Problem = Problem.NONE
    hosts: tuple[HostResult, ...] = ()
    null_mx: bool = False
    implicit_mx: bool = False
    all_addresses: bool = True
    elapsed: float = 0.0

    @property
    def valid(self) -> bool:
        """True only for ``valid``."""
        return self.status is Status.VALID

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the CLI's ``--json`` output)."""
        return {
            "type": str(self.challenge_type),
            "domain": self.domain,
            "token": self.token,
            "key_authorization": self.key_authorization,
            "status": str(self.status),
            "reason": self.reason,
            "problem": str(self.problem) or None,
            "requirement": "all hosts, "
            + ("every address of each" if self.all_addresses else "any address of each"),
            "null_mx": self.null_mx,
            "implicit_mx": self.implicit_mx,
            "hosts": [h.as_dict() for h in self.hosts],
            "elapsed": round(self.elapsed, 3),
        }
