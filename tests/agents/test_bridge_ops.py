"""What an operator sees of a bridge: its counters and the session id on its log lines."""

from __future__ import annotations

import asyncio
import logging
import threading
from urllib.parse import urlsplit

import pytest
from django.db import connections, transaction
from prometheus_client import REGISTRY

from dashboard.agents.bridge import Bridge
from dashboard.agents.models import AgentSession
from dashboard.logs import SessionFilter
from dashboard.opencomputer import connect_stream, stream_url
from tests.agents.helpers import wait_for
from tests.agents.test_bridge import _count, _new_session, _start, _stored
from tests.proxy import CuttableProxy


def _counted(name: str) -> float:
    return REGISTRY.get_sample_value(f"porthole_{name}_total") or 0.0


pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(SessionFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_it_counts_what_a_bridge_records_and_names_its_session_in_the_log(oc):
    client, sandbox_id, session_id = await _start(oc, "flood 100 100\nsleep 2\nflood 100\nexit 0")
    session = await _new_session(sandbox_id, session_id)
    target = urlsplit(oc.api_url)
    proxy = await CuttableProxy(target.hostname or "127.0.0.1", target.port or 80).start()
    proxied = oc.api_url.replace(f":{target.port}/", f":{proxy.port}/")

    async def through_proxy(sandbox: str, upstream: str):  # type: ignore[no-untyped-def]
        return await connect_stream(stream_url(proxied, sandbox, upstream, api_key=oc.api_key))

    kept = _Kept()
    logger = logging.getLogger("dashboard.agents")
    logger.addHandler(kept)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    recorded = _counted("events_recorded")
    reconnects = _counted("upstream_reconnects")
    try:
        bridge = Bridge(str(session.id), "test-worker", open_stream=through_proxy)
        task = asyncio.create_task(bridge.run())

        async def first_flood_stored() -> bool:
            return await _count(session, type="assistant") >= 100

        await wait_for(first_flood_stored)
        proxy.cut()
        await asyncio.wait_for(task, 45)
    finally:
        logger.removeHandler(kept)
        logger.setLevel(old_level)
        await proxy.close()
        await client.aclose()

    stored = await _count(session)
    assert _counted("events_recorded") - recorded == stored
    assert _counted("upstream_reconnects") - reconnects == bridge.connections - 1 >= 1
    bridge_lines = [r for r in kept.records if r.name.startswith("dashboard.agents.bridge")]
    assert bridge_lines, "the bridge logged nothing at DEBUG"
    assert {getattr(r, "session_id", "") for r in bridge_lines} == {str(session.id)}
    assert await _stored(session)


def _lag_sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"porthole_recording_lag_seconds_{name}", labels) or 0.0


async def test_it_measures_recording_lag_from_the_read_to_the_commit(oc):
    """`porthole_recording_lag_seconds` has each recorded event once, and counts from the
    moment its frame was read: a frame read while another connection held the database's
    writes back (a busy or frozen writer) waited longer than the hold."""
    hold_for = 0.6  # inside PostgreSQL's 2 s bound on a record's lock wait
    client, sandbox_id, session_id = await _start(oc, "Hello\nexit 0")
    session = await _new_session(sandbox_id, session_id)
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with transaction.atomic():  # on SQLite: every write waits (IMMEDIATE)
            AgentSession.objects.select_for_update().get(id=session.id)
            locked.set()
            release.wait(30)
        connections.close_all()

    count, within = _lag_sample("count"), _lag_sample("bucket", le="0.5")
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert await asyncio.to_thread(locked.wait, 10)
        bridge = Bridge(str(session.id), "test-worker")
        task = asyncio.create_task(bridge.run())

        async def read_something() -> bool:
            return bridge._frames >= 1

        await wait_for(read_something)
        await asyncio.sleep(hold_for)  # the fault: writes held back this long after a read
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 30)
    await asyncio.wait_for(task, 30)
    await client.aclose()

    stored = await _count(session)
    assert _lag_sample("count") - count == stored
    assert _lag_sample("bucket", le="0.5") - within < stored  # at least one waited longer
