"""Lining up a replayed scrollback with what is already stored.

Every connect to an exec session replays its scrollback ring, and nothing on the wire
says where the replay starts. The bridge compares the replayed lines with the tail of
the lines it stored for the same stream: the longest prefix of the replay that equals
a suffix of what is stored is what we already have; the rest is new. When nothing
overlaps while something is stored, the ring evicted output nobody read: a gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Alignment:
    new_lines: list[str]
    gap: bool  # output between what we stored and the replay's start is gone
    dropped_partial: bool  # the replay began mid-line (the ring evicted the line's head)


def _overlap(stored: Sequence[str], replay: Sequence[str]) -> int:
    """The largest j with replay[:j] == stored[-j:], or 0."""
    if not stored or not replay:
        return 0
    last = stored[-1]
    longest = min(len(stored), len(replay))
    # Only positions where the replay holds our last stored line can end an overlap.
    for j in range(longest, 0, -1):
        if replay[j - 1] != last:
            continue
        if list(replay[:j]) == list(stored[len(stored) - j :]):
            return j
    return 0


def align(
    stored_tail: Sequence[str], replay: Sequence[str], *, truncated: bool = False
) -> Alignment:
    """Which replayed lines are new, given the tail of the stored lines of the same stream.

    `stored_tail` must reach back at least as far as the ring does (the bridge loads the
    stored lines covering more than the ring's size). `truncated` says the server evicted
    part of the ring, so the first replayed line may be the tail of a longer line.
    """
    if not replay:
        return Alignment([], gap=False, dropped_partial=False)
    j = _overlap(stored_tail, replay)
    if j:
        return Alignment(list(replay[j:]), gap=False, dropped_partial=False)
    # The replay may begin with the tail of a line whose head was evicted.
    j = _overlap(stored_tail, replay[1:])
    if j:
        return Alignment(list(replay[1 + j :]), gap=False, dropped_partial=True)
    if not stored_tail and not truncated:
        return Alignment(list(replay), gap=False, dropped_partial=False)
    # Nothing we hold is still in the ring: whatever came between is lost. The first
    # line is a fragment only when the ring was cut; a whole line is kept.
    if truncated and _looks_partial(replay[0]):
        return Alignment(list(replay[1:]), gap=True, dropped_partial=True)
    return Alignment(list(replay), gap=True, dropped_partial=False)


def _looks_partial(line: str) -> bool:
    """A line the ring cut in two no longer starts a JSON object."""
    return not line.lstrip().startswith("{")
