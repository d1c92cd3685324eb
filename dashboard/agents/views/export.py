"""Taking a session away: as JSONL or Markdown, and one event's full payload."""

from __future__ import annotations

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import get_object_or_404
from django.utils.text import slugify
from django.views.decorators.http import require_GET

from dashboard.agents import access, downloads
from dashboard.agents.access import viewer_required
from dashboard.agents.models import AgentSession, Event


def _export_name(session: AgentSession, extension: str) -> str:
    slug = slugify(session.title)[:60] or "session"
    return f"porthole-{slug}-{str(session.id)[:8]}.{extension}"


@require_GET
@viewer_required
def export_jsonl(request: HttpRequest, session_id: str) -> HttpResponseBase:
    session, _ = access.session_for_user(request.user, session_id)
    # Streamed from an async iterator in chunks; a few per person at once.
    return downloads.download(request, session, "jsonl", _export_name(session, "jsonl"))


@require_GET
@viewer_required
def export_markdown(request: HttpRequest, session_id: str) -> HttpResponseBase:
    session, _ = access.session_for_user(request.user, session_id)
    return downloads.download(request, session, "md", _export_name(session, "md"))


@require_GET
def event_raw(request: HttpRequest, session_id: str, seq: int) -> HttpResponse:
    """The full payload of one event, as received: what the timeline truncates for display.

    Team members, and browsers that opened a live share link of this very session.
    """
    if not access.may_see_session(request, session_id):
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        raise PermissionDenied("You may not see this session.")
    if seq >= 2**63:  # past a 64-bit column, the database would raise
        raise Http404("No such event.")
    event = get_object_or_404(Event, session_id=session_id, seq=seq)
    response = HttpResponse(event.raw, content_type="text/plain; charset=utf-8")
    # Named for what it holds (a JSON line, or plain output), served as text either way.
    suffix = "json" if isinstance(event.data, dict) else "txt"
    response["Content-Disposition"] = f'attachment; filename="event-{seq}.{suffix}"'
    response["X-Content-Type-Options"] = "nosniff"
    return response
