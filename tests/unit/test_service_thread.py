"""The one way to run an asyncio service in a thread (policy listener, ACME responder, tests)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from mtls_milter.runtime.service_thread import ServiceThread

LOG = logging.getLogger(__name__)


def test_serves_until_stopped_and_closes_on_the_way_out() -> None:
    events: list[str] = []

    async def serve(stop: asyncio.Event, ready: Callable[[], None]) -> None:
        events.append("open")
        ready()
        try:
            await stop.wait()
        finally:
            events.append("closed")

    with ServiceThread(serve, name="demo-service", log=LOG):
        assert events == ["open"]
    assert events == ["open", "closed"]


def test_an_error_before_ready_is_raised_by_start() -> None:
    async def serve(stop: asyncio.Event, ready: Callable[[], None]) -> None:
        raise OSError("address already in use")

    with pytest.raises(OSError, match="address already in use"):
        ServiceThread(serve, name="demo-service", log=LOG).start()


def test_a_service_that_never_gets_ready_is_reported() -> None:
    async def serve(stop: asyncio.Event, ready: Callable[[], None]) -> None:
        await stop.wait()

    thread = ServiceThread(serve, name="demo-service", log=LOG)
    with pytest.raises(OSError, match=r"demo service did not start within 0\.2 s"):
        thread.start(timeout=0.2)
    thread.stop()
