"""Who is watching a session now, announced at most once a second.

Each open session socket is a `Watcher` row (written after it opens, deleted after it
closes, refreshed together with the other sockets of its worker, and counted while fresh).
Opening or closing a socket only notes the change and marks the list out of date; the worker
then writes every noted change in one query, renders the list once and sends it to the
session's group, at most once per `INTERVAL` (`Coalescer`). Five hundred viewers arriving at
once cost a handful of queries and renders, instead of five hundred row writes and five
hundred renders each sent to up to five hundred viewers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Any
from uuid import UUID

from channels.db import database_sync_to_async
from django.template.loader import render_to_string
from django.utils import timezone

from dashboard.agents.models import Watcher

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between two updates of one session's watcher list, at least
WATCHER_TTL = 90  # seconds a socket counts as watching since its worker last refreshed it
REFRESH = WATCHER_TTL / 3


class Coalescer:
    """Runs `action` after `poke()`: at once if it has not run for `interval` seconds, else
    once at the end of that interval, however many pokes came meanwhile."""

    def __init__(self, interval: float, action: Callable[[], Awaitable[None]]) -> None:
        self.interval = interval
        self.action = action
        self.runs = 0
        self._dirty = False
        self._last = float("-inf")
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> bool:
        return self._dirty

    def poke(self) -> None:
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self._dirty:
            wait = self._last + self.interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._dirty = False
            self._last = time.monotonic()
            self.runs += 1
            try:
                await self.action()
            except Exception:  # the next poke tries again
                log.exception("coalesced update failed")

    def cancel(self) -> None:
        self._dirty = False
        if self._task is not None:
            self._task.cancel()


def render_watchers(session_id: str) -> dict[str, str]:
    """Who watches, for members ("html") and, without names, for link holders ("shared")."""
    fresh = Watcher.objects.filter(
        session_id=UUID(session_id), seen_at__gt=timezone.now() - timedelta(seconds=WATCHER_TTL)
    ).select_related("user")
    names = sorted({w.user.get_username() for w in fresh if w.user is not None})
    links = sum(1 for w in fresh if w.user is None)
    context = {"watchers": {"names": names, "links": links}, "oob": True}
    return {
        "html": render_to_string("agents/session.html#watchers", {**context, "member": True}),
        "shared": render_to_string("agents/session.html#watchers", {**context, "member": False}),
    }


Arrival = tuple[int | None, int | None]  # (user id, share link id)


@database_sync_to_async
def _write(session_id: str, arriving: dict[str, Arrival], leaving: set[str]) -> None:
    if leaving:
        Watcher.objects.filter(channel_name__in=leaving).delete()
    if arriving:
        now = timezone.now()
        Watcher.objects.bulk_create(
            [
                Watcher(
                    channel_name=channel,
                    session_id=UUID(session_id),
                    seen_at=now,
                    user_id=user_id,
                    share_link_id=link_id,
                )
                for channel, (user_id, link_id) in arriving.items()
            ],
            update_conflicts=True,
            unique_fields=["channel_name"],
            update_fields=["session", "seen_at", "user", "share_link"],
        )


@database_sync_to_async
def _refresh(channels: list[str]) -> None:
    Watcher.objects.filter(channel_name__in=channels).update(seen_at=timezone.now())


class Presence:
    """One session's watchers on this worker: their rows, and the coalesced announcement."""

    def __init__(self, session_id: str, announce: Callable[[dict[str, str]], Awaitable[None]]):
        self.session_id = session_id
        self._announce = announce
        self.updates = Coalescer(INTERVAL, self._send)
        self.writes = 0  # queries that wrote arrivals and departures, for the tests
        self._arriving: dict[str, Arrival] = {}
        self._leaving: set[str] = set()

    async def _send(self) -> None:
        await self.flush()
        await self._announce(await database_sync_to_async(render_watchers)(self.session_id))

    def arrive(self, channel: str, user: Any, link_id: int | None) -> None:
        user_id = user.pk if user is not None and user.is_authenticated else None
        self._leaving.discard(channel)
        self._arriving[channel] = (user_id, link_id)
        self.updates.poke()

    def leave(self, channel: str) -> None:
        if self._arriving.pop(channel, None) is None:  # else it was never written
            self._leaving.add(channel)
        self.updates.poke()

    async def flush(self) -> None:
        """Write the arrivals and departures noted since the last flush, in one query."""
        arriving, leaving = self._arriving, self._leaving
        if not arriving and not leaving:
            return
        self._arriving, self._leaving = {}, set()
        self.writes += 1
        try:
            await _write(self.session_id, arriving, leaving)
        except BaseException:
            # Noted again for the next flush, unless the socket left meanwhile.
            for channel, arrival in arriving.items():
                if channel not in self._leaving:
                    self._arriving.setdefault(channel, arrival)
            self._leaving |= leaving
            raise

    async def refresh(self, channels: Iterable[str]) -> None:
        """Keep this worker's sockets counted: one query for all of them."""
        names = list(channels)
        if names:
            await _refresh(names)

    async def current(self) -> dict[str, str]:
        await self.flush()
        return await database_sync_to_async(render_watchers)(self.session_id)
