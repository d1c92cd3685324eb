from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET

from dashboard.agents.models import AgentSession, Event


@login_required
def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse("Porthole")


@login_required
def session_detail(request: HttpRequest, session_id: str) -> HttpResponse:
    session = get_object_or_404(AgentSession, id=session_id)
    return HttpResponse(session.title)


@require_GET
@login_required
def event_raw(request: HttpRequest, session_id: str, seq: int) -> HttpResponse:
    """The full payload of one event, as received: what the timeline truncates for display."""
    event = get_object_or_404(Event, session_id=session_id, seq=seq)
    response = HttpResponse(event.raw, content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="event-{seq}.txt"'
    return response
