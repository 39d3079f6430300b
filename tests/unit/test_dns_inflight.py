"""DNS under concurrency, against the in-process DNS server: shared queries, the per-domain cap,
the lookup pool, and the budget of a MAIL FROM lookup (what a burst of cold mail sees)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.dnsserver import TestDnsServer
from support.pki import TestPki

from mtls_milter.config import config_from_mapping
from mtls_milter.core.lookups import LookupStatus, lookup_group, query_name
from mtls_milter.engine import Engine
from mtls_milter.inbound.session import EngineHolder, MilterSession
from mtls_milter.inbound.session_evidence import _prefetch_done
from mtls_milter.net.dns import DnsResolver
from mtls_milter.net.lookup_pool import LookupFuture, LookupPool, budget_paused, lookup_deadline

CMX = 265
ResolverFactory = Callable[..., DnsResolver]
POSTFIX_TRUSTED = {
    "{tls_version}": "TLSv1.3",
    "{cert_subject}": "out.sender.test",
    "{cert_issuer}": "Test Intermediate CA",
}


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll until ``condition`` holds (an ordering point, not a timing assertion)."""
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "condition never held"
        time.sleep(0.005)


def in_threads(count: int, call: Callable[[], Any]) -> list[Any]:
    """``call()`` in ``count`` threads released at once; their results."""
    results: list[Any] = [None] * count
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        barrier.wait()
        results[index] = call()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.fixture
def pool() -> Any:
    lookups = LookupPool()
    yield lookups
    lookups.shutdown(wait=True)


# --- single flight -----------------------------------------------------------------------------


