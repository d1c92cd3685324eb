"""What an operator sees of a bridge: its counters and the session id on its log lines."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import pytest
from prometheus_client import REGISTRY

from dashboard.agents.bridge import Bridge
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
