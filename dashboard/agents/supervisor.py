"""The bridge supervisor: claims live sessions' leases and runs a bridge for each.

It runs in `manage.py bridges` (bridges only) or `manage.py serve` (web and bridges), so
recording continues with no viewer and after a restart. A tick is one short claim
(`leases.claim`, which skips rows other workers hold locked and never waits on a lock);
each bridge is a task of its own, so one stuck session never delays the others.

A worker's identity (`owner`) should be stable across restarts (`--worker-id`, or
`PORTHOLE_WORKER_ID`; `serve` derives one from the host and port): a restarted worker
then claims its own sessions back at once instead of waiting for their leases to lapse.
On a clean stop it releases its leases so another worker can claim them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connections

from dashboard import metrics
from dashboard.agents import leases
from dashboard.agents.bridge import INDEX_TAIL, Bridge, backoff_delay
from dashboard.agents.leases import Lease
from dashboard.agents.recording import draw_the_rest
from dashboard.search.index import index_tail

log = logging.getLogger(__name__)

WAKE_GROUP = "bridges"


def worker_id(stable: str = "") -> str:
    """`PORTHOLE_WORKER_ID` if set, else `stable` (e.g. host:serve:port), else a fresh one."""
    configured = getattr(settings, "PORTHOLE_WORKER_ID", "") or os.environ.get(
        "PORTHOLE_WORKER_ID", ""
    )
    if configured:
        return configured[:64]
    if stable:
        return stable[:64]
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"[:64]


class BridgeSupervisor:
    """Starts and tracks this process's bridges."""

    POLL_SECONDS = 2.0
    # Ended sessions a bridge left unfinished are looked for at the first tick and every
    # this many after (about 30 s): the query reads every ended session's row.
    FINISH_EVERY = 15
    WAKE_GROUP = WAKE_GROUP

    def __init__(self, owner: str | None = None) -> None:
        self.owner = owner or worker_id()
        self.ticks = 0
        self.bridges: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._finishing: asyncio.Task[None] | None = None

    async def run(self) -> None:
        async with ThreadSensitiveContext():  # its database hops wait on nobody else's
            listener = asyncio.create_task(self._listen_for_wakeups())
            try:
                while True:
                    await self.tick()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.POLL_SECONDS)
                    self._wake.clear()
            finally:
                listener.cancel()
                await self.stop()

    def running(self) -> set[str]:
        return {sid for sid, task in self.bridges.items() if not task.done()}

    async def tick(self) -> list[str]:
        claimed = await self._claim()
        # After the live sessions are resumed, and beside the ticks rather than in them:
        # finishing an ended session can mean drawing thousands of events its bridge left
        # (seconds), and the heartbeat and the claims must go on meanwhile.
        if self.ticks % self.FINISH_EVERY == 0 and (
            self._finishing is None or self._finishing.done()
        ):
            self._finishing = asyncio.create_task(self._finish(), name="bridges-finish")
        self.ticks += 1
        return claimed

    async def finished(self) -> None:
        """Wait for the finishing of ended sessions in flight, if any (tests)."""
        if self._finishing is not None:
            await asyncio.shield(self._finishing)

    async def _claim(self) -> list[str]:
        try:
            await database_sync_to_async(leases.heartbeat)(self.owner)
            claimed = await database_sync_to_async(leases.claim)(self.owner, self.running())
        except Exception:
            log.exception("bridge supervisor: cannot claim sessions")
            return []
        metrics.LEASES_CLAIMED.inc(len(claimed))
        for lease in claimed:
            log.info(
                "bridge %s: claimed by %s (lease epoch %s)",
                lease.session_id,
                self.owner,
                lease.epoch,
                extra={"session_id": lease.session_id},
            )
            bridge = Bridge(lease.session_id, self.owner, lease=lease)
            self.bridges[lease.session_id] = asyncio.create_task(
                self._run_bridge(bridge, lease), name=f"bridge-{lease.session_id}"
            )
        return [lease.session_id for lease in claimed]

    async def _run_bridge(self, bridge: Bridge, lease: Lease) -> None:
        try:
            await bridge.run()
        except Exception:
            log.exception("bridge %s crashed; its lease will be retaken", bridge.session_id)
            await asyncio.sleep(backoff_delay(3))
        finally:
            # Released on a clean stop too (cancelled): another worker takes over at once.
            # Not when the session ended and the bridge stopped before it had indexed that
            # end: the lease lapses, and a supervisor finishes the session (`_finish`).
            if bridge.complete or not bridge.ended:
                with contextlib.suppress(Exception):
                    await asyncio.shield(database_sync_to_async(leases.release)(lease))

    async def _finish(self) -> None:
        try:
            finished = await sync_to_async(_finish_unfinished, thread_sensitive=False)(
                self.owner, self.running()
            )
        except Exception:
            log.exception("bridge supervisor: cannot finish ended sessions")
            return
        for session_id in finished:
            log.info("bridge %s: finished what a stopped bridge left of its end", session_id)

    async def _listen_for_wakeups(self) -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        channel = await layer.new_channel()
        await layer.group_add(WAKE_GROUP, channel)
        try:
            while True:
                try:
                    await layer.receive(channel)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.warning("bridge supervisor: wake-up channel failed", exc_info=True)
                    await asyncio.sleep(self.POLL_SECONDS)
                    continue
                self._wake.set()
        finally:
            with contextlib.suppress(Exception):
                await layer.group_discard(WAKE_GROUP, channel)

    async def stop(self) -> None:
        """Stop every bridge (each releases its lease) and retire this worker."""
        if self._finishing is not None:
            self._finishing.cancel()  # what it draws is fenced by the lease it holds
            with contextlib.suppress(BaseException):
                await self._finishing
        tasks = list(self.bridges.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await database_sync_to_async(leases.retire)(self.owner)


def _finish_unfinished(owner: str, running: set[str]) -> list[str]:
    """`finish_unfinished` on a thread of its own (not the supervisor's), with the
    connection it opened there closed after."""
    try:
        return finish_unfinished(owner, running)
    finally:
        connections.close_all()


def finish_unfinished(owner: str, running: set[str]) -> list[str]:
    """For each ended session whose bridge stopped (killed, or cancelled) between recording
    its end and indexing it (`leases.claim_unfinished`): draw and index what it left out,
    release."""
    finished = []
    for lease in leases.claim_unfinished(owner, running):
        index_tail(lease.session_id, INDEX_TAIL)  # first: it looks back from the undrawn
        draw_the_rest(lease.session_id, lease=lease)
        leases.release(lease)
        finished.append(lease.session_id)
    return finished


async def wake_supervisors() -> None:
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(WAKE_GROUP, {"type": "bridges.wake"})
