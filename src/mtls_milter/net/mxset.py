"""The host set of an MX-format RRset (MX and Client MX answers), decoded and checked."""

from __future__ import annotations

from collections.abc import Iterable

import dns.name
import dns.rdata

from mtls_milter.core.lookups import HostLookup, LookupStatus
from mtls_milter.core.mxrdata import MxRdataError, decode_mx_rdata, exchange_text

__all__ = ["MAX_HOSTS", "hosts_from_rdatas"]

MAX_HOSTS = 10  # Client MX host names per lookup; more is PERMFAIL (the MX set is unlimited)


def hosts_from_rdatas(
    rdatas: Iterable[dns.rdata.Rdata | bytes],
    what: str = "Client MX",
    limit: int | None = MAX_HOSTS,
) -> HostLookup:
    """The host set of an MX-format RRset (rdata objects or raw rdata bytes); never raises.

    OK with the hosts (or ``null``), or PERMFAIL when a record is malformed, a null record is
    mixed with others, or there are more than ``limit`` distinct names (None: no limit).
    """
    try:
        records = [_decode_mx(rd) for rd in rdatas]
    except MxRdataError as exc:
        return HostLookup(LookupStatus.PERMFAIL, detail=f"{what} rdata malformed: {exc}")
    if not records:
        return HostLookup(LookupStatus.NOT_FOUND, detail=f"no {what} record (empty answer)")
    return _hosts_from_records(records, what, limit)


def _decode_mx(rd: dns.rdata.Rdata | bytes) -> tuple[int, str]:
    """(preference, exchange text) of an MX-format record; MxRdataError says what is wrong."""
    if isinstance(rd, bytes):
        return decode_mx_rdata(rd)
    exchange = getattr(rd, "exchange", None)
    preference = getattr(rd, "preference", None)
    if isinstance(exchange, dns.name.Name) and isinstance(preference, int):
        # The type is MX (or registered): dnspython decoded it already.
        labels = exchange.labels[:-1] if exchange.is_absolute() else exchange.labels
        return preference, exchange_text(labels)
    data = getattr(rd, "data", None)
    if not isinstance(data, bytes):
        raise MxRdataError(f"unexpected record class {type(rd).__name__}")
    return decode_mx_rdata(data)


def _hosts_from_records(records: list[tuple[int, str]], what: str, limit: int | None) -> HostLookup:
    if any(text == "." for _, text in records):
        if len(records) == 1:
            return HostLookup(LookupStatus.OK, null=True, detail=f"null {what} (RFC 7505)")
        return HostLookup(
            LookupStatus.PERMFAIL, detail=f"null {what} '.' mixed with other {what} records"
        )
    best: dict[str, int] = {}
    for preference, text in records:
        if text not in best or preference < best[text]:
            best[text] = preference
    if limit is not None and len(best) > limit:
        return HostLookup(
            LookupStatus.PERMFAIL,
            detail=f"{len(best)} {what} host names, more than the limit of {limit}",
        )
    hosts = tuple(sorted(best, key=lambda text: (best[text], text)))
    return HostLookup(LookupStatus.OK, hosts)
