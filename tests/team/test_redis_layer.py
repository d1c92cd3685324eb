"""The Redis channel layer under a real uvicorn worker: idle viewers stay, bursts succeed.

redis-py 8 reads with a 5 s socket timeout by default, shorter than channels-redis' 5 s
BZPOPMIN, and its asyncio pool raises at 100 connections instead of waiting; both used to
close viewers' sockets (1011) or refuse their handshakes (HTTP 500).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis
import websockets
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connections

from dashboard.agents.models import AgentSession, Sandbox, Watcher
from dashboard.agents.recording import NewEvent, publish, record, session_group
from tests.agents.helpers import cookie_for
from tests.team.procs import Proc, Team, redis_url, wait_until

pytestmark = [pytest.mark.team, pytest.mark.timeout(240)]

# Past every timer an idle socket meets: redis-py's 5 s read timeout and channels-redis' 5 s
# blocking pop (several times over), uvicorn's 20 s ping and the 30 s presence refresh.
IDLE_SECONDS = 35.0
BURST = 300


def _session(title: str) -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id=f"sb-{title}")
    return AgentSession.objects.create(sandbox=sandbox, upstream_id=f"ses-{title}", title=title)


def _text(text: str) -> NewEvent:
    data = {
        "type": "assistant",
        "message": {"role": "assistant", "content": [{"type": "text", "text": text}]},
        "parent_tool_use_id": None,
    }
    return NewEvent.from_line("agent", json.dumps(data), data)


def _record(session: AgentSession, text: str) -> list[Any]:
    """Record one event from a thread of the test's own (closed after, for the teardown)."""
    try:
        return list(record(session.id, [_text(text)])[1])
    finally:
        connections.close_all()


def _headers(worker: Proc, cookie: bytes) -> dict[str, str]:
    return {"Origin": f"http://127.0.0.1:{worker.port}", "Cookie": cookie.decode()}


def _ws_url(worker: Proc, session: AgentSession) -> str:
    return f"ws://127.0.0.1:{worker.port}/ws/sessions/{session.id}/"


def _group_members(group: str) -> int:
    """Workers subscribed to a session's group on the live layer (channels-redis' pub/sub
    layer: a Redis channel per group)."""
    prefix = settings.CHANNEL_LAYERS["live"]["CONFIG"]["prefix"]
    channel = f"{prefix}__group__{group}"
    client = redis.Redis.from_url(redis_url())
    try:
        return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
    finally:
        client.close()


def test_it_keeps_an_idle_viewer_connected_past_every_timer(crew: Team, alice: User) -> None:
    session = _session("idle")
    worker = crew.web()
    cookie = cookie_for(alice)

    async def watch() -> tuple[list[str], str]:
        async with websockets.connect(
            _ws_url(worker, session), additional_headers=_headers(worker, cookie)
        ) as ws:
            await ws.send(json.dumps({"last_seq": 0}))
            received: list[str] = []
            deadline = time.monotonic() + IDLE_SECONDS
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    received.append(str(await asyncio.wait_for(ws.recv(), remaining)))
                except TimeoutError:
                    break
                except websockets.ConnectionClosed as closed:
                    pytest.fail(
                        f"the idle viewer was closed ({closed.rcvd}) after "
                        f"{IDLE_SECONDS - remaining:.0f} s:\n{worker.problems()}"
                    )
            # Still live after the idle minute: an event recorded now reaches it.
            messages = await asyncio.to_thread(_record, session, "still here")
            await publish(messages)
            while True:
                frame = str(await asyncio.wait_for(ws.recv(), 20))
                if "still here" in frame:
                    return received, frame

    asyncio.run(watch())
    assert "TimeoutError" not in worker.output(), worker.problems()


