"""Steering a session: follow-up prompt, interrupt, configure, kill, continue.

Async: each waits on the sandbox server. What they read from the database is fetched in one
step (`_steerable`) before the first await on the network.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect
from django.template.defaultfilters import pluralize
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_POST
from django_htmx.http import (
    HttpResponseClientRedirect,
    HttpResponseClientRefresh,
    trigger_client_event,
)

from dashboard.agents import access, actions
from dashboard.agents.forms import AgentOptionsForm, ContinueForm, PromptForm
from dashboard.agents.models import AgentSession
from dashboard.agents.upstream import shown
from dashboard.agents.views.common import HtmxHttpRequest, this_site_or
from dashboard.awareness import attention
from dashboard.opencomputer import OpenComputerError


@sync_to_async
def _steerable(request: HttpRequest, session_id: str) -> tuple[Any, AgentSession]:
    """The person and the session, if they may steer it."""
    user = request.user
    session, rights = access.session_for_user(user, session_id)
    if not rights.steer:
        raise PermissionDenied("You may watch sessions but not steer them.")
    return user, session


def _first_error(form: Any) -> str:
    return " ".join(str(e) for errors in form.errors.values() for e in errors)


@sync_to_async
def _controls_response(
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
            messages.error(request, error)
        elif notice:
            messages.success(request, notice)
        return redirect(session)
    html = render_to_string(
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
        return await _controls_response(request, session, error=_first_error(form), status=400)
    try:
        await actions.send_prompt(user, session, form.cleaned_data["text"])
    except OpenComputerError as exc:
        return await _controls_response(
            request, session, error=f"Not sent: {shown(exc)}", status=502
        )
    return await _controls_response(request, session, notice="Prompt sent.")


# What a live session's one-click controls do: the action, and what the person is told.
_ONE_CLICK: dict[str, tuple[Callable[[Any, AgentSession], Awaitable[None]], str, str]] = {
    "interrupt": (actions.interrupt, "Interrupt sent.", "Interrupt failed"),
    "kill": (actions.kill, "Kill sent.", "Kill failed"),
}


async def _one_click(request: HtmxHttpRequest, session_id: str, what: str) -> HttpResponse:
    act, done, failed = _ONE_CLICK[what]
    user, session = await _steerable(request, session_id)
    if not session.is_live:
        return await _controls_response(
            request, session, error="The session has ended.", status=409
        )
    try:
        await act(user, session)
    except OpenComputerError as exc:
        return await _controls_response(
            request, session, error=f"{failed}: {shown(exc)}", status=502
        )
    return await _controls_response(request, session, notice=done)


@require_POST
@login_required
async def session_interrupt(request: HtmxHttpRequest, session_id: str) -> HttpResponse:
    return await _one_click(request, session_id, "interrupt")


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
            f"{form.fields[name].label or name}: {' '.join(str(e) for e in errors)}"
            if name in form.fields
            else " ".join(str(e) for e in errors)
            for name, errors in form.errors.items()
        )
        return await _controls_response(
            request, session, error=f"Check the configuration — {problems}", status=400
        )
    options = form.options()
    if not options:
        return await _controls_response(request, session, error="Nothing to change.", status=400)
    try:
        # Configure travels through the bridge's socket; actions records any failure.
        await actions.configure(user, session, options)
    except actions.NotDelivered as exc:
        return await _controls_response(request, session, error=str(exc), status=503)
    return await _controls_response(request, session, notice="Configuration sent.")


@require_POST
@login_required
async def session_kill(request: HtmxHttpRequest, session_id: str) -> HttpResponse:
    return await _one_click(request, session_id, "kill")


# Told to the page after a mark, so that the top bar's count (notify.js) drops at once instead
# of at its next poll.
ATTENTION_CHANGED = "porthole:attention-changed"


@require_POST
@login_required
async def session_acknowledge(request: HtmxHttpRequest, session_id: str) -> HttpResponse:
    """Mark the session as handled for the team: it leaves "Needs attention" until something
    else goes wrong."""
    user, session = await _steerable(request, session_id)
    verdict = await sync_to_async(attention.of)(session)
    from_list = request.POST.get("from") == "list"
    if verdict:
        await actions.acknowledge(user, session, list(verdict.reasons))
    if from_list:
        # Triage: whoever was quicker, the row shows the session as it is now.
        response = await _list_response(request, session, marked=bool(verdict))
    elif not verdict:
        response = await _controls_response(
            request, session, error="Nothing here needs attention now.", status=409
        )
    else:
        response = await _controls_response(request, session, notice="Marked as handled.")
    return trigger_client_event(response, ATTENTION_CHANGED) if request.htmx else response


@sync_to_async
def _list_response(
    request: HtmxHttpRequest, session: AgentSession, *, marked: bool
) -> HttpResponse:
    """htmx gets the session's row to put in place of the one clicked; a plain form post goes
    back to the list it came from (its filters kept), with the message."""
    if not request.htmx:
        title = session.title or "(untitled)"
        if marked:
            messages.success(request, f"Marked “{title}” as handled.")
        else:
            messages.info(request, f"“{title}” needs no attention now.")
        return _back_to_list(request)
    row = AgentSession.objects.select_related("sandbox", "started_by").get(pk=session.pk)
    return HttpResponse(render_to_string("agents/index.html#row", {"session": row}, request))


def _back_to_list(request: HttpRequest) -> HttpResponse:
    """The list the form was posted from, its filters kept; never another site's page."""
    return redirect(this_site_or(request, request.headers.get("referer", ""), reverse("index")))


MARKED_AT_ONCE = 100  # more than a page of the list (25) holds


@require_POST
@login_required
async def sessions_acknowledge(request: HtmxHttpRequest) -> HttpResponse:
    """Mark every session a page of the "Needs attention" list showed as handled: those that
    still need attention when the post arrives; the rest (handled meanwhile, unknown) are
    left as they are."""
    user = request.user
    if not await sync_to_async(access.can_steer)(user):
        raise PermissionDenied("You may watch sessions but not steer them.")
    posted = request.POST.getlist("session")
    if len(posted) > MARKED_AT_ONCE:
        return HttpResponseBadRequest(f"At most {MARKED_AT_ONCE} sessions at once.")
    marked = 0
    for session, verdict in await _needing_attention(posted):
        await actions.acknowledge(user, session, list(verdict.reasons))
        marked += 1
    if marked:
        messages.success(request, f"Marked {marked} session{pluralize(marked)} as handled.")
    else:
        messages.info(request, "None of these sessions needs attention now.")
    if request.htmx:
        return HttpResponseClientRefresh()
    return _back_to_list(request)


@sync_to_async
def _needing_attention(posted: list[str]) -> list[tuple[AgentSession, attention.Attention]]:
    ids = set()
    for value in posted:
        with contextlib.suppress(ValueError):
            ids.add(uuid.UUID(value))
    sessions = attention.needing_attention(AgentSession.objects.filter(pk__in=ids))
    return [(session, attention.of(session)) for session in sessions.order_by("started_at")]


@require_POST
@login_required
async def session_continue(request: HtmxHttpRequest, session_id: str) -> HttpResponse:
    user, session = await _steerable(request, session_id)
    form = ContinueForm(request.POST)
    if not form.is_valid():
        return await _controls_response(request, session, error=_first_error(form), status=400)
    try:
        new = await actions.continue_session(user, session, form.cleaned_data["prompt"])
    except OpenComputerError as exc:
        return await _controls_response(
            request, session, error=f"Could not continue: {shown(exc)}", status=502
        )
    if request.htmx:
        return HttpResponseClientRedirect(new.get_absolute_url())
    return redirect(new)
