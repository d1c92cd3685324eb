"""Browsing: the session list, a session's page (at its latest events or at any one), and
its older and newer events."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from dashboard.agents import access
from dashboard.agents.access import viewer_required
from dashboard.agents.models import AgentSession
from dashboard.agents.views.common import HtmxHttpRequest, newer, older, session_context
from dashboard.awareness.attention import needing_attention
from dashboard.search.index import MAX_QUERY

SESSIONS_PER_PAGE = 25

STATUS_FILTERS = {
    "running": Q(status__in=AgentSession.LIVE_STATUSES),
    # The one definition (dashboard/awareness/attention.py), judged when the query runs.
    "attention": Q(pk__in=needing_attention().values("pk")),
    "finished": Q(status__in=AgentSession.FINISHED_STATUSES),
}


def _filtered_sessions(request: HttpRequest) -> tuple[QuerySet[AgentSession], dict[str, str]]:
    sessions = AgentSession.objects.select_related("sandbox", "started_by")
    status = request.GET.get("status", "all")
    if status in STATUS_FILTERS:
        sessions = sessions.filter(STATUS_FILTERS[status])
    else:
        status = "all"
    starter = request.GET.get("starter", "")
    if starter:
        sessions = sessions.filter(started_by__username=starter)
    # As long as the search page's (`search.index.MAX_QUERY`): a longer LIKE pattern is past
    # what SQLite takes (50,000 bytes: the list failed), and no title is that long.
    query = request.GET.get("q", "").strip()[:MAX_QUERY]
    if query:
        sessions = sessions.filter(Q(title__icontains=query) | Q(prompt__icontains=query))
    return sessions.order_by("-started_at"), {"status": status, "starter": starter, "q": query}


@require_GET
@viewer_required
def index(request: HtmxHttpRequest) -> HttpResponse:
    sessions, filters = _filtered_sessions(request)
    page = Paginator(sessions, SESSIONS_PER_PAGE).get_page(request.GET.get("page"))
    starters = (
        get_user_model()
        .objects.filter(agent_sessions__isnull=False)
        .distinct()
        .order_by("username")
        .values_list("username", flat=True)
    )
    context = {
        "page": page,
        "filters": filters,
        "starters": list(starters),
        "status_choices": [
            ("all", "All"),
            ("running", "Running"),
            ("attention", "Needs attention"),
            ("finished", "Finished"),
        ],
        "can_steer": access.can_steer(request.user),
    }
    template = "agents/index.html#results" if request.htmx else "agents/index.html"
    return render(request, template, context)


@require_GET
@viewer_required
def session_detail(request: HttpRequest, session_id: str) -> HttpResponse:
    session, rights = access.session_for_user(request.user, session_id)
    return render(request, "agents/session.html", session_context(request, session, rights))


@require_GET
@viewer_required
def older_events(request: HttpRequest, session_id: str) -> HttpResponse:
    """The page of events before `before`, for "load older" (prepended above the timeline)."""
    session, _ = access.session_for_user(request.user, session_id)
    return older(request, session)


@require_GET
@viewer_required
def newer_events(request: HttpRequest, session_id: str) -> HttpResponse:
    """The page of events after `after`, for "load newer" (appended to the timeline)."""
    session, _ = access.session_for_user(request.user, session_id)
    return newer(request, session)
