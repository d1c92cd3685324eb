"""What one viewer of a session has been sent, and what it should be sent next.

Plain bookkeeping, no I/O: the consumer (`consumers.py`) feeds it what happens — the page's
hello and acknowledgements, live batches from the channel layer, catch-up results from the
database — and sends what it returns. Together they keep invariant 2 (every event exactly
once, in order) and invariant 6 (a slow viewer never grows memory without bound):

- `held` is the last seq the viewer was sent; only a batch that continues it is sent live
  (trimmed when it overlaps). A batch that skips seqs (the layer dropped one, or the
  viewer is still catching up) or that would pass the flow-control window is dropped and
  the viewer marked `stale`: the database has those events, and a catch-up brings them.
- Flow control: the page acknowledges the seqs it has swapped in; at most `window` events
  are sent beyond the last acknowledgement. A viewer that stops reading stops receiving,
  and resumes from the database once it acknowledges again.
- Fragments that follow the session's state (header, controls, watchers) are dropped while
  the viewer is behind and refreshed from the database once it has caught up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

# Events sent to one viewer beyond its last acknowledgement, at most.
WINDOW = 1_000
# Events read from the database per catch-up query, at most.
CHUNK = 200

Item = tuple[int, str]


@dataclass(frozen=True, eq=False)
class Batch:
    """Consecutive events as one frame of HTML: joined once, shared by every viewer."""

    items: tuple[Item, ...]

    @classmethod
    def of(cls, items: Sequence[Sequence[Any]]) -> Batch:
        """From a channel message's items (lists once they crossed Redis)."""
        return cls(tuple((int(item[0]), str(item[1])) for item in items))

    def continued_by(self, other: Batch) -> bool:
        """Whether `other` starts right after this batch, so the two may be one frame."""
        return bool(self.items and other.items) and other.first == self.last + 1

    def joined(self, other: Batch) -> Batch:
        return Batch(self.items + other.items)

    @property
    def first(self) -> int:
        return self.items[0][0]

    @property
    def last(self) -> int:
        return self.items[-1][0]

    @cached_property
    def text(self) -> str:
        return "".join(html for _, html in self.items)

    def after(self, seq: int) -> str:
        """The frame for a viewer that holds `seq`: the shared text unless it overlaps."""
        if seq < self.first:
            return self.text
        return "".join(html for s, html in self.items if s > seq)


@dataclass(slots=True)
class Cursor:
    """One viewer's position in its session's stream (one per open socket: kept small)."""

    window: int = WINDOW
    chunk: int = CHUNK
    held: int | None = None  # the last seq sent; None until the page said hello
    acked: int = 0
    stale: bool = False  # the database has events past `held` that no live batch will bring
    fetching: bool = False  # a catch-up query is on its way
    state_stale: bool = False  # header, controls or watchers were not sent: refresh them

    @property
    def greeted(self) -> bool:
        return self.held is not None

    @property
    def room(self) -> int:
        """How many more events may be sent before the page acknowledges some."""
        return 0 if self.held is None else self.window - (self.held - self.acked)

    @property
    def behind(self) -> bool:
        return self.held is None or self.stale or self.fetching

    def hello(self, last_seq: int, latest: int | None = None) -> None:
        """The page holds everything up to `last_seq`: catch it up from there. `latest` is
        the last seq its worker knows to exist (read after subscribing, then from the live
        stream): a page that holds it needs no query, only the state fragments."""
        if self.held is not None:
            return  # said once per socket
        self.held = self.acked = max(last_seq, 0)
        self.stale = latest is None or self.held < latest
        self.state_stale = True

    def ack(self, seq: int) -> None:
        if self.held is not None:
            self.acked = max(self.acked, min(seq, self.held))

    def offer(self, batch: Batch) -> str | None:
        """The frame to send for a live batch, or None (then see `fetch`)."""
        if self.held is None or not batch.items or batch.last <= self.held:
            return None  # before the hello (its catch-up covers it), or already sent
        if batch.first > self.held + 1 or batch.last - self.acked > self.window:
            self.stale = True
            return None
        text = batch.after(self.held)
        self.held = batch.last
        return text

    def skip(self, batch: Batch) -> None:
        """A live batch this viewer could not take now (it is busy sending)."""
        if self.held is not None and batch.items and batch.last > self.held:
            self.stale = True

    def missed(self) -> None:
        """Messages for this viewer were lost: events, and perhaps the state with them."""
        self.stale = self.state_stale = True

    def defer_state(self) -> None:
        """A state fragment could not be sent now (the socket is busy): refresh it later."""
        self.state_stale = True

    def offer_state(self) -> bool:
        """Whether a state fragment may be sent now; if not, it is refreshed later."""
        if self.behind:
            self.state_stale = True
            return False
        return True

    def fetch(self) -> tuple[int, int] | None:
        """The next catch-up query, (after seq, limit), or None when none is due."""
        if self.held is None or not self.stale or self.fetching or self.room <= 0:
            return None
        self.stale, self.fetching = False, True
        return self.held, min(self.chunk, self.room)

    @property
    def wants_catch_up(self) -> bool:
        """Whether a catch-up (events, or then the state fragments) is due now."""
        if self.held is None or self.fetching:
            return False
        return (self.stale and self.room > 0) or (self.state_stale and not self.stale)

    def abandon(self) -> None:
        """The catch-up query failed or was cancelled: try again later."""
        self.fetching = False
        self.stale = True

    def fetched(self, items: Sequence[Item], limit: int) -> str | None:
        """Take a catch-up query's result (events after the seq `fetch` gave, in order)."""
        assert self.held is not None and self.fetching
        self.fetching = False
        if len(items) >= limit:
            self.stale = True  # there may be more
        fresh = [(seq, html) for seq, html in items if seq > self.held]
        if not fresh:
            return None
        self.held = fresh[-1][0]
        return "".join(html for _, html in fresh)

    def refresh_state(self) -> bool:
        """Whether the state fragments are due now that the viewer has caught up."""
        if self.state_stale and not self.behind:
            self.state_stale = False
            return True
        return False


@dataclass
class StateFrames:
    """A `session.state` message's fragments, joined once per kind of viewer."""

    message: dict[str, str]
    _frames: dict[tuple[bool, bool], str] = field(default_factory=dict)

    def frame(self, *, shared: bool, steer: bool) -> str:
        key = (shared, steer and not shared)
        if key not in self._frames:
            parts = [self.message["status_shared" if shared else "status"]]
            if key[1]:
                parts.append(self.message["controls"])
            self._frames[key] = "".join(parts)
        return self._frames[key]