def test_it_opens_and_closes_three_hundred_viewers_at_once(crew: Team, alice: User) -> None:
    session = _session("burst")
    worker = crew.web()
    cookie = cookie_for(alice)
    group = session_group(session.id)

    async def one_viewer(opened: asyncio.Event, go: asyncio.Event) -> dict[str, Any]:
        outcome: dict[str, Any] = {"error": None, "frames": 0, "close": None}
        try:
            async with websockets.connect(
                _ws_url(worker, session),
                additional_headers=_headers(worker, cookie),
                open_timeout=60,
                close_timeout=30,
            ) as ws:
                await ws.send(json.dumps({"last_seq": 0}))
                # Every viewer gets the presence list once it is registered.
                await asyncio.wait_for(ws.recv(), 60)
                outcome["frames"] = 1
                opened.set()
                await go.wait()
            outcome["close"] = ws.close_code
        except Exception as error:  # noqa: BLE001 - each viewer's failure is reported
            outcome["error"] = repr(error)
        return outcome

    subscribed: list[int] = []

    async def burst() -> list[dict[str, Any]]:
        go = asyncio.Event()
        flags = [asyncio.Event() for _ in range(BURST)]
        tasks = [asyncio.create_task(one_viewer(flag, go)) for flag in flags]
        # All open (or failed) before any closes, so the closes come at once too.
        await asyncio.wait_for(_all_settled(flags, tasks), 120)
        subscribed.append(_group_members(group))
        go.set()
        return await asyncio.gather(*tasks)

    outcomes = asyncio.run(burst())
    assert subscribed == [1]  # the worker's one feed, whatever the number of viewers
    failures = [o for o in outcomes if o["error"] is not None or o["close"] != 1000]
    assert not failures, f"{len(failures)} of {BURST} viewers failed: {failures[:3]}\n" + (
        worker.problems()
    )
    try:
        wait_until(lambda: not Watcher.objects.filter(session=session).exists(), 30, "watchers")
        wait_until(lambda: _group_members(group) == 0, 30, "no member left in the group")
    except AssertionError:
        left = Watcher.objects.filter(session=session).count()
        pytest.fail(
            f"{left} watcher rows and {_group_members(group)} group members left:\n"
            + worker.problems()
        )
    assert "MaxConnectionsError" not in worker.output()


async def _all_settled(flags: list[asyncio.Event], tasks: list[asyncio.Task[Any]]) -> None:
    """Until every viewer is open or has already finished (failed)."""
    while not all(flag.is_set() or task.done() for flag, task in zip(flags, tasks, strict=True)):
        await asyncio.sleep(0.05)


def test_it_waits_on_an_idle_channel_longer_than_the_blocking_pop_and_counts_drops() -> None:
    """The layer as configured: a receive outlives redis-py 8's old 5 s read timeout, and a
    message a full channel refuses is counted."""
    if "redis" not in settings.CHANNEL_LAYERS["default"]["BACKEND"].lower():
        pytest.skip("needs REDIS_URL (the team-mode child run sets it)")
    from channels.exceptions import ChannelFull
    from channels.layers import get_channel_layer
    from prometheus_client import REGISTRY

    def drops() -> float:
        return (
            REGISTRY.get_sample_value("porthole_channel_layer_drops_total", {"reason": "full"})
            or 0.0
        )

    async def scenario() -> None:
        layer = get_channel_layer()
        assert layer is not None
        channel = await layer.new_channel()
        with pytest.raises(TimeoutError):  # ours, not redis-py's read timeout
            await asyncio.wait_for(layer.receive(channel), 8)
        before = drops()
        with pytest.raises(ChannelFull):
            for n in range(layer.capacity + 1):
                await layer.send(channel, {"type": "x", "n": n})
        assert drops() == before + 1

    asyncio.run(scenario())


def test_it_keeps_installations_that_share_a_redis_apart_by_prefix() -> None:
    """REDIS_PREFIX: a group message of one installation never reaches another's members."""
    if "redis" not in settings.CHANNEL_LAYERS["default"]["BACKEND"].lower():
        pytest.skip("needs REDIS_URL (the team-mode child run sets it)")
    from dashboard.redis_layer import RedisChannelLayer, host_options

    def layer(prefix: str) -> RedisChannelLayer:
        return RedisChannelLayer(hosts=[host_options(redis_url())], prefix=prefix, expiry=30)

    async def scenario() -> None:
        ours, theirs = layer("porthole-ours"), layer("porthole-theirs")
        await _kept_apart(ours, theirs)
        for each in (ours, theirs):
            await each.close_pools()

    asyncio.run(scenario())


