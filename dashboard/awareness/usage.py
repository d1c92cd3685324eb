"""Usage over a period: cost, tokens and turns per day, per person and per model, and the
geometry of the charts that show them (the SVG itself is drawn by templates).

A session counts on the day it started (in TIME_ZONE), with the totals recording keeps for it
(the sum of its `result` events). Sums are taken in Python over `Decimal`s, so they are exact to
the last recorded digit on every database.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.core.cache import cache
from django.db.models import QuerySet
from django.utils import timezone

from dashboard.agents.models import AgentSession

PERIODS = {"7d": ("7 days", 7), "30d": ("30 days", 30), "90d": ("90 days", 90)}
DEFAULT_PERIOD = "30d"
MAX_DAYS = 366
NOBODY = "(nobody)"
NO_MODEL = "(unknown)"
CENT = Decimal("0.01")


@dataclass(frozen=True)
class Period:
    start: date
    end: date  # inclusive
    key: str  # "7d", "30d", "90d" or "custom"
    error: str = ""

    @property
    def days(self) -> list[date]:
        return [self.start + timedelta(days=n) for n in range((self.end - self.start).days + 1)]

    @property
    def label(self) -> str:
        return PERIODS[self.key][0] if self.key in PERIODS else f"{self.start} – {self.end}"

    def query(self) -> dict[str, str]:
        if self.key in PERIODS:
            return {"period": self.key}
        return {"period": "custom", "start": self.start.isoformat(), "end": self.end.isoformat()}


def period_from(params: Mapping[str, str], *, today: date | None = None) -> Period:
    """The period a request asks for; a bad one falls back to the default, saying why."""
    today = today or timezone.localdate()
    # Dates without a period (a hand-written or shortened link) ask for those dates.
    dated = "start" in params or "end" in params
    key = params.get("period") or ("custom" if dated else DEFAULT_PERIOD)
    if key in PERIODS:
        return Period(today - timedelta(days=PERIODS[key][1] - 1), today, key)
    if key == "custom":
        try:
            start = date.fromisoformat(params.get("start", ""))
            end = date.fromisoformat(params.get("end", ""))
        except ValueError:
            error = "Give both dates as YYYY-MM-DD."
        else:
            if start > end:
                error = "The start must not be after the end."
            elif (end - start).days + 1 > MAX_DAYS:
                error = f"A period covers at most {MAX_DAYS} days."
            else:
                return Period(start, end, "custom")
        fallback = period_from({"period": DEFAULT_PERIOD}, today=today)
        return Period(fallback.start, fallback.end, fallback.key, error)
    return period_from({"period": DEFAULT_PERIOD}, today=today)


def sessions_in(period: Period) -> QuerySet[AgentSession]:
    return AgentSession.objects.filter(
        started_at__date__gte=period.start, started_at__date__lte=period.end
    )


@dataclass
class Totals:
    sessions: int = 0
    turns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal = field(default_factory=lambda: Decimal(0))

    def add(self, row: Mapping[str, Any]) -> None:
        self.sessions += 1
        self.turns += row["num_turns"]
        self.input_tokens += row["input_tokens"]
        self.output_tokens += row["output_tokens"]
        self.cost += row["total_cost_usd"]

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class Usage:
    period: Period
    total: Totals
    by_day: list[tuple[date, Totals]]
    by_person: list[tuple[str, Totals]]
    by_model: list[tuple[str, Totals]]
    rows: list[tuple[date, str, str, Totals]]  # the CSV: day × person × model


def _local_day(moment: datetime) -> date:
    return timezone.localtime(moment).date()


def usage(period: Period) -> Usage:
    fields = ("started_at", "started_by__username", "model", "num_turns", "input_tokens")
    values = sessions_in(period).values(*fields, "output_tokens", "total_cost_usd")
    total = Totals()
    days: dict[date, Totals] = {day: Totals() for day in period.days}
    people: dict[str, Totals] = defaultdict(Totals)
    models: dict[str, Totals] = defaultdict(Totals)
    cells: dict[tuple[date, str, str], Totals] = defaultdict(Totals)
    for row in values:
        day = _local_day(row["started_at"])
        person = row["started_by__username"] or NOBODY
        model = row["model"] or NO_MODEL
        for bucket in (total, days.setdefault(day, Totals()), people[person], models[model]):
            bucket.add(row)
        cells[(day, person, model)].add(row)

    def biggest(items: dict[str, Totals]) -> list[tuple[str, Totals]]:
        return sorted(items.items(), key=lambda item: (-item[1].cost, -item[1].tokens, item[0]))

    return Usage(
        period=period,
        total=total,
        by_day=sorted(days.items()),
        by_person=biggest(people),
        by_model=biggest(models),
        rows=[(d, p, m, t) for (d, p, m), t in sorted(cells.items())],
    )


# -- the median, for the session list ----------------------------------------------------------

MEDIAN_CACHE_SECONDS = 60


def median_cost(period: Period) -> Decimal | None:
    """The median cost of the period's sessions that cost anything (None when none did)."""
    costs = sessions_in(period).filter(total_cost_usd__gt=0).order_by("total_cost_usd")
    count = costs.count()
    if not count:
        return None
    values = list(costs.values_list("total_cost_usd", flat=True)[(count - 1) // 2 : count // 2 + 1])
    return sum(values, Decimal(0)) / len(values)


def cached_median_cost(period: Period) -> Decimal | None:
    """Every list row asks (live rows too): computed once a minute per period."""
    key = f"porthole:awareness:median:{period.start}:{period.end}"
    found = cache.get(key)
    if found is not None:
        return Decimal(found)
    value = median_cost(period)
    if value is not None:  # "nothing cost anything yet" is cheap to ask again, and may change
        cache.set(key, str(value), MEDIAN_CACHE_SECONDS)
    return value


# -- chart geometry -----------------------------------------------------------------------------

WIDTH, HEIGHT = 720, 220
RANK_WIDTH = 520
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k at or above the value (1 for nothing)."""
    if value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent * (1 + 1e-9):
            return float(step * exponent)
    return float(10 * exponent)


@dataclass
class Segment:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@dataclass
class Tick:
    y: float
    label: str


@dataclass
class XLabel:
    x: float
    label: str


@dataclass
class Chart:
    title: str
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    segments: list[Segment]
    ticks: list[Tick]
    x_labels: list[XLabel]
    legend: list[tuple[str, str]]
    empty: bool

    @property
    def baseline(self) -> int:
        return self.height - self.bottom

    @property
    def plot_right(self) -> int:
        return self.width - self.right


def money(value: Decimal | float) -> str:
    """Dollars to the cent; amounts under a cent (but not nothing) with four places."""
    amount = Decimal(str(value))
    if 0 < abs(amount) < CENT:
        return f"${amount:.4f}"
    return f"${amount.quantize(CENT):,}"


def count(value: float) -> str:
    number = float(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= limit:
            return f"{number / limit:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{number:.0f}" if number == int(number) else f"{number:.1f}"


def day_chart(
    title: str,
    days: list[date],
    series: list[tuple[str, str, list[float]]],
    fmt: Callable[[float], str],
) -> Chart:
    """Bars per day, stacked when there are several series (name, css class, values)."""
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    totals = [sum(values[i] for _, _, values in series) for i in range(len(days))]
    top = nice_ceiling(max(totals, default=0))
    slot = plot_w / max(len(days), 1)
    bar_w = max(min(slot * 0.72, 28.0), 1.0)
    segments = []
    for i, day in enumerate(days):
        x = LEFT + i * slot + (slot - bar_w) / 2
        base = float(HEIGHT - BOTTOM)
        for name, css, values in series:
            value = values[i]
            if value <= 0:
                continue
            h = plot_h * value / top
            base -= h
            label = f"{day:%a %d %b}: {fmt(value)}" + (f" {name}" if len(series) > 1 else "")
            segments.append(
                Segment(round(x, 2), round(base, 2), round(bar_w, 2), round(h, 2), css, label)
            )
    ticks = [Tick(round(TOP + plot_h * (1 - n / 4), 2), fmt(top * n / 4)) for n in range(5)]
    every = max(1, math.ceil(len(days) / 8))
    x_labels = [
        XLabel(round(LEFT + i * slot + slot / 2, 2), f"{day:%d %b}")
        for i, day in enumerate(days)
        if i % every == 0
    ]
    legend = [(name, css) for name, css, _ in series] if len(series) > 1 else []
    return Chart(
        title,
        WIDTH,
        HEIGHT,
        LEFT,
        RIGHT,
        TOP,
        BOTTOM,
        segments,
        ticks,
        x_labels,
        legend,
        empty=not any(totals),
    )


@dataclass
class HBar:
    y: float
    width: float
    value_x: float
    label: str
    value: str


@dataclass
class HChart:
    title: str
    width: int
    height: int
    label_width: int
    bar_height: int
    bars: list[HBar]
    empty: bool


def ranking_chart(
    title: str, items: Iterable[tuple[str, float]], fmt: Callable[[float], str]
) -> HChart:
    """Horizontal bars, biggest first (at most 10 rows; the rest are in the table)."""
    rows = list(items)[:10]
    width, label_w, value_w, bar_h, gap = RANK_WIDTH, 170, 80, 18, 8
    top = max((value for _, value in rows), default=0) or 1
    span = width - label_w - value_w
    bars = []
    for n, (label, value) in enumerate(rows):
        bar_w = round(max(span * value / top, 1.0 if value > 0 else 0.0), 2)
        bars.append(
            HBar(
                y=n * (bar_h + gap) + 4,
                width=bar_w,
                value_x=round(label_w + bar_w + 6, 2),
                label=label if len(label) <= 24 else label[:23] + "…",
                value=fmt(value),
            )
        )
    height = max(len(rows), 1) * (bar_h + gap) + 8
    return HChart(title, width, height, label_w, bar_h, bars, empty=not any(v for _, v in rows))


def charts(report: Usage) -> dict[str, Any]:
    days = [day for day, _ in report.by_day]
    per_day = [totals for _, totals in report.by_day]
    return {
        "cost": day_chart(
            "Cost per day", days, [("cost", "s-cost", [float(t.cost) for t in per_day])], money
        ),
        "tokens": day_chart(
            "Tokens per day",
            days,
            [
                ("input", "s-input", [float(t.input_tokens) for t in per_day]),
                ("output", "s-output", [float(t.output_tokens) for t in per_day]),
            ],
            count,
        ),
        "turns": day_chart(
            "Turns per day", days, [("turns", "s-turns", [float(t.turns) for t in per_day])], count
        ),
        "people": ranking_chart(
            "Cost per person", [(name, float(t.cost)) for name, t in report.by_person], money
        ),
        "models": ranking_chart(
            "Cost per model", [(name, float(t.cost)) for name, t in report.by_model], money
        ),
    }