def test_twenty_callers_of_one_cold_name_share_one_query(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    dns_server.delay("sender.test", 0.3)
    results = in_threads(20, lambda: dns_resolver.client_mx("sender.test", 5.0))
    assert {r.status for r in results} == {LookupStatus.OK}
    assert {r.hosts for r in results} == {("out.sender.test",)}
    assert dns_server.queries.count(("sender.test", CMX)) == 1


def test_a_waiter_whose_budget_ends_gets_tempfail_and_the_next_caller_the_cached_answer(
    dns_server: TestDnsServer, resolver_for: ResolverFactory
) -> None:
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    dns_server.delay("sender.test", 0.6)
    resolver = resolver_for(timeout=2.0)
    first: list[Any] = []
    leader = threading.Thread(target=lambda: first.append(resolver.client_mx("sender.test", 5)))
    leader.start()
    wait_for(lambda: ("sender.test", CMX) in dns_server.queries)
    waiter = resolver.client_mx("sender.test", 0.2)
    assert waiter.status is LookupStatus.TEMPFAIL
    assert waiter.detail == "no answer within 0.2 s (query shared with another)"
    assert leader.is_alive()  # the shared query goes on
    leader.join()
    assert first[0].hosts == ("out.sender.test",)
    later = resolver.client_mx("sender.test", 0.0)  # no budget left: only the cache can answer
    assert later.status is LookupStatus.OK and later.hosts == ("out.sender.test",)
    assert dns_server.queries.count(("sender.test", CMX)) == 1


def test_a_caller_with_more_budget_does_not_inherit_a_short_budget_leaders_timeout(
    dns_server: TestDnsServer, resolver_for: ResolverFactory
) -> None:
    # A message with 0.05 s left leads the query; one with 5 s asks the same name meanwhile.
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    dns_server.delay("sender.test", 0.3)
    resolver = resolver_for(timeout=2.0)
    first: list[Any] = []
    short = threading.Thread(target=lambda: first.append(resolver.client_mx("sender.test", 0.05)))
    short.start()
    wait_for(lambda: ("sender.test", CMX) in dns_server.queries)
    patient = resolver.client_mx("sender.test", 5.0)
    short.join()
    assert patient.status is LookupStatus.OK and patient.hosts == ("out.sender.test",)
    assert first[0].status is LookupStatus.TEMPFAIL
    assert first[0].detail.startswith("no answer within 0.05 s")
    assert dns_server.queries.count(("sender.test", CMX)) == 2  # the same question, twice


def test_a_waiter_with_time_left_asks_again_when_the_shared_query_timed_out(
    dns_server: TestDnsServer, resolver_for: ResolverFactory
) -> None:
    # The DNS timeout (0.3 s) is shorter than both budgets: the shared query runs out of time
    # while the waiter still has over 3 s, and the name server has recovered meanwhile.
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    dns_server.delay("sender.test", 1.0)
    resolver = resolver_for(timeout=0.3)
    first: list[Any] = []
    leader = threading.Thread(target=lambda: first.append(resolver.client_mx("sender.test", 5)))
    leader.start()
    wait_for(lambda: ("sender.test", CMX) in dns_server.queries)
    dns_server.delay("sender.test", 0.0)
    waiter = resolver.client_mx("sender.test", 4.0)
    leader.join()
    assert first[0].status is LookupStatus.TEMPFAIL
    assert first[0].detail.startswith("no answer within 0.3 s")
    assert waiter.status is LookupStatus.OK and waiter.hosts == ("out.sender.test",)
    assert dns_server.queries.count(("sender.test", CMX)) == 2


def test_waiters_that_ask_again_at_once_share_one_query(
    dns_server: TestDnsServer, resolver_for: ResolverFactory, pool: LookupPool
) -> None:
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    dns_server.delay("sender.test", 1.0)
    resolver = resolver_for(timeout=0.3)
    leader = pool.submit(resolver.client_mx, "sender.test", 5.0)
    wait_for(lambda: ("sender.test", CMX) in dns_server.queries)
    waiters = [pool.submit(resolver.client_mx, "sender.test", 4.0) for _ in range(10)]
    dns_server.delay("sender.test", 0.2)  # the name server recovers, slowly
    assert leader.result().status is LookupStatus.TEMPFAIL
    assert {f.result().hosts for f in waiters} == {("out.sender.test",)}
    assert dns_server.queries.count(("sender.test", CMX)) == 2  # not one more per waiter


def test_txt_and_address_lookups_are_shared_too(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add("_dmarc.sender.test", "TXT", '"v=DMARC1; p=reject"')
    dns_server.add("out.sender.test", "A", "192.0.2.1")
    dns_server.delay("_dmarc.sender.test", 0.3)
    dns_server.delay("out.sender.test", 0.3)
    txts = in_threads(8, lambda: dns_resolver.txt("_dmarc.sender.test", 5.0))
    addresses = in_threads(8, lambda: dns_resolver.addresses("out.sender.test", 5.0))
    assert {r.records for r in txts} == {(b"v=DMARC1; p=reject",)}
    assert {r.addresses for r in addresses} == {("192.0.2.1",)}
    assert dns_server.queries.count(("_dmarc.sender.test", 16)) == 1
    assert dns_server.queries.count(("out.sender.test", 1)) == 1


# --- the per-domain cap ------------------------------------------------------------------------


def test_the_per_domain_cap_holds_queries_back_without_spending_their_budget(
    dns_server: TestDnsServer, resolver_for: ResolverFactory, pool: LookupPool
) -> None:
    names = [f"{x}.busy.test" for x in "abcd"]
    for name in names:
        dns_server.add(name, CMX, f"10 out.{name}.")
        dns_server.delay(name, 0.4)
    resolver = resolver_for(timeout=0.6, per_domain=2)
    futures = [pool.submit(resolver.client_mx, name, 0.6) for name in names]
    wait_for(lambda: len(dns_server.queries) == 2)
    time.sleep(0.1)
    assert len(dns_server.queries) == 2  # the other two wait for a slot
    assert not any(f.done() for f in futures)
    results = [f.result() for f in futures]
    # The second pair ends 0.8 s after the start, past the 0.6 s budget: the wait for a slot
    # was not counted.
    assert [r.hosts for r in results] == [(f"out.{n}",) for n in names]
    budget_end = [lookup_deadline(f, 0.6, f.submitted) - f.submitted for f in futures]
    assert sum(1 for end in budget_end if end > 0.75) == 2  # the two that waited ~0.4 s


def test_a_query_that_finds_no_slot_within_its_budget_is_tempfail(
    dns_server: TestDnsServer, resolver_for: ResolverFactory
) -> None:
    for name in ("a.busy.test", "b.busy.test"):
        dns_server.add(name, CMX, f"10 out.{name}.")
        dns_server.delay(name, 0.5)
    resolver = resolver_for(timeout=1.0, per_domain=1)
    first: list[Any] = []
    holder = threading.Thread(target=lambda: first.append(resolver.client_mx("a.busy.test", 1)))
    holder.start()
    wait_for(lambda: len(dns_server.queries) == 1)
    second = resolver.client_mx("b.busy.test", 0.2)
    holder.join()
    assert second.status is LookupStatus.TEMPFAIL
    assert second.detail == "1 lookups under busy.test busy for 0.2 s"
    assert first[0].status is LookupStatus.OK
    assert ("b.busy.test", CMX) not in dns_server.queries


def test_other_domains_do_not_wait_for_a_full_domain(
    dns_server: TestDnsServer, resolver_for: ResolverFactory, pool: LookupPool
) -> None:
    for name in ("a.busy.test", "b.busy.test", "fast.test"):
        dns_server.add(name, CMX, f"10 out.{name}.")
    dns_server.delay("a.busy.test", 0.5)
    dns_server.delay("b.busy.test", 0.5)
    resolver = resolver_for(timeout=1.0, per_domain=1)
    slow = [pool.submit(resolver.client_mx, n, 1.0) for n in ("a.busy.test", "b.busy.test")]
    wait_for(lambda: len(dns_server.queries) == 1)
    assert resolver.client_mx("fast.test", 1.0).hosts == ("out.fast.test",)
    assert not any(f.done() for f in slow)
    assert [f.result().status for f in slow] == [LookupStatus.OK, LookupStatus.OK]


# --- the lookup pool ---------------------------------------------------------------------------


def test_a_slow_domain_does_not_hold_up_a_fast_cold_domain(
    dns_server: TestDnsServer, resolver_for: ResolverFactory, pool: LookupPool
) -> None:
    # More slow lookups than the old fixed pool (32 threads) had threads.
    slow_names = [f"slow{i}.test" for i in range(40)]
    for name in slow_names:
        dns_server.delay(name, 3.0)
    dns_server.add("fast.test", CMX, "10 out.fast.test.")
    resolver = resolver_for(timeout=1.0)
    slow = [pool.submit(resolver.client_mx, name, 5.0) for name in slow_names]
    wait_for(lambda: len(dns_server.queries) == len(slow_names))
    fast = pool.submit(resolver.client_mx, "fast.test", 5.0).result(timeout=5)
    assert fast.hosts == ("out.fast.test",)
    assert not any(f.done() for f in slow)  # still waiting for their name servers
    assert {f.result().status for f in slow} == {LookupStatus.TEMPFAIL}


def test_72_cold_domains_with_slow_name_servers_all_pass(
    dns_server: TestDnsServer, pki: TestPki, pool: LookupPool
) -> None:
    """The acceptance figure: 72 messages at once from distinct cold domains whose Client MX
    answers take 1.8 s, DNS budget 5 s, through the milter session: no temperror."""
    domains = [f"d{i}.test" for i in range(72)]
    for domain in domains:
        dns_server.add(domain, CMX, "10 out.sender.test.")
        dns_server.delay(domain, 1.8)
    raw = {
        "milter": {"authserv_id": "mx.receiver.test"},
        "dns": {"nameservers": [dns_server.nameserver], "timeout": 2.0, "budget": 5.0},
        "tls": {"trust": [str(pki.root_path)]},
    }
    holder = EngineHolder(Engine.from_config(config_from_mapping(raw)))
    sessions = []
    for index, domain in enumerate(domains):
        session = MilterSession(holder, pool)
        session.connect("192.0.2.7", str(1000 + index))
        session.helo("out.sender.test", POSTFIX_TRUSTED)
        session.mail(f"<a@{domain}>", POSTFIX_TRUSTED)
        sessions.append(session)
    outcomes = [session.eom({}) for session in sessions]  # each waits for its own lookup
    values = [change.value for outcome in outcomes for change in outcome.headers]
    assert len(values) == 72
    assert sum("mtls=pass" in value for value in values) == 72, values


# --- the observer --------------------------------------------------------------------------


def test_the_observer_hears_every_lookup_with_its_rrtype_and_whether_it_was_cached(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add("sender.test", CMX, "10 out.sender.test.")
    dns_server.add("sender.test", "MX", "10 in.sender.test.")
    dns_server.add("sender.test", "TXT", '"v=spf1 -all"')
    dns_server.add("out.sender.test", "A", "192.0.2.1")
    dns_server.add("out.sender.test", "AAAA", "2001:db8::1")
    heard: list[tuple[str, float, bool]] = []

    def observe(rrtype: str, seconds: float, cached: bool) -> None:
        heard.append((rrtype, seconds, cached))

    dns_resolver.on_lookup = observe
    dns_resolver.client_mx("sender.test", 5.0)
    dns_resolver.client_mx("sender.test", 5.0)
    assert dns_resolver.cached_client_mx("sender.test") is not None
    assert dns_resolver.cached_client_mx("other.test") is None  # a miss is no lookup
    dns_resolver.server_mx("sender.test", 5.0)
    dns_resolver.addresses("out.sender.test", 5.0)
    dns_resolver.txt("sender.test", 5.0)
    assert [(rrtype, cached) for rrtype, _, cached in heard] == [
        ("client_mx", False),
        ("client_mx", True),
        ("client_mx", True),
        ("mx", False),
        ("a", False),
        ("aaaa", False),
        ("txt", False),
    ]
    assert all(seconds > 0 for _, seconds, cached in heard if not cached)
    assert all(seconds == 0 for _, seconds, cached in heard if cached)
    assert dns_resolver.cache_entries() == 5


def test_a_failing_observer_does_not_change_the_answer(
    dns_server: TestDnsServer, dns_resolver: DnsResolver
) -> None:
    dns_server.add("sender.test", CMX, "10 out.sender.test.")

    def broken(rrtype: str, seconds: float, cached: bool) -> None:
        raise RuntimeError("metrics down")

    dns_resolver.on_lookup = broken
    assert dns_resolver.client_mx("sender.test", 5.0).hosts == ("out.sender.test",)
    assert dns_resolver.client_mx("sender.test", 5.0).hosts == ("out.sender.test",)


# --- LookupPool and lookup_deadline, without DNS -------------------------------------------


def test_the_pool_starts_a_thread_per_concurrent_call_and_reuses_idle_ones() -> None:
    pool = LookupPool(idle_seconds=0.2)
    release = threading.Event()
    blocked = [pool.submit(release.wait, 5) for _ in range(50)]
    wait_for(lambda: pool.threads == 50)
    release.set()
    assert all(f.result() for f in blocked)
    assert pool.submit(lambda: 7).result() == 7
    assert pool.threads == 50  # an idle thread took it
    wait_for(lambda: pool.threads == 0)  # idle threads leave
    assert pool.submit(lambda: 8).result() == 8
    pool.shutdown()


def test_beyond_the_ceiling_calls_wait_for_a_thread_and_errors_reach_the_caller() -> None:
    pool = LookupPool(max_threads=2)
    release = threading.Event()
    running = [pool.submit(release.wait, 5) for _ in range(2)]
    queued = pool.submit(lambda: 1 / 0)
    time.sleep(0.05)
    assert not queued.done() and pool.threads == 2
    release.set()
    with pytest.raises(ZeroDivisionError):
        queued.result(timeout=5)
    assert all(f.result() for f in running)
    pool.shutdown(wait=True)
    assert pool.threads == 0
    with pytest.raises(RuntimeError):
        pool.submit(lambda: 1)


def test_after_a_flood_at_the_ceiling_and_idle_exit_every_call_still_runs() -> None:
    # Calls queued at the ceiling once left the pool counting more idle threads than it had;
    # after the threads timed out, that many later calls waited forever with no thread.
    pool = LookupPool(max_threads=1, idle_seconds=0.1)
    release = threading.Event()
    flood = [pool.submit(release.wait, 5)] + [pool.submit(lambda i=i: i) for i in range(3)]
    release.set()
    assert [f.result(timeout=5) for f in flood] == [True, 0, 1, 2]
    wait_for(lambda: pool.threads == 0)
    for i in range(4):  # one at a time, as a quiet server sees them
        assert pool.submit(lambda i=i: i).result(timeout=2) == i
    pool.shutdown(wait=True)
    assert pool.threads == 0


def test_a_thread_the_system_refuses_leaves_the_call_to_a_running_thread_or_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = LookupPool(max_threads=4)
    release = threading.Event()
    running = pool.submit(release.wait, 5)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    queued = pool.submit(lambda: "ran")  # the running thread takes it when it finishes
    release.set()
    assert running.result(timeout=5) is True and queued.result(timeout=5) == "ran"
    wait_for(lambda: pool.threads == 1)
    pool.shutdown(wait=True)  # the last thread leaves; a new pool has none to fall back on
    lonely = LookupPool()
    with pytest.raises(RuntimeError):
        lonely.submit(lambda: 1)
    assert lonely.threads == 0


def test_shutdown_can_cancel_calls_still_waiting_for_a_thread() -> None:
    pool = LookupPool(max_threads=1)
    release = threading.Event()
    running = pool.submit(release.wait, 5)
    waiting = pool.submit(lambda: 1)
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    assert running.result(timeout=5) is True
    assert waiting.cancelled()


def test_a_forked_child_starts_its_own_threads() -> None:
    pool = LookupPool()
    assert pool.submit(lambda: 1).result() == 1  # the parent now has an idle thread
    pid = os.fork()
    if pid == 0:  # the child: the parent's idle thread does not exist here
        code = 1
        try:
            code = 0 if pool.submit(lambda: 42).result(timeout=2) == 42 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    pool.shutdown()


def test_the_deadline_of_a_lookup_counts_from_its_start_and_pauses_while_it_waits() -> None:
    pool = LookupPool()
    pausing, resume = threading.Event(), threading.Event()

    def lookup() -> str:
        time.sleep(0.05)
        with budget_paused():
            pausing.set()
            resume.wait(5)
        return "done"

    future = pool.submit(lookup)
    assert isinstance(future, LookupFuture)
    pausing.wait(5)
    first = lookup_deadline(future, 1.0, since=future.submitted)
    time.sleep(0.1)
    assert lookup_deadline(future, 1.0, since=future.submitted) > first  # paused: moves on
    resume.set()
    assert future.result(timeout=5) == "done"
    assert future.started is not None and future.paused >= 0.1
    final = lookup_deadline(future, 1.0, since=future.submitted)
    assert final == pytest.approx(future.started + 1.0 + future.paused)
    # A pause never extends the wait beyond a second budget.
    assert lookup_deadline(future, 0.05, since=future.submitted) <= future.submitted + 0.1
    plain: Future[int] = Future()
    assert lookup_deadline(plain, 5.0, since=100.0) == 105.0
    pool.shutdown()


def prefetch_wait(budget: float, work: Callable[[], str]) -> tuple[bool, LookupFuture[str]]:
    """End of message's wait for a MAIL FROM lookup running ``work`` on a LookupPool."""
    pool = LookupPool()
    tx = SimpleNamespace(
        engine=SimpleNamespace(config=SimpleNamespace(dns=SimpleNamespace(budget=budget))),
        started=time.monotonic(),
    )
    future = pool.submit(work)
    done = _prefetch_done(tx, future)  # type: ignore[arg-type]
    pool.shutdown(wait=False)
    return done, future


def test_end_of_message_waits_through_a_lookups_pause_for_a_slot() -> None:
    def paused_lookup() -> str:
        with budget_paused():
            time.sleep(0.4)  # longer than the whole budget, but not charged to it
        return "answer"

    done, future = prefetch_wait(0.3, paused_lookup)
    assert done and future.result() == "answer"


def test_end_of_message_stops_waiting_at_the_lookups_own_deadline() -> None:
    release = threading.Event()
    done, future = prefetch_wait(0.2, lambda: "late" if release.wait(5) else "")
    assert not done and not future.done()
    release.set()


# --- the domain group --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("sender.test", "sender.test"),
        ("mail.sender.test", "sender.test"),
        ("_dmarc.sender.test", "sender.test"),
        ("s1._domainkey.a.b.example.com", "example.com"),
        ("mail.example.co.uk", "example.co.uk"),
        ("example.com.au", "example.com.au"),
        ("test", "test"),
    ],
)
def test_lookup_group(name: str, group: str) -> None:
    assert lookup_group(name) == group


LABEL = st.from_regex(r"[a-z0-9_-]{1,12}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_lookup_group_of_anything_is_a_suffix(name: str) -> None:
    group = lookup_group(name)
    assert name.endswith(group)
    assert lookup_group(group) == group


@settings(max_examples=200, deadline=None)
@given(st.lists(LABEL, min_size=3, max_size=8), LABEL)
def test_a_subdomain_shares_its_parents_group(labels: list[str], extra: str) -> None:
    name = query_name(".".join(labels))
    assert lookup_group(f"{extra}.{name}") == lookup_group(name)
