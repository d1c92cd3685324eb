"""What the views share: the request type htmx decorates, and the session page's timeline."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django_htmx.middleware import HtmxDetails

from dashboard.agents.access import SessionRights
from dashboard.agents.forms import controls_context
from dashboard.agents.models import AgentSession, Event, ShareLink
from dashboard.agents.rendering import ToolIndex, render_event
from dashboard.agents.sharing import share_panel_context, take_new_link

PAGE_EVENTS = 200


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def session_context(
    request: HttpRequest,
    session: AgentSession,
    rights: SessionRights,
    *,
    share: ShareLink | None = None,
) -> dict[str, Any]:
    """The session page, for a team member or (read-only, nothing else) a share link holder."""
    events = list(
        Event.objects.filter(session=session).select_related("actor").order_by("-seq")[:PAGE_EVENTS]
    )
    events.reverse()
    for event in events:
        event.session = session
    tools = ToolIndex.for_session(session, events)
    context = {
        "session": session,
        "sandbox": session.sandbox,
        "timeline_html": [
            render_event(e, tools) for e in events if e.source != Event.Source.STDERR
        ],
        "stderr_html": [render_event(e, tools) for e in events if e.source == Event.Source.STDERR],
        "first_seq": events[0].seq if events else 0,
        "last_seq": events[-1].seq if events else 0,
        "has_older": bool(events) and events[0].seq > 1,
        "older_url": _older_url(session, share),
        "member": rights.member,
        "can_steer": rights.steer,
        "can_share": rights.share,
        "can_kill_sandbox": rights.kill_sandbox,
        **controls_context(session),
        "ws_path": f"/ws/share/{share.token}/" if share else f"/ws/sessions/{session.id}/",  # type: ignore[attr-defined]
    }
    if rights.share:
        context.update(share_panel_context(request.user, session))
        context.update(take_new_link(request, session))
    return context


def _older_url(session: AgentSession, share: ShareLink | None) -> str:
    if share is not None:
        return reverse("share_older", args=[share.token])  # type: ignore[attr-defined]
    return reverse("older_events", args=[session.id])


def older(request: HttpRequest, session: AgentSession, share: ShareLink | None) -> HttpResponse:
    """The page of events before `before`, for "load older" (prepended above the timeline)."""
    try:
        before = int(request.GET.get("before", "0"))
    except ValueError:
        before = 0
    before = min(max(before, 0), 2**62)  # past a 64-bit column, the database would raise
    events = list(
        Event.objects.filter(session=session, seq__lt=before)
        .exclude(source=Event.Source.STDERR)
        .select_related("actor")
        .order_by("-seq")[:PAGE_EVENTS]
    )
    events.reverse()
    for event in events:
        event.session = session
    tools = ToolIndex.for_session(session, events)
    context = {
        "session": session,
        "older_html": [render_event(e, tools) for e in events],
        "first_seq": events[0].seq if events else 0,
        "has_older": bool(events) and events[0].seq > 1,
        "older_url": _older_url(session, share),
    }
    return render(request, "agents/session.html#older", context)
