"""Starting a session from the form, once per form however often it is submitted.

The form carries a one-time token (`submission`). The first request with a token claims it
in the cache (shared by every worker in team mode) and starts the session; requests with
the same token (a double click, a resubmit, a retry through a flaky proxy) wait for that
one and land on the same session. A start that the sandbox server refuses gives the token
back, so the form shown again can be sent again. A start runs to the end and is recorded
even if its request goes away meanwhile (a browser aborting the first of a double click).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from dashboard.agents import access, actions
from dashboard.agents.forms import StartSessionForm
from dashboard.agents.models import AgentSession, Sandbox
from dashboard.agents.upstream import shown
from dashboard.agents.views.common import HtmxHttpRequest
from dashboard.opencomputer import OpenComputerError

log = logging.getLogger(__name__)

PENDING = "pending"
FAILED = "failed"
CLAIM_SECONDS = 3600  # a token used within the hour leads to the session it started
WAIT_SECONDS = 120.0  # how long a repeat waits for the first submit to finish starting
TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


@sync_to_async
def _form_for(request: HttpRequest) -> tuple[Any, StartSessionForm, bool, Sandbox | None]:
    """The person (who must be allowed to start), the form, and, when valid, where to run."""
    user = request.user
    if not access.can_steer(user):
        raise PermissionDenied("You may watch sessions but not start them.")
    if request.method != "POST":
        initial = {"sandbox": request.GET["sandbox"]} if request.GET.get("sandbox") else {}
        return user, StartSessionForm(initial=initial), False, None
    form = StartSessionForm(request.POST)
    if not form.is_valid():
        return user, form, False, None
    return user, form, True, form.existing_sandbox()


def _claim_key(user: Any, form: StartSessionForm) -> str | None:
    token = form.cleaned_data.get("submission") or ""
    return f"porthole:start:{user.pk}:{token}" if TOKEN.match(token) else None


async def _claim(key: str) -> str | None:
    """None when this request starts the session; else the session the first one started."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while True:
        if await cache.aadd(key, PENDING, CLAIM_SECONDS):
            return None
        held = await cache.aget(key)
        if held == FAILED:
            return ""  # the first submit failed part-way: it may have left a sandbox
        if held not in (None, PENDING):
            return str(held)
        if loop.time() > deadline:
            # The first submit is still starting (or died without a word): not a second one.
            return ""
        await asyncio.sleep(0.1)


@login_required
async def new_session(request: HtmxHttpRequest) -> HttpResponse:
    user, form, valid, existing = await _form_for(request)
    if valid:
        key = _claim_key(user, form)
        started = await _claim(key) if key else None
        if started:
            return redirect("session", session_id=started)
        if started == "":
            form.add_error(None, "This form is still starting a session: see the session list.")
            return await _render(request, form, 409)
        # Shielded: a browser that goes away (Django cancels the view on http.disconnect)
        # must not cancel a start half done, or the sandbox and agent would run unrecorded
        # and the token, free again, would let the repeat start a second one.
        start = asyncio.ensure_future(_start(user, form, existing, key))
        try:
            try:
                session = await asyncio.shield(start)
            except asyncio.CancelledError:
                # Wait for it here, in the request: its database calls run on the request's
                # thread, which Django ends with the request.
                await asyncio.wait([start])
                if not start.cancelled() and start.exception() is not None:
                    log.warning("a start whose request went away failed: %r", start.exception())
                raise
        except OpenComputerError as exc:
            form.add_error(None, f"The sandbox server refused: {shown(exc)}")
        else:
            return redirect(session)
    return await _render(request, form, 400 if request.method == "POST" else 200)


async def _start(
    user: Any, form: StartSessionForm, existing: Sandbox | None, key: str | None
) -> AgentSession:
    """Start and record the session, then let the token lead to it. Only a definite refusal
    by the sandbox server gives the token back (the form comes back and may be sent again);
    anything else keeps it claimed, so a repeat cannot start a second sandbox."""
    try:
        session = await actions.start_session(
            user,
            prompt=form.cleaned_data["prompt"],
            options=form.options(),
            sandbox=existing,
            template=form.cleaned_data.get("template") or "base",
            idle_timeout=form.cleaned_data.get("idle_timeout") or 0,
            envs=form.cleaned_data.get("envs") or {},
        )
    except OpenComputerError:
        if key:
            await cache.adelete(key)
        raise
    except BaseException:
        if key:
            await cache.aset(key, FAILED, CLAIM_SECONDS)
        raise
    if key:
        await cache.aset(key, str(session.id), CLAIM_SECONDS)
    return session


@sync_to_async
def _render(request: HttpRequest, form: StartSessionForm, status: int) -> HttpResponse:
    return render(request, "agents/new.html", {"form": form}, status=status)
