"""The entry point: an `Event` becomes an `EventItem` (`describe`), then HTML from the
partials in `templates/agents/timeline.html`. Rendering never raises: an event that cannot
be described becomes the generic escaped JSON card, and the failure is logged."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from django.template.loader import render_to_string
from django.utils.safestring import SafeString, mark_safe

from dashboard.agents.models import AgentSession, Event
from dashboard.agents.rendering.agent import _agent
from dashboard.agents.rendering.base import clip
from dashboard.agents.rendering.budget import event_budget
from dashboard.agents.rendering.items import EventItem, _generic, _item
from dashboard.agents.rendering.porthole import _bridge, _dashboard
from dashboard.agents.rendering.tools import ToolIndex

log = logging.getLogger(__name__)


def _stderr(event: Event) -> EventItem:
    return _item(event, "stderr", "stderr", level="muted", text=clip(event.raw))


def _describe(event: Event, tools: ToolIndex) -> EventItem:
    if event.source == Event.Source.STDERR:
        return _stderr(event)
    data = event.data
    if data is None:
        return _generic(event)
    if event.source == Event.Source.DASHBOARD:
        return _dashboard(event, data)
    if event.source == Event.Source.BRIDGE:
        return _bridge(event, data)
    return _agent(event, data, tools)


def describe(event: Event, tools: ToolIndex) -> EventItem:
    """What the templates need to show `event`. Never raises."""
    with event_budget(tools.page_budget):
        return _describe_safely(event, tools)


def _describe_safely(event: Event, tools: ToolIndex) -> EventItem:
    try:
        return _describe(event, tools)
    except Exception:
        log.exception("could not describe event %s of session %s", event.seq, event.session_id)
        return _generic(event, note="This event could not be displayed normally.")


# ---------------------------------------------------------------------------------------
# Rendering.


def _render(partial: str, event: Event, tools: ToolIndex) -> str:
    item = describe(event, tools)
    try:
        return render_to_string(f"agents/timeline.html#{partial}", {"item": item})
    except Exception:
        log.exception("could not render event %s of session %s", event.seq, event.session_id)
        fallback = _generic(event, note="This event could not be displayed normally.")
        fallback.statuses = item.statuses
        return render_to_string(f"agents/timeline.html#{partial}", {"item": fallback})


def render_event(event: Event, tools: ToolIndex) -> str:
    """One event's element, for a page render (`tools` from `ToolIndex.for_session`)."""
    return _render("event", event, tools)


def render_event_oob(event: Event, tools: ToolIndex) -> str:
    """One event as htmx out-of-band swaps for the ws extension: the element appended to
    #timeline (or #stderr-log), plus the status marker of every call it answers."""
    return _render("event-oob", event, tools)


@dataclass
class RenderedTimeline:
    timeline: SafeString  # for #timeline
    stderr: SafeString  # for #stderr-log


def render_timeline(session: AgentSession, events: Iterable[Event]) -> RenderedTimeline:
    """A page's worth of events, split between the timeline and the stderr log."""
    events = list(events)
    tools = ToolIndex.for_session(session, events)
    timeline: list[str] = []
    stderr: list[str] = []
    for event in events:
        html = render_event(event, tools)
        (stderr if event.source == Event.Source.STDERR else timeline).append(html)
    # Each piece came out of an autoescaping template.
    return RenderedTimeline(mark_safe("".join(timeline)), mark_safe("".join(stderr)))
