"""The entry point: an `Event` becomes an `EventItem` (`describe`), then HTML from the
macros in `templates/agents/timeline.jinja`. Rendering never raises: an event that cannot
be described becomes the generic escaped JSON card, and the failure is logged."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.utils.safestring import SafeString, mark_safe

from dashboard.agents.models import AgentSession, Event
from dashboard.agents.rendering.agent import _agent
from dashboard.agents.rendering.base import STDERR_TARGET, TIMELINE_TARGET, clip
from dashboard.agents.rendering.budget import event_budget
from dashboard.agents.rendering.calls import _tool_result_block
from dashboard.agents.rendering.items import (
    EventItem,
    ToolResultBlock,
    ToolUseBlock,
    _generic,
    _item,
)
from dashboard.agents.rendering.outline import entry_for
from dashboard.agents.rendering.porthole import _bridge, _dashboard, _for_link_holders
from dashboard.agents.rendering.templates import render
from dashboard.agents.rendering.tools import ToolIndex, is_noise, parent_of

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
# Rendering: a page (`render_event`, the layout decided by `ToolIndex.for_session`) or live
# (`render_event_oob`: out-of-band swaps into whatever already holds the event's place).


def _html(macro: str, context: dict[str, Any], event: Event, item: EventItem) -> str:
    try:
        return render(macro, **context)
    except Exception:
        log.exception("could not render event %s of session %s", event.seq, event.session_id)
        fallback = _generic(event, note="This event could not be displayed normally.")
        fallback.statuses = item.statuses
        context = {**context, "item": fallback}
        if macro == "event_oob":
            context.update(results=[], article=True)
        return render(macro, **context)


def _mark(seq: int, holder: str, *, anchor: bool) -> str:
    """A hidden placeholder for an event drawn elsewhere (inside a card or a fold): the
    page's record of which seqs it holds, and where a link to the event should go. It is
    the event's anchor (`#event-N`) only when the event has no element of its own."""
    return render("seq_mark", seq=seq, at=holder, anchor=anchor)


def render_event(event: Event, tools: ToolIndex) -> str:
    """One event's element, for a page render (`tools` from `ToolIndex.for_session`)."""
    holder = tools.absorbed.get(event.seq)
    if holder is not None:
        return _mark(event.seq, holder, anchor=event.seq in tools.paired)
    members = tools.folds.get(event.seq)
    if members is not None:
        return render(
            "folded",
            fold={"head": event.seq, "count": len(members)},
            members=[mark_safe(_inline(member, tools)) for member in members],  # noqa: S308
        )
    if event.html and event.seq not in tools.paired:
        # Rendered once from the templates when it was recorded (`stands_alone`); read back
        # from the database it is a plain string again, which a template would escape.
        return mark_safe(event.html)  # noqa: S308
    return _inline(event, tools)


def _inline(event: Event, tools: ToolIndex, *, nested: bool = False) -> str:
    if event.seq in tools.paired:
        # Its results are in their calls' cards; at top level its mark is drawn already.
        holder = tools.absorbed.get(event.seq, "timeline")
        return "" if nested else _mark(event.seq, holder, anchor=True)
    item = describe(event, tools)
    if nested:
        item.inside = None  # the Task card around it says so
    for block in item.blocks:
        if isinstance(block, ToolUseBlock):
            _fill_card(block, tools)
    return _html("event", {"item": item}, event, item)


def _fill_card(block: ToolUseBlock, tools: ToolIndex) -> None:
    """A call's result and its subagent's events, when they are on the same page."""
    if tools.get(block.ref.id) != block.ref:
        return  # a call id used twice (hostile): only its latest card is filled
    found = tools.result_blocks.get(block.ref.id)
    if found is not None:
        result_event, result = found
        with event_budget(tools.page_budget):  # the result's own event pays for it
            block.result = _tool_result_block(result_event, result, tools)
    block.children = [
        mark_safe(_inline(child, tools, nested=True))  # noqa: S308 - from the templates
        for child in tools.children.get(block.ref.id, [])
    ]


@dataclass
class LiveFragment:
    oob: str  # what viewers are sent (`render_event_oob`)
    # The event's own element when a page would draw it exactly so (`stands_alone`): kept
    # with the event (`Event.html`), so that no page load renders it again.
    article: str | None


