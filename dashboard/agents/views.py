from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import AbstractBaseUser
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    StreamingHttpResponse,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.text import slugify
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect
from django_htmx.middleware import HtmxDetails

from dashboard.agents import access, actions, upstream
from dashboard.agents.access import viewer_required
from dashboard.agents.export import iter_session_markdown, session_jsonl
from dashboard.agents.forms import (
    AgentOptionsForm,
    ContinueForm,
    PromptForm,
    StartSessionForm,
    controls_context,
)
from dashboard.agents.models import AgentSession, Event, Sandbox, ShareLink
from dashboard.agents.rendering import ToolIndex, render_event
from dashboard.agents.sharing import share_panel_context
from dashboard.opencomputer import OpenComputerError, redact

log = logging.getLogger(__name__)

PAGE_EVENTS = 200
SESSIONS_PER_PAGE = 25


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def _shown(exc: OpenComputerError) -> str:
    """An upstream error as a person may see it: the server's message, secrets masked."""
    return redact(exc.message or str(exc), upstream.secrets())


def _get_session_for_user(user: Any, session_id: object) -> AgentSession:
    """The session, with what every page of it shows, or 404."""
    try:
        return AgentSession.objects.select_related("sandbox", "started_by", "resumed_from").get(
            id=session_id
        )
    except AgentSession.DoesNotExist:
        raise Http404("No such session.") from None


# -- the session list --------------------------------------------------------------------------