async def _kept_apart(ours: Any, theirs: Any) -> None:
    """Each of two installations' layers hears its own message to a group of the same
    name, and theirs never hears ours."""
    mine, other = await ours.new_channel(), await theirs.new_channel()
    await ours.group_add("session.x", mine)
    await theirs.group_add("session.x", other)
    await theirs.group_send("session.x", {"type": "session.events", "from": "theirs"})
    assert (await asyncio.wait_for(theirs.receive(other), 5))["from"] == "theirs"
    await ours.group_send("session.x", {"type": "session.events", "from": "ours"})
    assert (await asyncio.wait_for(ours.receive(mine), 5))["from"] == "ours"
    with pytest.raises(TimeoutError):  # nothing of ours reached them
        await asyncio.wait_for(theirs.receive(other), 1)
    for each in (ours, theirs):
        await each.flush()


def test_it_brings_a_viewer_what_its_worker_missed_while_cut_from_redis(
    crew: Team, alice: User
) -> None:
    """The live layer is Redis pub/sub: what is published while a worker's subscription is
    down is gone. The worker's feed finds it in the database, and the subscription comes
    back for what follows."""
    from dashboard.agents.recording import live_layer

    session = _session("cut")
    worker = crew.web()
    cookie = cookie_for(alice)
    channel = f"{settings.CHANNEL_LAYERS['live']['CONFIG']['prefix']}__group__"
    channel += session_group(session.id)

    def cut_and_publish(messages: list[Any]) -> None:
        """Drop every pub/sub connection, then publish, in one transaction: no subscriber
        can be back in between, so the message is lost for certain."""
        client = redis.Redis.from_url(redis_url())
        try:
            pipe = client.pipeline(transaction=True)
            pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            for group, message in messages:
                assert group == session_group(session.id)
                pipe.publish(channel, live_layer().serialize(message))
            killed, *receivers = pipe.execute()
            assert killed >= 1 and receivers == [0] * len(messages)
        finally:
            client.close()

    async def frames_until(ws: Any, text: str) -> None:
        while text not in str(await asyncio.wait_for(ws.recv(), 20)):
            pass

    async def watch() -> None:
        async with websockets.connect(
            _ws_url(worker, session), additional_headers=_headers(worker, cookie)
        ) as ws:
            await ws.send(json.dumps({"last_seq": 0}))
            await asyncio.wait_for(ws.recv(), 20)  # the state: the hello was taken
            await publish(await asyncio.to_thread(_record, session, "before the cut"))
            await frames_until(ws, "before the cut")
            cut_and_publish(await asyncio.to_thread(_record, session, "lost on the way"))
            await frames_until(ws, "lost on the way")
            await asyncio.to_thread(wait_until, lambda: _group_members(group) == 1, 20, "back")
            await publish(await asyncio.to_thread(_record, session, "after the cut"))
            await frames_until(ws, "after the cut")

    group = session_group(session.id)
    asyncio.run(watch())
    assert "never came; catching up" in worker.output(), worker.problems()


def test_it_keeps_live_streams_of_installations_on_other_databases_apart() -> None:
    """Pub/sub channels belong to the whole Redis server: two installations with the same
    prefix on two databases must still not hear each other's sessions."""
    if "redis" not in settings.CHANNEL_LAYERS["default"]["BACKEND"].lower():
        pytest.skip("needs REDIS_URL (the team-mode child run sets it)")
    from channels_redis.pubsub import RedisPubSubChannelLayer

    from dashboard.redis_layer import live_host_options, live_prefix

    base = redis_url().rsplit("/", 1)[0]

    def layer(database: int) -> RedisPubSubChannelLayer:
        url = f"{base}/{database}"
        return RedisPubSubChannelLayer(
            hosts=[live_host_options(url)], prefix=live_prefix(url, "asgi")
        )

    asyncio.run(_kept_apart(layer(7), layer(8)))
