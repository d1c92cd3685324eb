"""Template helpers: money and token formats, the attention badge and the relative cost."""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from django import template

from dashboard.awareness import attention, usage

register = template.Library()

HIGH, LOW = Decimal(3), Decimal("0.34")


@register.filter
def money(value: Any) -> str:
    return usage.money(Decimal(str(value or 0)))


@register.filter
def tokens(value: Any) -> str:
    return usage.count(float(value or 0))


@register.filter
def thousands(value: Any) -> str:
    return f"{int(value or 0):,}"


@register.filter
def querystring_of(params: dict[str, str]) -> str:
    return urlencode(params)


VERDICTS = "awareness_verdicts"


@register.inclusion_tag("awareness/tags.html#attention", takes_context=True)
def attention_badge(context: template.Context, session: Any) -> dict[str, Any]:
    """The rule's verdict: for a page of sessions (`page` in the context, the list) all rows
    in one query, the first time a row asks; for a lone row (a live update), on its own."""
    # The row's "Mark handled" form posts without JavaScript too: it needs the page's token
    # (none in a row rendered for a live update, whose post htmx sends with the header).
    mark = {"session": session, "csrf_token": context.get("csrf_token")}
    if hasattr(session, "attention_turn"):
        return {"verdict": attention.of(session), **mark}
    store = context.render_context
    if VERDICTS not in store:
        page = context.get("page")
        ids = [row.pk for row in getattr(page, "object_list", [])]
        store[VERDICTS] = attention.for_sessions(ids) if ids else {}
    verdict = store[VERDICTS].get(str(session.pk))
    return {"verdict": verdict if verdict is not None else attention.of(session), **mark}


@register.inclusion_tag("awareness/tags.html#relative-cost")
def relative_cost(session: Any) -> dict[str, Any]:
    """The session's cost against the median of the last 30 days, so outliers stand out."""
    period = usage.period_from({})
    median = usage.cached_median_cost(period)
    cost = Decimal(session.total_cost_usd or 0)
    if median is None or median <= 0 or cost <= 0:
        return {"ratio": None}
    ratio = cost / median
    level = "high" if ratio >= HIGH else "low" if ratio <= LOW else "usual"
    return {"ratio": ratio, "level": level, "median": median, "period": period}
