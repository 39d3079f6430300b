"""An in-process DNS server for tests: UDP and TCP on 127.0.0.1, one background thread.

It answers authoritatively for whatever was added (AA set), NXDOMAIN or NODATA with an SOA for
the apex ``test.`` otherwise, and can misbehave per name: SERVFAIL, REFUSED, no answer, a delay,
bytes that are not DNS, or a truncated (TC) UDP answer with the TCP connection then closed.
``TestDnsServer(tcp=False)`` listens on UDP only, so TCP connections to its port are refused.
Records of a type dnspython does not know (Client MX, 265) given as ``"10 host."`` are encoded
in MX wire format and served as generic rdata; :meth:`TestDnsServer.add_raw` serves any bytes.
CNAMEs are followed inside the zone for up to 8 steps, so two CNAMEs pointing at each other give
an answer whose chain loops.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rrset

from support.lifecycle import Running

__all__ = ["TestDnsServer", "ZoneData"]

# {"sender.test": {265: ["10 out.sender.test."], "A": "192.0.2.1"}}
ZoneData = Mapping[str, Mapping[str | int, Sequence[str] | str]]

_IN = dns.rdataclass.IN
GARBAGE = b"\x13\x37garbage"  # shorter than a DNS header: never parses


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text, dns.name.root)


def _key(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _rdata(number: int, text: str) -> dns.rdata.Rdata:
    rdtype = dns.rdatatype.RdataType.make(number)
    known = dns.rdatatype.to_text(rdtype) != f"TYPE{number}"
    if text.startswith("\\#") or known:
        return dns.rdata.from_text(_IN, rdtype, text, dns.name.root, relativize=False)
    # Unknown to dnspython (Client MX): MX wire format, name never compressed (RFC 3597).
    wire = (
        dns.rdata.from_text(_IN, dns.rdatatype.MX, text, dns.name.root, relativize=False).to_wire()
        or b""
    )
    return dns.rdata.GenericRdata(_IN, rdtype, wire)


class TestDnsServer(Running):
    """Authoritative-style DNS server for tests; use as a context manager or start()/stop()."""

    __test__ = False  # not a pytest test class

    def __init__(self, zone: ZoneData | None = None, *, tcp: bool = True) -> None:
        self._serve_tcp = tcp
        self._lock = threading.Lock()
        self._records: dict[tuple[str, int], dns.rrset.RRset] = {}
        self._behaviour: dict[str, tuple[str, float]] = {}
        self.queries: list[tuple[str, int]] = []
        self.negative_ttl = 60  # SOA MINIMUM (and SOA TTL) of the apex "test."
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        for owner, types in (zone or {}).items():
            for rdtype, texts in types.items():
                self.add(owner, rdtype, *([texts] if isinstance(texts, str) else texts))

    @property
    def nameserver(self) -> str:
        """``127.0.0.1:PORT``, as the config and the CLI take it."""
        return f"{self.address[0]}:{self.address[1]}"

    # -- zone mutation (thread-safe, allowed while serving) ------------------------------

    def add(self, name: str, rdtype: str | int, *rdata_text: str, ttl: int = 300) -> None:
        """Add records, e.g. ``add("sender.test", 265, "10 out.sender.test.")``."""
        number = int(dns.rdatatype.RdataType.make(rdtype))
        self._add([_rdata(number, text) for text in rdata_text], name, number, ttl)

    def add_raw(self, name: str, rdtype: int, wire: bytes, ttl: int = 300) -> None:
        """Add one record with arbitrary rdata bytes, served as is."""
        rd = dns.rdata.GenericRdata(_IN, dns.rdatatype.RdataType.make(rdtype), wire)
        self._add([rd], name, rdtype, ttl)

    def _add(self, rdatas: list[dns.rdata.Rdata], name: str, rdtype: int, ttl: int) -> None:
        owner = _name(name)
        with self._lock:
            rrset = self._records.get((_key(owner), rdtype))
            if rrset is None:
                rrset = dns.rrset.RRset(owner, _IN, dns.rdatatype.RdataType.make(rdtype))
                self._records[(_key(owner), rdtype)] = rrset
            for rd in rdatas:
                rrset.add(rd, ttl)
            rrset.ttl = ttl

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for ``name`` (all types)."""
        self._set_behaviour(name, "servfail")

    def refuse(self, name: str) -> None:
        """Answer REFUSED for ``name``."""
        self._set_behaviour(name, "refuse")

    def drop(self, name: str) -> None:
        """Never answer queries for ``name``."""
        self._set_behaviour(name, "drop")

    def delay(self, name: str, seconds: float) -> None:
        """Answer queries for ``name`` normally, after ``seconds``."""
        self._set_behaviour(name, "delay", seconds)

    def garbage(self, name: str) -> None:
        """Answer queries for ``name`` with bytes that are not a DNS message."""
        self._set_behaviour(name, "garbage")

    def truncate(self, name: str, *, tcp_answers: bool = True) -> None:
        """Answer UDP queries for ``name`` with an empty TC answer (the client retries over TCP).

        Over TCP the answer is normal, or with ``tcp_answers=False`` the server closes the
        connection without answering.
        """
        self._set_behaviour(name, "truncate" if tcp_answers else "truncate-hangup")

    def _set_behaviour(self, name: str, kind: str, seconds: float = 0.0) -> None:
        with self._lock:
            self._behaviour[_key(_name(name))] = (kind, seconds)

    def clear(self) -> None:
        """Forget all records, behaviours and the query log."""
        with self._lock:
            self._records.clear()
            self._behaviour.clear()
            self.queries.clear()

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> TestDnsServer:
        """Bind UDP and TCP on the same ephemeral port and serve in a background thread."""
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(udp.getsockname())
            except OSError:  # the TCP port is taken: try another pair
                udp.close()
                tcp.close()
                continue
            break
        else:
            raise OSError("no free UDP+TCP port pair on 127.0.0.1")
        if self._serve_tcp:
            tcp.listen(16)
            self._tcp = tcp
        else:
            tcp.close()  # the port was free for TCP: connections to it are refused
        self._udp = udp
        self.address = udp.getsockname()
        thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, join all threads and close all sockets."""
        self._stopping.set()
        self._wake_w.send(b"x")
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    # -- serving -------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._udp is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ)
            if self._tcp is not None:
                selector.register(self._tcp, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._udp:
                        self._on_udp()
                    elif key.fileobj is self._tcp:
                        self._on_tcp_connect()

    def _on_udp(self) -> None:
        assert self._udp is not None
        try:
            wire, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        self._respond(wire, False, lambda data: self._udp_send(data, peer))

    def _udp_send(self, data: bytes, peer: tuple[str, int]) -> None:
        if self._udp is not None and not self._stopping.is_set():
            with contextlib.suppress(OSError):
                self._udp.sendto(data, peer)

    def _on_tcp_connect(self) -> None:
        assert self._tcp is not None
        try:
            conn, _ = self._tcp.accept()
        except OSError:
            return
        thread = threading.Thread(target=self._tcp_session, args=(conn,), daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _tcp_session(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.2)
            buffer = b""
            while not self._stopping.is_set():
                try:
                    chunk = conn.recv(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack("!H", buffer[:2])[0]:
                    size = struct.unpack("!H", buffer[:2])[0]
                    wire, buffer = buffer[2 : 2 + size], buffer[2 + size :]
                    if not self._respond(wire, True, lambda data: _tcp_send(conn, data)):
                        return  # hang up without an answer

    def _respond(self, wire: bytes, tcp: bool, send: Callable[[bytes], None]) -> bool:
        """Answer one query (or not); False asks the TCP session to hang up."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return True
        if len(query.question) != 1:
            return True
        question = query.question[0]
        key = _key(question.name)
        with self._lock:
            self.queries.append((key, int(question.rdtype)))
            kind, seconds = self._behaviour.get(key, ("", 0.0))
        if kind == "drop":
            return True
        if kind == "garbage":
            send(GARBAGE)
            return True
        if kind.startswith("truncate"):
            if tcp and kind == "truncate-hangup":
                return False
            if not tcp:
                send(_truncated(query))
                return True
            kind = ""
        if kind == "delay":
            # In its own thread, so that other names keep being answered meanwhile.
            thread = threading.Thread(
                target=self._delayed, args=(query, tcp, seconds, send), daemon=True
            )
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()
            return True
        send(self._answer(query, tcp, kind))
        return True

    def _delayed(
        self, query: dns.message.Message, tcp: bool, seconds: float, send: Callable[[bytes], None]
    ) -> None:
        if not self._stopping.wait(seconds):
            send(self._answer(query, tcp, ""))

    def _answer(self, query: dns.message.Message, tcp: bool, kind: str) -> bytes:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        if kind == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif kind == "refuse":
            response.set_rcode(dns.rcode.REFUSED)
        else:
            self._fill(response, question.name, int(question.rdtype))
        if tcp:
            return response.to_wire()
        # Without EDNS a UDP answer is limited to 512 bytes (RFC 1035); else to the payload.
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            return _truncated(query)

    def _fill(self, response: dns.message.Message, qname: dns.name.Name, rdtype: int) -> None:
        with self._lock:
            name = qname
            for _ in range(8):  # follow CNAMEs inside the zone
                rrset = self._records.get((_key(name), rdtype))
                if rrset is not None:
                    response.answer.append(_copy(rrset))
                    return
                cname = self._records.get((_key(name), int(dns.rdatatype.CNAME)))
                if cname is None or rdtype == dns.rdatatype.CNAME:
                    break
                response.answer.append(_copy(cname))
                name = getattr(next(iter(cname)), "target", name)
            exists = any(
                dns.name.from_text(owner, dns.name.root).is_subdomain(name)
                for owner, _ in self._records
            )
            if not exists:
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())

    def _soa(self) -> dns.rrset.RRset:
        text = f"ns.test. hostmaster.test. 1 3600 600 86400 {self.negative_ttl}"
        return dns.rrset.from_text("test.", self.negative_ttl, "IN", "SOA", text)


def _copy(rrset: dns.rrset.RRset) -> dns.rrset.RRset:
    # Serialized after the lock is released: a concurrent add() must not change it meanwhile.
    return dns.rrset.from_rdata_list(rrset.name, rrset.ttl, list(rrset))


def _truncated(query: dns.message.Message) -> bytes:
    truncated = dns.message.make_response(query)
    truncated.flags |= dns.flags.AA | dns.flags.TC
    return truncated.to_wire()


def _tcp_send(conn: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(struct.pack("!H", len(data)) + data)
