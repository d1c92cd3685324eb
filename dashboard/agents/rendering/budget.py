"""What one event may cost to render, and one page render as a whole (issue 7).

A hostile agent can print a 2 MB message of a hundred blocks built to make the markdown
parser work (20,000 `[` each: seconds of CPU). Every event therefore renders under a
`Budget`: a number of characters it may show (every `clip` draws on it) and a number of
work units it may spend on markdown and highlighting (`markdown.work`; highlighted code
costs its length). Text past the work budget is shown as plain escaped text; content past
the shown budget is left out, with the "large: download" link to the full payload (the
export always has all of it). A page render shares one more budget across its events, so
a page of two hundred hostile events costs no more than PAGE_WORK either.

The current event's budget travels in a context variable: every renderer under `describe`
draws on it without threading it through each call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

EVENT_SHOWN = 40_000  # characters one event may show
EVENT_WORK = 30_000  # markdown/highlight work units for one event (about 60 ms at worst)
PAGE_WORK = 400_000  # for one page render (200 events), shared


@dataclass
class PageBudget:
    work: int = PAGE_WORK


@dataclass
class Budget:
    shown: int = EVENT_SHOWN
    work: int = EVENT_WORK
    page: PageBudget | None = None
    exceeded: bool = field(default=False)  # something was cut or shown plain

    def take_shown(self, wanted: int) -> int:
        """How many of `wanted` characters may be shown (and draw them)."""
        allowed = max(0, min(wanted, self.shown))
        self.shown -= allowed
        if allowed < wanted:
            self.exceeded = True
        return allowed

    def spend(self, units: int) -> bool:
        """Whether `units` of work may be spent (and spend them if so)."""
        if units > self.work or (self.page is not None and units > self.page.work):
            self.exceeded = True
            return False
        self.work -= units
        if self.page is not None:
            self.page.work -= units
        return True

    @property
    def exhausted(self) -> bool:
        return self.shown <= 0


# Outside any `event_budget` (tests rendering a lone block, the export) nothing is limited
# beyond the per-field caps.
_current: ContextVar[Budget | None] = ContextVar("render_budget", default=None)


def current() -> Budget:
    budget = _current.get()
    return budget if budget is not None else Budget(shown=1 << 62, work=1 << 62)


@contextmanager
def event_budget(page: PageBudget | None = None) -> Iterator[Budget]:
    budget = Budget(page=page)
    token = _current.set(budget)
    try:
        yield budget
    finally:
        _current.reset(token)
