"""Long pure-Python work on a thread of its own, without starving the event loop.

A thread that keeps the GIL keeps it for the interpreter's whole switch interval (5 ms)
while the event loop waits: a bridge's reader with the upstream socket unread (DESIGN §2,
invariant 5), the next event's record and announcement. Such work calls a `HandOver`
between its items, which lets the GIL go about once a millisecond. Not after every item: a
`sleep(0)` is a system call, ~70 µs on a VM.
"""

from __future__ import annotations

import time

EVERY = 0.001  # seconds of work between two hand-overs


class HandOver:
    def __init__(self, every: float | None = None) -> None:
        self.every = EVERY if every is None else every
        self.last = time.perf_counter()

    def __call__(self) -> None:
        if time.perf_counter() - self.last > self.every:
            time.sleep(0)
            self.last = time.perf_counter()
