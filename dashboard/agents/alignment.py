"""Lining a replayed scrollback up with what the bridge has already read.

Every connect to an exec session replays its scrollback ring (the last 1 MiB of stdout and
stderr chunks, oldest evicted first) and nothing on the wire says where it starts: no
offset, no sequence number, no "truncated" flag. The bridge keeps a `ReadLog` of what it
*read* (not only what it stored, which may lag behind during a flood): the tail of the
interleaved sequence of complete (stream, line) items, and the partial line of each
stream at the moment the connection broke.

`align` finds where the replay starts in that log: the longest overlap k such that the
first k replayed items equal the last k items read. It runs in linear time (rolling
hashes over the items, one full check of the winner) and is meant to run in a thread.
The ring evicts whole chunks, so the first replayed line of each stream may be the tail
of a longer line: those (at most two) items match by suffix, and one past the overlap is
joined to the partial line read before the cut.

No overlap and a replay that does not start at the process's first output is a gap: the
ring evicted output nobody read. It is reported with what is known of its size ("at least
N lines"); the first line of each stream, which may be a fragment, is dropped then rather
than stored cut. A replay that starts at the first output is recognised by size (the ring
was not full) or by its first line (the wrapper's `ready`).

Inherent limits (docs/reliability.md): when the output is exactly periodic across the
whole overlap, content cannot tell where the replay starts and the longest overlap wins;
a replay that starts exactly where reading stopped is indistinguishable from one that
starts later, and is reported as a (possible) gap.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from dashboard.opencomputer import JSONLineAssembler, Line, parse_line

RING_BYTES = 1024 * 1024
# Largest chunk a server reads at once: a replay smaller than the ring by this much is
# the whole output (nothing can have been evicted).
CHUNK_SLACK = 64 * 1024
HISTORY_BYTES = 2 * RING_BYTES + CHUNK_SLACK
# Less of one line than this is no evidence of an overlap: short fragments (`"}`) and
# short partial lines end many different lines.
MIN_EVIDENCE = 16

_MOD = (1 << 61) - 1
_BASE = random.randrange(1 << 20, _MOD - 1)

Item = tuple[str, str]  # (stream, the line as stored)
Key = Callable[[str, Line], str]  # how a line is stored (masked, storable), to compare


@dataclass
class ReadLog:
    """What a bridge has read of one session, bounded to a little over twice the ring."""

    items: deque[Item] = field(default_factory=deque)
    size: int = 0
    pending: dict[str, bytes] = field(default_factory=dict)  # partial line per stream
    read_any: bool = False  # anything read (or stored) at all

    def add(self, stream: str, stored: str) -> None:
        self.items.append((stream, stored))
        self.size += len(stored) + 1
        self.read_any = True
        while self.size > HISTORY_BYTES and len(self.items) > 1:
            _, old = self.items.popleft()
            self.size -= len(old) + 1

    @classmethod
    def of(cls, items: Iterable[Item]) -> ReadLog:
        log = cls()
        for stream, stored in items:
            log.add(stream, stored)
        return log


@dataclass
class Gap:
    lines_at_least: int  # lines known lost (fragments dropped at the ring's edge)
    first_connect: bool  # the replay of a first connect did not start at the first output


@dataclass
class Aligned:
    new: list[tuple[str, Line]]  # replayed lines not read before, in order
    assemblers: dict[str, JSONLineAssembler]  # to continue with live output
    gap: Gap | None = None
    overlap: int = 0  # items of the replay that had been read


def _h(item: Item) -> int:
    return hash(item) & _MOD


def _overlap(history: Sequence[Item], replay: Sequence[Item], loose: dict[int, str]) -> int:
    """The largest k with replay[:k] == history[-k:], where the replay items at the
    positions in `loose` (stream's first line: maybe a fragment) need only be a suffix."""
    n, m = len(history), len(replay)
    limit = min(n, m)
    if limit == 0:
        return 0
    powers = [1] * (limit + 1)
    for i in range(1, limit + 1):
        powers[i] = powers[i - 1] * _BASE % _MOD
    hist = [_h(item) for item in history[n - limit :]]  # history[n - limit + j] == hist[j]
    rep = [0 if i in loose else _h(item) for i, item in enumerate(replay[:limit])]
    best = 0
    prefix = 0  # hash of rep[:k]
    suffix = 0  # hash of hist[-k:]
    prefixes = [0] * (limit + 1)
    suffixes = [0] * (limit + 1)
    for k in range(1, limit + 1):
        prefix = (prefix * _BASE + rep[k - 1]) % _MOD
        suffix = (suffix + hist[limit - k] * powers[k - 1]) % _MOD
        prefixes[k], suffixes[k] = prefix, suffix
    for k in range(limit, 0, -1):
        window = suffixes[k]
        for u in loose:
            if u < k:
                window -= hist[limit - k + u] * powers[k - 1 - u]
        if window % _MOD != prefixes[k]:
            continue
        if _matches(history, replay, loose, k) and _convincing(replay, history, loose, k):
            best = k
            break
    return best


def _convincing(
    replay: Sequence[Item], history: Sequence[Item], loose: dict[int, str], k: int
) -> bool:
    """An overlap made only of fragments must hold a whole line or a long enough piece."""
    start = len(history) - k
    for i in range(k):
        if i not in loose:
            return True
        fragment = replay[i][1]
        if fragment == history[start + i][1] or len(fragment) >= MIN_EVIDENCE:
            return True
    return False


def _contained(history: Sequence[Item], replay: Sequence[Item], loose: dict[int, str]) -> bool:
    """Whether the replay is a contiguous run of the history (a replay cut short before it
    reached the end of what was read). Rolling hashes: linear."""
    n, m = len(history), len(replay)
    if m == 0 or m > n:
        return False
    powers = [1] * (m + 1)
    for i in range(1, m + 1):
        powers[i] = powers[i - 1] * _BASE % _MOD
    hist = [_h(item) for item in history]
    target = 0
    for i, item in enumerate(replay):
        target = (target * _BASE + (0 if i in loose else _h(item))) % _MOD
    window = 0
    for j in range(n):
        window = (window * _BASE + hist[j]) % _MOD
        if j >= m:
            window = (window - hist[j - m] * powers[m]) % _MOD
        if j < m - 1:
            continue
        start = j - m + 1
        masked = window
        for u in loose:
            masked -= hist[start + u] * powers[m - 1 - u]
        head = history[: start + m]
        if (
            masked % _MOD == target
            and _matches(head, replay, loose, m)
            and _convincing(replay, head, loose, m)
        ):
            return True
    return False


def _matches(
    history: Sequence[Item], replay: Sequence[Item], loose: dict[int, str], k: int
) -> bool:
    start = len(history) - k
    for i in range(k):
        mine, theirs = replay[i], history[start + i]
        if i in loose:
            if mine[0] != theirs[0] or not theirs[1].endswith(mine[1]):
                return False
        elif mine != theirs:
            return False
    return True


def _join(pending: bytes, tail: bytes) -> tuple[bytes, int]:
    """The line whose head we read (`pending`) and whose replay is `tail` (the line from
    wherever the ring starts, or from its start): (the whole line, bytes overlapping).
    The longest overlap wins."""
    if tail.startswith(pending):
        return tail, len(pending)
    probe = tail[:MIN_EVIDENCE]
    if len(probe) == MIN_EVIDENCE:
        start = pending.find(probe)
        while start >= 0:
            if tail.startswith(pending[start:]):
                return pending[:start] + tail, len(pending) - start
            start = pending.find(probe, start + 1)
    for size in range(min(MIN_EVIDENCE - 1, len(pending), len(tail)), 0, -1):
        if pending.endswith(tail[:size]):
            return pending[:-size] + tail, size
    return pending + tail, 0


def _looks_whole(stream: str, line: Line, agent_stream: str) -> bool:
    """Whether a line seen at the ring's edge can be kept after a gap: a JSON object on the
    agent's stdout cannot be the tail of a longer one; a stderr line could always be."""
    return stream == agent_stream and line.data is not None


def _wait_for_next_replay(log: ReadLog) -> Aligned:
    """Nothing kept from this replay: live output would continue the lines read before it."""
    carried: dict[str, JSONLineAssembler] = {}
    for stream, pending in log.pending.items():
        carried[stream] = JSONLineAssembler()
        carried[stream].feed(pending)
    return Aligned(new=[], assemblers=carried)


def align(
    log: ReadLog,
    replay: Sequence[tuple[str, bytes]],
    key: Key,
    *,
    agent_stream: str = "agent",
    ring_bytes: int = RING_BYTES,
    chunk_slack: int = CHUNK_SLACK,
    complete: bool = True,
) -> Aligned:
    """Which replayed lines are new, and the assemblers live output continues in.

    `complete` is False for a replay cut short (the connection broke before its end): it
    is still a contiguous piece of output and lines up the same way, but its size says
    nothing about whether the ring was full, and when nothing in it lines up with what
    was read it is no evidence of a gap (the next replay decides).
    """
    assemblers: dict[str, JSONLineAssembler] = {}
    lines: list[tuple[str, Line]] = []
    first: dict[str, int] = {}
    total = 0
    for stream, data in replay:
        total += len(data)
        assembler = assemblers.setdefault(stream, JSONLineAssembler())
        for line in assembler.feed(data):
            first.setdefault(stream, len(lines))
            lines.append((stream, line))
    for stream in log.pending:
        assemblers.setdefault(stream, JSONLineAssembler())
    items = [(stream, key(stream, line)) for stream, line in lines]
    loose = {index: stream for stream, index in first.items()}
    history = list(log.items)
    if not complete and _contained(history, items, loose):
        # Cut short before it reached the end of what was read. Checked first: with
        # repeated lines it may also look like an overlap, and storing old lines again
        # is worse than waiting for the next replay, which brings anything new again.
        return _wait_for_next_replay(log)
    k = _overlap(history, items, loose)

    # A stream's first line past the overlap, or its partial line, continues what we read.
    joins: dict[str, bytes] = {}
    joined_any = False
    for stream, pending in log.pending.items():
        index = first.get(stream)
        if not pending or (index is not None and index < k):
            continue  # nothing partial, or its partial line is complete later in the replay
        tail = (
            lines[index][1].text.encode("utf-8", "surrogatepass")
            if index is not None
            else assemblers[stream].peek()
        )
        joins[stream], overlapping = _join(pending, tail)
        joined_any = joined_any or overlapping >= MIN_EVIDENCE

    if k > 0 or joined_any or not lines:
        new = lines[k:]
        for stream, whole in joins.items():
            index = first.get(stream)
            if index is not None:
                new[index - k] = (stream, parse_line(whole.decode("utf-8", "replace")))
            else:
                assemblers[stream].reset()
                new += [(stream, line) for line in assemblers[stream].feed(whole)]
        return Aligned(new=new, assemblers=assemblers, overlap=k)
    new = lines
    if not log.read_any:
        whole_ring = complete and total + chunk_slack <= ring_bytes
        starts_ready = lines[0][0] == agent_stream and lines[0][1].type == "ready"
        if whole_ring or starts_ready:
            return Aligned(new=new, assemblers=assemblers)
    elif not complete:
        # Cut short with no evidence either way: too little of it to line up (a fragment
        # shorter than MIN_EVIDENCE), or a gap. Calling it a gap would mark output lost
        # that the ring still holds; the next replay, which brings all of this again, decides.
        return _wait_for_next_replay(log)
    # A gap: nothing read is left in the ring. Fragments at its edge are dropped.
    dropped = {
        index
        for stream, index in first.items()
        if not _looks_whole(stream, lines[index][1], agent_stream)
    }
    kept = [entry for index, entry in enumerate(lines) if index not in dropped]
    return Aligned(
        new=kept,
        assemblers=assemblers,
        gap=Gap(lines_at_least=len(dropped), first_connect=not log.read_any),
    )
