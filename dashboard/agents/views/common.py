"""What the views share: the request type htmx decorates, and the session page's timeline:
its latest events, or a window of a long session opened at an event, with older and newer
events loaded on demand."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django_htmx.middleware import HtmxDetails

from dashboard.agents.access import SessionRights
from dashboard.agents.downloads import MAX_EXPORTS_PER_USER
from dashboard.agents.forms import controls_context
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.rendering import ToolIndex, render_event
from dashboard.agents.rendering.outline import first_error, last_seq
from dashboard.agents.rendering.porthole import for_link_holders
from dashboard.agents.sharing import share_panel_context, take_new_link
from dashboard.awareness import attention

PAGE_EVENTS = 200


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def this_site_or(request: HttpRequest, url: str, fallback: str) -> str:
    """`url` when it points at this site (a form's `next`, the page a post came from), else
    `fallback`: never an open redirect."""
    safe = url_has_allowed_host_and_scheme(
        url, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
    return url if url and safe else fallback


# A window opened at an event starts this many events before it: what led up to it.
CONTEXT_BEFORE = 10
MAX_SEQ = 2**62  # past a 64-bit column, the database would raise


def _page_of_events(
    session: AgentSession, events: QuerySet[Event]
) -> tuple[list[Event], ToolIndex]:
    """The last PAGE_EVENTS of `events`, oldest first, and the tool calls they pair with."""
    page = list(events.select_related("actor").order_by("-seq")[:PAGE_EVENTS])
    page.reverse()
    return page, _paired(session, page)


def _paired(session: AgentSession, page: list[Event]) -> ToolIndex:
    for event in page:
        event.session = session
    return ToolIndex.for_session(session, page)


def _events_from(session: AgentSession, first: int) -> tuple[list[Event], bool]:
    """Up to PAGE_EVENTS events from seq `first` on, oldest first, and whether more follow.
    One range of the (session, seq) index, wherever in a long session it lies."""
    rows = list(
        Event.objects.filter(session=session, seq__gte=first)
        .select_related("actor")
        .order_by("seq")[: PAGE_EVENTS + 1]
    )
    return rows[:PAGE_EVENTS], len(rows) > PAGE_EVENTS


def _seq_param(value: str | None) -> int | None:
    try:
        return min(max(int(value or ""), 0), MAX_SEQ)
    except ValueError:
        return None


@dataclass
class Position:
    """Where the page opens: at the latest events (`target` None) or at an event."""

    target: int | None = None
    notice: str = ""


def _position(request: HttpRequest, session: AgentSession) -> Position:
    """`?at=` is a seq, `start`, or `first-error`; anything else opens the latest events."""
    at = request.GET.get("at", "")
    if at == "start":
        return Position(0)
    if at == "first-error":
        found = first_error(session)
        if found is None:
            return Position(notice="No errors in this session so far.")
        return Position(found)
    return Position(_seq_param(at)) if at else Position()


def _latest_page_starts(session: AgentSession) -> int | None:
    """The first seq of the latest page, or None when the session fits on one page."""
    return (
        Event.objects.filter(session=session)
        .order_by("-seq")
        .values_list("seq", flat=True)[PAGE_EVENTS - 1 : PAGE_EVENTS]
        .first()
    )


def _audience(share_token: str) -> AbstractContextManager[None]:
    """How to render the timeline: a share link's holder learns no teammate's name."""
    return for_link_holders() if share_token else nullcontext()


def _timeline(
    events: list[Event], tools: ToolIndex, share_token: str
) -> tuple[list[str], list[str]]:
    with _audience(share_token):
        timeline = [render_event(e, tools) for e in events if e.source != Event.Source.STDERR]
        stderr = [render_event(e, tools) for e in events if e.source == Event.Source.STDERR]
    return timeline, stderr


@dataclass
class Window:
    """The page's events and how it stands to the live tail: at it (`tail` == `through`:
    live events append) or further back (they are counted instead, until "load newer"
    reaches the tail)."""

    events: list[Event]
    tools: ToolIndex
    through: int  # the newest seq shown
    tail: int  # the newest seq recorded


def _window(session: AgentSession, position: Position) -> Window:
    target = position.target
    starts = _latest_page_starts(session) if target is not None else None
    if target is None or starts is None or target >= starts:
        events, tools = _page_of_events(session, Event.objects.filter(session=session))
        through = events[-1].seq if events else 0
        return Window(events, tools, through, through)
    events, more = _events_from(session, max(target - CONTEXT_BEFORE, 0))
    through = events[-1].seq if events else target
    tail = last_seq(session.pk) if more else through
    return Window(events, _paired(session, events), through, tail)


def session_context(
    request: HttpRequest,
    session: AgentSession,
    rights: SessionRights,
    *,
    share_token: str = "",
) -> dict[str, Any]:
    """The session page, for a team member or (read-only, nothing else) a share link holder,
    who opened it with `share_token` (used for this request's links only, never stored).

    `?at=` opens it at an event (see `_position`) in one request, however long the session:
    a window of events from just before it, with older and newer ones loaded on demand."""
    position = _position(request, session)
    window = _window(session, position)
    events = window.events
    timeline_html, stderr_html = _timeline(events, window.tools, share_token)
    target = position.target
    shown = [e.seq for e in events if target is not None and e.seq >= target]
    detached = window.tail > window.through
    context = {
        "session": session,
        "sandbox": session.sandbox,
        "timeline_html": timeline_html,
        "stderr_html": stderr_html,
        "first_seq": events[0].seq if events else 0,
        # What the live socket's hello says the page holds: away from the tail, everything
        # up to the tail (newer events are counted, not appended out of place).
        "last_seq": window.tail,
        "through_seq": window.through,
        "detached": detached,
        "newer_count": window.tail - window.through,
        "newer_url": _newer_url(session, share_token),
        "target_seq": shown[0] if shown else "",
        "jump_notice": position.notice,
        "at_latest": target is None,
        "page_path": request.path,
        "max_downloads": MAX_EXPORTS_PER_USER,
        "has_older": bool(events) and events[0].seq > 1,
        "older_url": _older_url(session, share_token),
        "member": rights.member,
        "can_steer": rights.steer,
        "can_share": rights.share,
        "can_kill_sandbox": rights.kill_sandbox,
        "attention": attention.of(session) if rights.member else None,
        **controls_context(session),
        "ws_path": f"/ws/share/{share_token}/" if share_token else f"/ws/sessions/{session.id}/",
    }
    if rights.share:
        context.update(share_panel_context(request.user, session))
        context.update(take_new_link(request, session))
    return context


def _older_url(session: AgentSession, share_token: str) -> str:
    if share_token:
        return reverse("share_older", args=[share_token])
    return reverse("older_events", args=[session.id])


def _newer_url(session: AgentSession, share_token: str) -> str:
    if share_token:
        return reverse("share_newer", args=[share_token])
    return reverse("newer_events", args=[session.id])


def older(request: HttpRequest, session: AgentSession, share_token: str = "") -> HttpResponse:
    """The page of events before `before`, for "load older" (prepended above the timeline)."""
    before = _seq_param(request.GET.get("before")) or 0
    events, tools = _page_of_events(
        session,
        Event.objects.filter(session=session, seq__lt=before).exclude(source=Event.Source.STDERR),
    )
    with _audience(share_token):
        older_html = [render_event(e, tools) for e in events]
    context = {
        "session": session,
        "older_html": older_html,
        "first_seq": events[0].seq if events else 0,
        "has_older": bool(events) and events[0].seq > 1,
        "older_url": _older_url(session, share_token),
    }
    return render(request, "agents/session.html#older", context)


def newer(request: HttpRequest, session: AgentSession, share_token: str = "") -> HttpResponse:
    """The page of events after `after`, for "load newer" below a window opened further
    back: appended to the timeline (and the log), with the seq it reaches and whether that
    is the tail (the page then takes live events again: reading.js)."""
    after = _seq_param(request.GET.get("after")) or 0
    events, more = _events_from(session, after + 1)
    timeline_html, stderr_html = _timeline(events, _paired(session, events), share_token)
    context = {
        "session": session,
        "newer_html": timeline_html,
        "newer_stderr_html": stderr_html,
        "through_seq": events[-1].seq if events else after,
        "at_tail": not more,
        "newer_url": _newer_url(session, share_token),
    }
    return render(request, "agents/session.html#newer", context)
