"""Who is watching a session now, announced at most once a second.

Each open session socket is a `Watcher` row (written when it opens, deleted when it closes,
refreshed together with the other sockets of its worker, and counted while fresh). Opening
or closing a socket only marks the list out of date; the worker then renders the list once
and sends it to the session's group, at most once per `INTERVAL` (`Coalescer`). Five
hundred viewers arriving at once cost five hundred row writes and a handful of renders,
instead of five hundred renders each sent to up to five hundred viewers.
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


@database_sync_to_async
def _arrive(channel: str, session_id: str, user: Any, link_id: int | None) -> None:
    Watcher.objects.update_or_create(
        channel_name=channel,
        defaults={
            "session_id": UUID(session_id),
            "seen_at": timezone.now(),
            "user": user if user is not None and user.is_authenticated else None,
            "share_link_id": link_id,
        },
    )


@database_sync_to_async
def _leave(channel: str) -> None:
    Watcher.objects.filter(channel_name=channel).delete()


@database_sync_to_async
def _refresh(channels: list[str]) -> None:
    Watcher.objects.filter(channel_name__in=channels).update(seen_at=timezone.now())


class Presence:
    """One session's watchers on this worker: their rows, and the coalesced announcement."""

    def __init__(self, session_id: str, announce: Callable[[dict[str, str]], Awaitable[None]]):
        self.session_id = session_id
        self._announce = announce
        self.updates = Coalescer(INTERVAL, self._send)

    async def _send(self) -> None:
        await self._announce(await database_sync_to_async(render_watchers)(self.session_id))

    async def arrive(self, channel: str, user: Any, link_id: int | None) -> None:
        await _arrive(channel, self.session_id, user, link_id)
        self.updates.poke()

    async def leave(self, channel: str) -> None:
        await _leave(channel)
        self.updates.poke()

    async def refresh(self, channels: Iterable[str]) -> None:
        """Keep this worker's sockets counted: one query for all of them."""
        names = list(channels)
        if names:
            await _refresh(names)

    async def current(self) -> dict[str, str]:
        return await database_sync_to_async(render_watchers)(self.session_id)