STATUS_FILTERS = {
    "running": Q(status__in=AgentSession.LIVE_STATUSES),
    "attention": Q(status__in=[AgentSession.Status.KILLED, AgentSession.Status.LOST])
    | (Q(status=AgentSession.Status.EXITED) & ~Q(exit_code=0)),
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
    query = request.GET.get("q", "").strip()
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


# -- starting a session ------------------------------------------------------------------------


@login_required
async def new_session(request: HtmxHttpRequest) -> HttpResponse:
    user = await request.auser()
    if not await sync_to_async(access.can_steer)(user):
        raise PermissionDenied("You may watch sessions but not start them.")
    if request.method == "POST":
        form = await sync_to_async(StartSessionForm)(request.POST)
        if await sync_to_async(form.is_valid)():
            try:
                existing = await sync_to_async(form.existing_sandbox)()
                session = await actions.start_session(
                    user,
                    prompt=form.cleaned_data["prompt"],
                    options=form.options(),
                    sandbox=existing,
                    template=form.cleaned_data.get("template") or "base",
                    idle_timeout=form.cleaned_data.get("idle_timeout") or 0,
                    envs=form.cleaned_data.get("envs") or {},
                )
            except OpenComputerError as exc:
                form.add_error(None, f"The sandbox server refused: {_shown(exc)}")
            else:
                return redirect(session)
    else:
        initial = {}
        if request.GET.get("sandbox"):
            initial["sandbox"] = request.GET["sandbox"]
        form = await sync_to_async(StartSessionForm)(initial=initial)
    status = 400 if request.method == "POST" else 200
    return await sync_to_async(render)(request, "agents/new.html", {"form": form}, status=status)


# -- the session page -------------------------------------------------------------------------


def _session_context(
    request: HttpRequest, session: AgentSession, *, share: ShareLink | None = None
) -> dict[str, Any]:
    """The session page, for a team member or (read-only, nothing else) a share link holder."""
    user = request.user
    member = share is None
    events = list(
        Event.objects.filter(session=session).select_related("actor").order_by("-seq")[:PAGE_EVENTS]
    )
    events.reverse()
    for event in events:
        event.session = session
    tools = ToolIndex.for_session(session, events)
    return {
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
        "member": member,
        "can_steer": member and access.can_steer(user),
        "can_share": member and access.can_share(user),
        "can_kill_sandbox": member and access.can_kill_sandbox(user, session.sandbox),
        **controls_context(session),
        **(share_panel_context(user, session) if member and access.can_share(user) else {}),
        "ws_path": f"/ws/share/{share.token}/" if share else f"/ws/sessions/{session.id}/",
    }


def _older_url(session: AgentSession, share: ShareLink | None) -> str:
    if share is not None:
        return reverse("share_older", args=[share.token])
    return reverse("older_events", args=[session.id])


@require_GET
@viewer_required
def session_detail(request: HtmxHttpRequest, session_id: str) -> HttpResponse:
    session = _get_session_for_user(request.user, session_id)
    return render(request, "agents/session.html", _session_context(request, session))


@require_GET
@viewer_required
def older_events(request: HtmxHttpRequest, session_id: str) -> HttpResponse:
    """The page of events before `before`, for "load older" (prepended above the timeline)."""
    session = _get_session_for_user(request.user, session_id)
    return _older(request, session, None)


def _older(request: HttpRequest, session: AgentSession, share: ShareLink | None) -> HttpResponse:
    try:
        before = int(request.GET.get("before", "0"))
    except ValueError:
        before = 0
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


@require_GET
def event_raw(request: HttpRequest, session_id: str, seq: int) -> HttpResponse:
    """The full payload of one event, as received: what the timeline truncates for display.

    Team members, and browsers that opened a live share link of this very session.
    """
    if not (access.can_view(request.user) or access.shares_session(request, session_id)):
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        raise PermissionDenied("You may not see this session.")
    event = get_object_or_404(Event, session_id=session_id, seq=seq)
    response = HttpResponse(event.raw, content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="event-{seq}.txt"'
    response["X-Content-Type-Options"] = "nosniff"
    return response


def _export_name(session: AgentSession, extension: str) -> str:
    slug = slugify(session.title)[:60] or "session"
    return f"porthole-{slug}-{str(session.id)[:8]}.{extension}"


def _ordered_events(session: AgentSession) -> Any:
    return (
        Event.objects.filter(session=session)
        .select_related("actor")
        .order_by("seq")
        .iterator(chunk_size=1000)
    )


@require_GET
@viewer_required
def export_jsonl(request: HttpRequest, session_id: str) -> HttpResponseBase:
    session = _get_session_for_user(request.user, session_id)
    lines = (line + "\n" for line in session_jsonl(session, _ordered_events(session)))
    response = StreamingHttpResponse(lines, content_type="application/x-ndjson; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{_export_name(session, "jsonl")}"'
    return response


@require_GET
@viewer_required
def export_markdown(request: HttpRequest, session_id: str) -> HttpResponseBase:
    session = _get_session_for_user(request.user, session_id)
    chunks = iter_session_markdown(session, _ordered_events(session))
    response = StreamingHttpResponse(chunks, content_type="text/markdown; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{_export_name(session, "md")}"'
    return response


# -- steering ---------------------------------------------------------------------------------


async def _steerable(
    request: HttpRequest, session_id: str
) -> tuple[AbstractBaseUser, AgentSession]:
    user = await request.auser()
    await sync_to_async(access.require_steer)(user)
    session = await sync_to_async(_get_session_for_user)(user, session_id)
    return user, session


async def _controls_response(
    request: HtmxHttpRequest,
    session: AgentSession,
    *,
    error: str = "",
    notice: str = "",
    status: int = 200,
) -> HttpResponse:
    """htmx gets a feedback line; a plain form post is redirected with the message.

    Only the feedback is swapped, never the controls: live updates replace the controls at
    any moment, and a reply swapped into a replaced element would take the prompt box
    (preserved across swaps) with it.
    """
    if not request.htmx:
        if error:
            await sync_to_async(messages.error)(request, error)
        elif notice:
            await sync_to_async(messages.success)(request, notice)
        return redirect(session)
    html = await sync_to_async(render_to_string)(
        "agents/session.html#feedback", {"error": error, "notice": notice}, request=request
    )
    return HttpResponse(html, status=status)


@require_POST
@login_required
async def session_prompt(request: HtmxHttpRequest, session_id: str) -> HttpResponse:
    user, session = await _steerable(request, session_id)
    form = PromptForm(request.POST)
    if not session.is_live:
        return await _controls_response(
            request,
            session,
            error="The session has ended; continue it in a new session.",
            status=409,
        )
    if not form.is_valid():
        return await _controls_response(request, session, error="Write a prompt.", status=400)
    try:
        await actions.send_prompt(user, session, form.cleaned_data["text"])
    except OpenComputerError as exc:
        return await _controls_response(
            request, session, error=f"Not sent: {_shown(exc)}", status=502
        )
    return await _controls_response(request, session, notice="Prompt sent.")


async def _act_on_live_session(
    request: HtmxHttpRequest, session_id: str, act: Any, *, done: str, failed: str
) -> HttpResponse:
    user, session = await _steerable(request, session_id)
    if not session.is_live:
        return await _controls_response(
            request, session, error="The session has ended.", status=409
        )
    try:
        await act(user, session)
    except OpenComputerError as exc:
        return await _controls_response(
            request, session, error=f"{failed}: {_shown(exc)}", status=502
        )
    return await _controls_response(request, session, notice=done)


@require_POST
@login_required
async def session_interrupt(request: HtmxHttpRequest, session_id: str) -> HttpResponse:
    return await _act_on_live_session(
        request, session_id, actions.interrupt, done="Interrupt sent.", failed="Interrupt failed"
    )


@require_POST
@login_required
async def session_configure(request: HtmxHttpRequest, session_id: str) -> HttpResponse:
    user, session = await _steerable(request, session_id)
    form = AgentOptionsForm(request.POST)
    if not session.is_live:
        return await _controls_response(
            request, session, error="The session has ended.", status=409
        )
    if not form.is_valid():
        problems = "; ".join(
            f"{form.fields[name].label or name}: {' '.join(errors)}"
            if name in form.fields
            else " ".join(errors)
            for name, errors in form.errors.items()
        )
        return await _controls_response(
            request, session, error=f"Check the configuration — {problems}", status=400
        )
    options = form.options()
    if not options:
        return await _controls_response(request, session, error="Nothing to change.", status=400)
    if not session.bridge_lease_until or session.bridge_lease_until < timezone.now():
        # Configure travels through the bridge's socket; with none, it would go nowhere.
        return await _controls_response(
            request,
            session,
            error="Not connected to the agent right now; try again shortly.",
            status=503,
        )
    await actions.configure(user, session, options)
    return await _controls_response(request, session, notice="Configuration sent.")


@require_POST
@login_required
async def session_kill(request: HtmxHttpRequest, session_id: str) -> HttpResponse:
    return await _act_on_live_session(
        request, session_id, actions.kill, done="Kill sent.", failed="Kill failed"
    )


@require_POST
@login_required
async def session_continue(request: HtmxHttpRequest, session_id: str) -> HttpResponse:
    user, session = await _steerable(request, session_id)
    form = ContinueForm(request.POST)
    if not form.is_valid():
        return await _controls_response(
            request, session, error="Write a prompt for the new session.", status=400
        )
    try:
        new = await actions.continue_session(user, session, form.cleaned_data["prompt"])
    except OpenComputerError as exc:
        return await _controls_response(
            request, session, error=f"Could not continue: {_shown(exc)}", status=502
        )
    if request.htmx:
        return HttpResponseClientRedirect(new.get_absolute_url())
    return redirect(new)


# -- sandboxes --------------------------------------------------------------------------------


@login_required
async def sandboxes(request: HtmxHttpRequest) -> HttpResponse:
    """Every sandbox of the account, with its agent sessions, recorded here or not."""
    user = await request.auser()
    await sync_to_async(access.require_view)(user)
    error = ""
    listing: list[dict[str, Any]] = []
    try:
        client = upstream.client()
        for info in await client.list_sandboxes():
            try:
                agents = await client.list_agents(info.sandbox_id)
            except OpenComputerError:
                agents = []
            listing.append({"info": info, "agents": agents})
    except OpenComputerError as exc:
        error = f"Cannot list sandboxes: {_shown(exc)}"
    context = await sync_to_async(_sandboxes_context)(user, listing)
    context["error"] = error
    return await sync_to_async(render)(request, "agents/sandboxes.html", context)


def _sandboxes_context(user: Any, listing: list[dict[str, Any]]) -> dict[str, Any]:
    recorded = {
        (s.sandbox.upstream_id, s.upstream_id): s
        for s in AgentSession.objects.select_related("sandbox").filter(
            sandbox__upstream_id__in=[row["info"].sandbox_id for row in listing]
        )
    }
    known = {
        s.upstream_id: s
        for s in Sandbox.objects.filter(upstream_id__in=[row["info"].sandbox_id for row in listing])
    }
    rows = []
    for row in listing:
        info = row["info"]
        rows.append(
            {
                "info": info,
                "sandbox": known.get(info.sandbox_id),
                "agents": [
                    {"info": agent, "session": recorded.get((info.sandbox_id, agent.session_id))}
                    for agent in row["agents"]
                ],
            }
        )
    for row in rows:
        row["can_kill"] = access.can_kill_sandbox(user, row["sandbox"])
    return {"rows": rows, "can_steer": access.can_steer(user)}


@require_POST
@login_required
async def sandbox_attach(request: HtmxHttpRequest, sandbox_id: str, agent_id: str) -> HttpResponse:
    user = await request.auser()
    await sync_to_async(access.require_steer)(user)
    try:
        session = await actions.attach(user, sandbox_id, agent_id)
    except (OpenComputerError, LookupError) as exc:
        text = _shown(exc) if isinstance(exc, OpenComputerError) else str(exc)
        await sync_to_async(messages.error)(request, f"Cannot attach: {text}")
        return redirect("sandboxes")
    return redirect(session)


@require_POST
@login_required
async def sandbox_kill(request: HtmxHttpRequest, sandbox_id: str) -> HttpResponse:
    user = await request.auser()
    await sync_to_async(access.require_steer)(user)
    if request.POST.get("confirm") != sandbox_id:
        await sync_to_async(messages.error)(request, "Type the sandbox id to confirm the kill.")
        return redirect(_next_or(request, reverse("sandboxes")))
    sandbox = await Sandbox.objects.filter(upstream_id=sandbox_id).afirst()
    if not await sync_to_async(access.can_kill_sandbox)(user, sandbox):
        raise PermissionDenied("Only administrators kill sandboxes they did not create.")
    if sandbox is None:
        sandbox = await Sandbox.objects.acreate(upstream_id=sandbox_id)
    try:
        await actions.kill_sandbox(user, sandbox)
    except OpenComputerError as exc:
        await sync_to_async(messages.error)(request, f"Kill failed: {_shown(exc)}")
    else:
        await sync_to_async(access.audit)(user, "sandbox.kill", sandbox_id)
        await sync_to_async(messages.success)(request, f"Sandbox {sandbox_id} killed.")
    return redirect(_next_or(request, reverse("sandboxes")))


def _next_or(request: HttpRequest, fallback: str) -> str:
    """The form's `next`, when it is a path of this site (never an open redirect)."""
    next_url = request.POST.get("next", "")
    safe = url_has_allowed_host_and_scheme(
        next_url, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
    return next_url if next_url and safe else fallback
