"""What the views share: the request type htmx decorates, and the session page's timeline."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django_htmx.middleware import HtmxDetails

from dashboard.agents.access import SessionRights
from dashboard.agents.forms import controls_context
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.rendering import ToolIndex, render_event
from dashboard.agents.rendering.porthole import for_link_holders
from dashboard.agents.sharing import share_panel_context, take_new_link

PAGE_EVENTS = 200


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def _page_of_events(
    session: AgentSession, events: QuerySet[Event]
) -> tuple[list[Event], ToolIndex]:
    """The last PAGE_EVENTS of `events`, oldest first, and the tool calls they pair with."""
    page = list(events.select_related("actor").order_by("-seq")[:PAGE_EVENTS])
    page.reverse()
    for event in page:
        event.session = session
    return page, ToolIndex.for_session(session, page)


def _audience(share_token: str) -> AbstractContextManager[None]:
    """How to render the timeline: a share link's holder learns no teammate's name."""
    return for_link_holders() if share_token else nullcontext()


def session_context(
    request: HttpRequest,
    session: AgentSession,
    rights: SessionRights,
    *,
    share_token: str = "",
) -> dict[str, Any]:
    """The session page, for a team member or (read-only, nothing else) a share link holder,
    who opened it with `share_token` (used for this request's links only, never stored)."""
    events, tools = _page_of_events(session, Event.objects.filter(session=session))
    with _audience(share_token):
        timeline_html = [render_event(e, tools) for e in events if e.source != Event.Source.STDERR]
        stderr_html = [render_event(e, tools) for e in events if e.source == Event.Source.STDERR]
    context = {
        "session": session,
        "sandbox": session.sandbox,
        "timeline_html": timeline_html,
        "stderr_html": stderr_html,
        "first_seq": events[0].seq if events else 0,
        "last_seq": events[-1].seq if events else 0,
        "has_older": bool(events) and events[0].seq > 1,
        "older_url": _older_url(session, share_token),
        "member": rights.member,
        "can_steer": rights.steer,
        "can_share": rights.share,
        "can_kill_sandbox": rights.kill_sandbox,
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


def older(request: HttpRequest, session: AgentSession, share_token: str = "") -> HttpResponse:
    """The page of events before `before`, for "load older" (prepended above the timeline)."""
    try:
        before = int(request.GET.get("before", "0"))
    except ValueError:
        before = 0
    before = min(max(before, 0), 2**62)  # past a 64-bit column, the database would raise
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
