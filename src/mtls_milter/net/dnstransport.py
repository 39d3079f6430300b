"""DNS transport for :class:`mtls_milter.net.dns.DnsResolver`, and texts for what went wrong.

dnspython's resolver sends each UDP query from an *unconnected* socket. Such a socket never
learns about the ICMP port-unreachable a host sends back when nothing listens on the DNS port,
so a stopped local resolver costs every lookup its full timeout. :class:`ConnectedDo53Nameserver`
connects its UDP socket to the server first: the kernel then reports the ICMP error as
ECONNREFUSED on the next receive, the lookup moves on to the next name server at once, and the
text says what happened.

A connected socket also receives datagrams only from the server's address and port, so a
datagram that is not a DNS message at all is the server's fault (an off-path attacker who could
guess our port could just as well forge an answer): it ends the query as a malformed answer
instead of being ignored until the timeout. A well-formed message that is not a response to our
query (wrong ID or question) is still ignored, as before.

The ``describe_*`` functions turn dnspython's per-server error list into one short text for a
reason: "SERVFAIL from 127.0.0.1:53", "no answer within 2 s from 127.0.0.1:53", "answer from
127.0.0.1:53 truncated over UDP and TCP failed: connection refused", "CNAME loop at a.example"...
Outside data in them (names from an answer, exception texts) is cut to 200 characters.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Any

import dns.exception
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mtls_milter.core.quote import clip
from mtls_milter.endpoints import parse_nameserver

__all__ = [
    "ConnectedDo53Nameserver",
    "MalformedAnswer",
    "describe_errors",
    "describe_timeout",
    "make_resolver",
    "negative_ttl",
    "udp_query",
]

MAX_DATAGRAM = 65535
NEGATIVE_TTL_WITHOUT_SOA = 60  # RFC 2308 gives no default; 60 s is what common resolvers use


class MalformedAnswer(dns.exception.FormError):
    """The server sent a datagram that is not a DNS message."""


class ConnectedDo53Nameserver(dns.nameserver.Do53Nameserver):
    """Plain DNS over a connected UDP socket (TCP as dnspython does it)."""

    def query(
        self,
        request: dns.message.QueryMessage,
        timeout: float,
        source: str | None,
        source_port: int,
        max_size: bool,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        """One query; TCP when ``max_size`` (after a truncated UDP answer)."""
        if max_size:
            return super().query(
                request, timeout, source, source_port, max_size, one_rr_per_rrset, ignore_trailing
            )
        return udp_query(request, self.address, self.port, timeout)


def udp_query(
    request: dns.message.Message, address: str, port: int, timeout: float
) -> dns.message.Message:
    """Send ``request`` over a connected UDP socket and return the response.

    Raises what dnspython's resolver expects from a transport: ``dns.exception.Timeout``,
    ``dns.message.Truncated`` (TC set: retry over TCP), :class:`MalformedAnswer`, or OSError
    (ConnectionRefusedError when the server's port is closed).
    """
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        address, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST
    )[0]
    deadline = time.monotonic() + timeout
    with socket.socket(family, kind, proto) as sock:
        sock.connect(sockaddr)
        sock.settimeout(max(timeout, 0.001))
        sock.send(request.to_wire())
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise dns.exception.Timeout
            sock.settimeout(remaining)
            try:
                wire = sock.recv(MAX_DATAGRAM)
            except TimeoutError:
                raise dns.exception.Timeout from None
            response = _parse(request, wire)
            if response is not None:
                return response


def _parse(request: dns.message.Message, wire: bytes) -> dns.message.Message | None:
    """The response in ``wire``; None when it answers some other query (keep waiting)."""
    try:
        response = dns.message.from_wire(wire, raise_on_truncation=True)
    except dns.message.Truncated as exc:
        partial = exc.kwargs.get("message")
        if isinstance(partial, dns.message.Message) and request.is_response(partial):
            raise
        return None
    except Exception as exc:  # anything dnspython raises on bytes that are not DNS
        raise MalformedAnswer from exc
    return response if request.is_response(response) else None


# -- texts -------------------------------------------------------------------------------


def describe_errors(errors: Sequence[Any]) -> str:
    """One text for dnspython's error list ``[(server, tcp, port, problem, response), ...]``."""
    by_server: dict[str, list[tuple[bool, Any, Any]]] = {}
    parts: list[str] = []
    for err in errors:
        try:
            server, tcp, port, problem = err[0], bool(err[1]), int(err[2]), err[3]
        except (TypeError, IndexError, ValueError):
            parts.append(clip(str(err)))
            continue
        response = err[4] if len(err) > 4 else None
        by_server.setdefault(_server_text(str(server), port), []).append((tcp, problem, response))
    for where, events in by_server.items():
        for text in _describe_server(where, events):
            if text not in parts:
                parts.append(text)
    return "; ".join(parts) if parts else "no name servers available"


def describe_timeout(lifetime: float, errors: Sequence[Any]) -> str:
    """Text for a lookup that ran out of time: which servers never answered, and what else."""
    silent: list[str] = []
    others: list[Any] = []
    for err in errors:
        try:
            where, problem = _server_text(str(err[0]), int(err[2])), err[3]
        except (TypeError, IndexError, ValueError):
            others.append(err)
            continue
        if isinstance(problem, dns.exception.Timeout):
            if where not in silent:
                silent.append(where)
        else:
            others.append(err)
    text = f"no answer within {lifetime:.3g} s"
    if silent:
        text += f" from {', '.join(silent)}"
    if others:
        text += f"; {describe_errors(others)}"
    return text


def _describe_server(where: str, events: list[tuple[bool, Any, Any]]) -> list[str]:
    texts: list[str] = []
    for index, (tcp, problem, response) in enumerate(events):
        if isinstance(problem, dns.message.Truncated) and not tcp:
            later = [event for event in events[index + 1 :] if event[0]]
            if later:
                why = _short(later[0][1], later[0][2])
                texts.append(f"answer from {where} truncated over UDP and TCP failed: {why}")
                return texts
        texts.append(_describe_one(where, tcp, problem, response))
    return texts


def _describe_one(where: str, tcp: bool, problem: Any, response: Any) -> str:
    via = " over TCP" if tcp else ""
    if isinstance(problem, str):
        return f"{clip(problem, 20)} from {where}{via}"  # an rcode: SERVFAIL, REFUSED, NOTIMP...
    if isinstance(problem, ConnectionRefusedError):
        if tcp:
            return f"TCP connection to {where} refused"
        return f"DNS server {where} refused the connection (port unreachable)"
    if isinstance(problem, EOFError):
        return f"{where} closed the TCP connection without an answer"
    if isinstance(problem, dns.exception.Timeout):
        return f"no answer from {where}{via}"
    if isinstance(problem, dns.message.ChainTooLong):
        return f"{_cname_problem(response)} in the answer from {where}{via}"
    if isinstance(problem, dns.message.Truncated):
        return f"truncated answer from {where}{via}"
    if isinstance(problem, dns.exception.FormError):
        return f"malformed answer from {where}{via}"
    if isinstance(problem, OSError):
        return f"network error talking to {where}{via}: {clip(problem.strerror or str(problem))}"
    return f"{type(problem).__name__} from {where}{via}: {clip(str(problem))}"


def _short(problem: Any, response: Any) -> str:
    """What went wrong on the TCP retry, in a few words."""
    if isinstance(problem, str):
        return clip(problem, 20)
    if isinstance(problem, ConnectionRefusedError):
        return "connection refused"
    if isinstance(problem, EOFError):
        return "connection closed without an answer"
    if isinstance(problem, dns.exception.Timeout):
        return "no answer"
    if isinstance(problem, dns.message.ChainTooLong):
        return _cname_problem(response)
    if isinstance(problem, dns.exception.FormError):
        return "malformed answer"
    if isinstance(problem, OSError):
        return clip(problem.strerror or str(problem))
    return f"{type(problem).__name__}: {clip(str(problem))}"


def _cname_problem(response: Any) -> str:
    """'CNAME loop at NAME' if the answer's CNAMEs loop, else that the chain is too long."""
    if isinstance(response, dns.message.Message) and len(response.question) == 1:
        name = response.question[0].name
        seen = {name}
        for _ in range(dns.message.MAX_CHAIN + 1):
            target = _cname_target(response, name)
            if target is None:
                break
            if target in seen:
                return f"CNAME loop at {clip(target.to_text(omit_final_dot=True))}"
            seen.add(target)
            name = target
    return f"CNAME chain longer than {dns.message.MAX_CHAIN} names"


def _cname_target(response: dns.message.Message, name: dns.name.Name) -> dns.name.Name | None:
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.CNAME and rrset.name == name:
            for rd in rrset:
                target = getattr(rd, "target", None)
                return target if isinstance(target, dns.name.Name) else None
    return None


def _server_text(server: str, port: int) -> str:
    # dnspython names a server "Do53:ADDRESS@PORT"; keep only the address.
    if server.startswith("Do53:"):
        server = server[5:].rpartition("@")[0] or server[5:]
    return f"[{server}]:{port}" if ":" in server else f"{server}:{port}"


def make_resolver(nameservers: Sequence[str]) -> dns.resolver.Resolver:
    """A dnspython resolver on ``nameservers`` (empty: /etc/resolv.conf, else 127.0.0.1:53),
    every plain-DNS server reached over a connected UDP socket; raises ValueError for a
    malformed name server string."""
    servers: list[str | dns.nameserver.Nameserver] = []
    for text in nameservers:
        host, port = parse_nameserver(text)
        servers.append(ConnectedDo53Nameserver(host, port))
    resolver: dns.resolver.Resolver
    if servers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = servers
    else:
        try:
            resolver = dns.resolver.Resolver(configure=True)
        except (dns.exception.DNSException, OSError, ValueError):
            # Missing or empty resolv.conf (containers): a local resolver is the best guess.
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
        resolver.nameservers = [
            ConnectedDo53Nameserver(server, resolver.nameserver_ports.get(server, resolver.port))
            if isinstance(server, str) and dns.inet.is_address(server)
            else server
            for server in resolver.nameservers
        ]
    # A SERVFAIL must come back at once as TEMPFAIL, not be retried until the lifetime ends.
    resolver.retry_servfail = False
    resolver.cache = None  # ours caches decoded results; dnspython's would double-cache
    resolver.use_search_by_default = False
    return resolver


def negative_ttl(responses: Any) -> int:
    """RFC 2308 negative TTL: min(SOA TTL, SOA MINIMUM) over the authority SOAs."""
    ttls: list[int] = []
    for response in responses:
        if not isinstance(response, dns.message.Message):
            continue
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                ttls.append(min(int(rrset.ttl), int(getattr(rrset[0], "minimum", rrset.ttl))))
    return min(ttls) if ttls else NEGATIVE_TTL_WITHOUT_SOA
