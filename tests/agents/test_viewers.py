"""A viewer's seq bookkeeping on its own: exactly once, in order, within the window."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from dashboard.agents.viewers import Batch, Cursor, StateFrames

SEQ = re.compile(r"<(\d+)>")


def _items(first: int, last: int) -> list[tuple[int, str]]:
    return [(seq, f"<{seq}>") for seq in range(first, last + 1)]


def _seqs(text: str | None) -> list[int]:
    return [int(s) for s in SEQ.findall(text or "")]


def test_it_sends_a_live_batch_that_continues_what_the_viewer_holds() -> None:
    cursor = Cursor(window=100)
    cursor.hello(3)
    assert cursor.fetch() == (3, 100)  # first the catch-up the hello asks for
    assert cursor.fetched([], 100) is None
    batch = Batch.of(_items(4, 6))
    assert cursor.offer(batch) is batch.text  # the shared frame, not a copy
    assert cursor.held == 6


def test_it_trims_a_batch_that_overlaps_and_drops_one_already_sent() -> None:
    cursor = Cursor()
    cursor.hello(0)
    cursor.fetch()
    assert _seqs(cursor.fetched(_items(1, 5), 200)) == [1, 2, 3, 4, 5]
    assert _seqs(cursor.offer(Batch.of(_items(4, 7)))) == [6, 7]
    assert cursor.offer(Batch.of(_items(2, 7))) is None


def test_it_catches_up_from_the_database_when_a_batch_skips_seqs() -> None:
    cursor = Cursor()
    cursor.hello(0)
    cursor.fetch()
    cursor.fetched([], 200)
    assert cursor.offer(Batch.of(_items(3, 4))) is None  # 1-2 were dropped by the layer
    assert cursor.fetch() == (0, 200)
    assert _seqs(cursor.fetched(_items(1, 4), 200)) == [1, 2, 3, 4]
    assert cursor.fetch() is None


def test_it_holds_back_past_the_window_until_the_page_acknowledges() -> None:
    cursor = Cursor(window=10, chunk=4)
    cursor.hello(0)
    cursor.fetch()
    cursor.fetched([], 4)
    assert _seqs(cursor.offer(Batch.of(_items(1, 8)))) == list(range(1, 9))
    assert cursor.offer(Batch.of(_items(9, 12))) is None  # 12 - 0 > 10: the viewer lags
    assert cursor.fetch() == (8, 2)  # only what the window still allows
    assert _seqs(cursor.fetched(_items(9, 10), 2)) == [9, 10]
    assert cursor.fetch() is None  # nothing more until an acknowledgement
    cursor.ack(10)
    assert cursor.fetch() == (10, 4)
    assert _seqs(cursor.fetched(_items(11, 12), 4)) == [11, 12]


def test_it_refreshes_state_once_a_lagging_viewer_has_caught_up() -> None:
    cursor = Cursor()
    assert not cursor.offer_state()  # before the hello
    cursor.hello(0)
    assert not cursor.refresh_state()  # still catching up
    cursor.fetch()
    cursor.fetched([], 200)
    assert cursor.refresh_state() and not cursor.refresh_state()
    assert cursor.offer_state()


def test_it_joins_state_fragments_once_per_kind_of_viewer() -> None:
    frames = StateFrames({"status": "S", "status_shared": "s", "controls": "C", "row": "R"})
    steering = frames.frame(shared=False, steer=True)
    assert steering == "SC" and frames.frame(shared=False, steer=True) is steering
    assert frames.frame(shared=True, steer=True) == "s"
    assert frames.frame(shared=False, steer=False) == "S"


# -- any interleaving ------------------------------------------------------------------------


@dataclass
class World:
    """A session's database, the channel layer's queue for one worker, and one page."""

    cursor: Cursor
    stored: int
    page_start: int
    layer: list[Batch] = field(default_factory=list)
    page: list[int] = field(default_factory=list)
    query: tuple[int, int] | None = None
    result: list[tuple[int, str]] | None = None

    def show(self, text: str | None) -> None:
        seqs = _seqs(text)
        if seqs:
            held = self.page[-1] if self.page else self.page_start
            assert seqs == list(range(held + 1, held + 1 + len(seqs))), (held, seqs)
            self.page += seqs
        assert self.cursor.held is None or self.cursor.held - self.cursor.acked <= (
            self.cursor.window
        )

    def step(self, op: str, n: int) -> None:
        cursor = self.cursor
        if op == "append":
            batch = Batch.of(_items(self.stored + 1, self.stored + n))
            self.stored += n
            if n % 3:  # else the layer dropped it (a full channel)
                self.layer.append(batch)
            if n == 4:
                self.layer.append(batch)  # and sometimes it arrives twice
        elif op == "deliver" and self.layer:
            self.show(cursor.offer(self.layer.pop(0)))
        elif op == "hello":
            cursor.hello(self.page_start)
        elif op == "ack":
            cursor.ack(self.page[-1] if self.page else self.page_start)
        elif op == "ask" and self.query is None:
            self.query = cursor.fetch()
        elif op == "read" and self.query is not None and self.result is None:
            after, limit = self.query
            self.result = _items(after + 1, min(self.stored, after + limit))
        elif op == "answer" and self.result is not None and self.query is not None:
            self.show(cursor.fetched(self.result, self.query[1]))
            self.query = self.result = None


OPS = st.sampled_from(["append", "deliver", "hello", "ack", "ask", "read", "answer"])


@settings(max_examples=400, deadline=None)
@given(
    stored=st.integers(0, 30),
    held=st.integers(0, 30),
    window=st.integers(1, 12),
    chunk=st.integers(1, 8),
    steps=st.lists(st.tuples(OPS, st.integers(1, 5)), max_size=80),
)
def test_it_sends_every_seq_once_in_order_whatever_the_interleaving(
    stored: int, held: int, window: int, chunk: int, steps: list[tuple[str, int]]
) -> None:
    world = World(Cursor(window=window, chunk=chunk), stored=stored, page_start=min(held, stored))
    for op, n in steps:
        world.step(op, n)
    # Then the layer delivers what it still holds, one more event is published (the next
    # live batch reveals any drop), and the page keeps acknowledging what it got.
    if world.result is not None:
        world.step("answer", 0)
    elif world.query is not None:
        world.step("read", 0)
        world.step("answer", 0)
    world.step("hello", 0)
    while world.layer:
        world.step("deliver", 0)
    world.stored += 1
    world.layer.append(Batch.of(_items(world.stored, world.stored)))
    world.step("deliver", 0)
    for _ in range(10 * (world.stored + 1)):
        world.step("ack", 0)
        world.step("ask", 0)
        if world.query is None:
            break
        world.step("read", 0)
        world.step("answer", 0)
    assert world.page == list(range(world.page_start + 1, world.stored + 1))
