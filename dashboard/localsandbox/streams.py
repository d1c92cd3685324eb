"""One exec session's output: the scrollback ring, live subscribers and the wire frames.

Everything here runs on the event loop thread and never awaits while it mutates state, so
taking a snapshot of the ring and registering a subscriber happen atomically: no chunk can
slip between the replay and the live stream, and none can appear in both.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from dataclasses import dataclass

STDIN = 0x00
STDOUT = 0x01
STDERR = 0x02
EXIT = 0x03
SCROLLBACK_END = 0x04

SCROLLBACK_BYTES = 1024 * 1024
SUBSCRIBER_CHUNKS = 256


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of output exactly as it was read from one of the process's pipes."""

    stream: int  # STDOUT or STDERR
    data: bytes

    def frame(self) -> bytes:
        return bytes((self.stream,)) + self.data


def exit_frame(code: int) -> bytes:
    return bytes((EXIT,)) + struct.pack(">i", code)


SCROLLBACK_END_FRAME = bytes((SCROLLBACK_END,))


class ScrollbackRing:
    """The most recent output, up to `capacity` bytes of payload; the oldest chunks go first."""

    def __init__(self, capacity: int = SCROLLBACK_BYTES) -> None:
        self.capacity = capacity
        self.size = 0
        self.truncated = False  # some output was evicted: a late viewer starts mid-stream
        self._chunks: deque[Chunk] = deque()

    def append(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)
        self.size += len(chunk.data)
        while self.size > self.capacity:
            evicted = self._chunks.popleft()
            self.size -= len(evicted.data)
            self.truncated = True

    def snapshot(self) -> list[Chunk]:
        return list(self._chunks)


@dataclass(frozen=True, slots=True)
class Exited:
    code: int


class Subscriber:
    """One attached client's live feed: a bounded buffer that drops rather than waits.

    A client that reads too slowly loses live chunks (counted in `dropped`); the process's
    reader and the other clients never wait for it. The exit notice is never dropped.
    """

    def __init__(self, limit: int | None = SUBSCRIBER_CHUNKS) -> None:
        self.limit = limit  # None: unbounded, for in-process readers that keep up by design
        self.dropped = 0
        self._chunks: deque[Chunk] = deque()
        self._exit_code: int | None = None
        self._wakeup = asyncio.Event()

    def offer(self, chunk: Chunk) -> None:
        if self.limit is not None and len(self._chunks) >= self.limit:
            self.dropped += 1
            return
        self._chunks.append(chunk)
        self._wakeup.set()

    def finish(self, code: int) -> None:
        self._exit_code = code
        self._wakeup.set()

    async def next(self) -> Chunk | Exited:
        """The next live chunk, or the exit once every chunk before it has been taken."""
        while True:
            if self._chunks:
                return self._chunks.popleft()
            if self._exit_code is not None:
                return Exited(self._exit_code)
            self._wakeup.clear()
            await self._wakeup.wait()


class OutputHub:
    """Fans a session's output out to the ring and to every attached subscriber."""

    def __init__(
        self, capacity: int = SCROLLBACK_BYTES, subscriber_limit: int = SUBSCRIBER_CHUNKS
    ) -> None:
        self.ring = ScrollbackRing(capacity)
        self.subscriber_limit = subscriber_limit
        self.exit_code: int | None = None
        self._subscribers: set[Subscriber] = set()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, chunk: Chunk) -> None:
        self.ring.append(chunk)
        for subscriber in self._subscribers:
            subscriber.offer(chunk)

    def finish(self, code: int) -> None:
        self.exit_code = code
        for subscriber in self._subscribers:
            subscriber.finish(code)

    def subscribe(self, *, unbounded: bool = False) -> tuple[list[Chunk], Subscriber]:
        """The scrollback to replay and a feed of everything after it (atomic: no await)."""
        subscriber = Subscriber(None if unbounded else self.subscriber_limit)
        if self.exit_code is not None:
            subscriber.finish(self.exit_code)
        self._subscribers.add(subscriber)
        return self.ring.snapshot(), subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