def render_event_oob(event: Event, tools: ToolIndex) -> str:
    """One event as htmx out-of-band swaps for the ws extension: the element appended to
    #timeline (or #stderr-log, or the card of the Task whose subagent it comes from, or the
    fold of noise it continues), each result swapped into its call's card by id, and the
    status marker of every call it answers."""
    return render_event_live(event, tools).oob


def stands_alone(event: Event, item: EventItem, context: dict[str, Any]) -> bool:
    """Whether `event`'s element is the same in any page that shows it as in this live
    render: drawn at top level (no subagent's Task around it, not folded as noise, no result
    swapped into a call's card), holding no tool call (its card's result and status change),
    naming nobody (link holders see "a teammate", and names change), and not a session's
    start (resumed or not depends on what else a render sees)."""
    return (
        context["container"] in (TIMELINE_TARGET, STDERR_TARGET)
        and context["article"]
        and not context["fold"]
        and not context["results"]
        and not item.statuses
        and not parent_of(event)
        and item.kind != "init"
        and not any(isinstance(b, ToolUseBlock | ToolResultBlock) for b in item.blocks)
        and event.actor_id is None
    )


def _stored_oob(event: Event, tools: ToolIndex, article: str) -> LiveFragment:
    """The live form of an event whose element was stored when it was recorded."""
    tools.fold = None  # it stands alone: any run of noise before it is over
    item = _item(event, "stored", "")
    if item.source == Event.Source.STDERR:
        return LiveFragment(_swap(STDERR_TARGET, article, None, event, item), article)
    return LiveFragment(_swap(TIMELINE_TARGET, article, entry_for(event), event, item), article)


def _swap(container: str, article: str, outline: Any, event: Event, item: EventItem) -> str:
    """The swap that appends an element rendered already (and its outline entry)."""
    context = {
        "container": container,
        "article_html": mark_safe(article),  # noqa: S308 - rendered from the templates
        "outline": outline,
    }
    return _html("event_oob_article", context, event, item)


def render_event_live(event: Event, tools: ToolIndex) -> LiveFragment:
    """`render_event_oob`, and the event's element on its own when it `stands_alone`. The
    element is rendered once and the swaps are built around it; an event loaded with its
    stored element (a catch-up) is not rendered again at all."""
    if event.html:
        return _stored_oob(event, tools, event.html)
    item = describe(event, tools)
    if item.source == Event.Source.STDERR:
        context: dict[str, Any] = {
            "item": item,
            "container": STDERR_TARGET,
            "article": True,
            "results": [],
            "fold": None,
            "outline": None,
            "mark": False,
        }
        return _with_article(event, item, context)
    container = TIMELINE_TARGET
    parent = parent_of(event)
    task = tools.resolve(event, parent) if parent else None
    if task is not None and task.nests and task.seq is not None and task.seq < event.seq:
        container, item.inside = f"#toolchildren-{task.dom_id}", None
    results = [
        block
        for block in item.blocks
        if isinstance(block, ToolResultBlock)
        and block.tool is not None
        and block.tool.seq is not None
        and block.tool.seq < event.seq
    ]
    item.blocks = [block for block in item.blocks if not any(block is r for r in results)]
    article = not (results and not item.blocks and item.text is None)
    fold = None
    if container == TIMELINE_TARGET and article:
        if is_noise(event):
            head, count = tools.fold if tools.fold is not None else (event.seq, 0)
            tools.fold = (head, count + 1)
            fold = {"head": head, "count": count + 1, "new": count == 0}
        else:
            tools.fold = None
    holder = container.removeprefix("#")
    if fold is not None and not fold["new"]:
        holder = f"fold-{fold['head']}"
    elif not article:
        holder = f"toolcall-{results[0].tool.dom_id}" if results[0].tool else "timeline"
    context = {
        "item": item,
        "container": container,
        "article": article,
        "results": results,
        "fold": fold,
        # Anything not appended to #timeline itself leaves a mark there: the page's count
        # of what it holds (the last seq it tells the server) reads #timeline's children.
        "mark": holder != "timeline" and not (fold and fold["new"]),
        "holder": holder,
        "not_article": not article,
        "outline": entry_for(event),
    }
    return _with_article(event, item, context)


def _with_article(event: Event, item: EventItem, context: dict[str, Any]) -> LiveFragment:
    if not stands_alone(event, item, context) or _for_link_holders.get():
        return LiveFragment(_html("event_oob", context, event, item), None)
    article = _html("event", {"item": item}, event, item)
    swap = _swap(context["container"], article, context["outline"], event, item)
    return LiveFragment(swap, article)


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
