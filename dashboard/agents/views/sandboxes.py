"""The account's sandboxes: list them with their agent sessions, attach one, kill one."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from dashboard.agents import access, actions, upstream
from dashboard.agents.models import AgentSession, Sandbox
from dashboard.agents.upstream import shown
from dashboard.agents.views.common import HtmxHttpRequest, this_site_or
from dashboard.opencomputer import OpenComputerError


@login_required
async def sandboxes(request: HtmxHttpRequest) -> HttpResponse:
    """Every sandbox of the account, with its agent sessions, recorded here or not."""
    await sync_to_async(access.require_view)(request.user)
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
        error = f"Cannot list sandboxes: {shown(exc)}"
    return await sync_to_async(_render_sandboxes)(request, listing, error)


def _render_sandboxes(
    request: HttpRequest, listing: list[dict[str, Any]], error: str
) -> HttpResponse:
    user = request.user
    ids = [row["info"].sandbox_id for row in listing]
    recorded = {
        (s.sandbox.upstream_id, s.upstream_id): s
        for s in AgentSession.objects.select_related("sandbox").filter(sandbox__upstream_id__in=ids)
    }
    known = {s.upstream_id: s for s in Sandbox.objects.filter(upstream_id__in=ids)}
    rows = []
    for row in listing:
        info = row["info"]
        sandbox = known.get(info.sandbox_id)
        rows.append(
            {
                "info": info,
                "sandbox": sandbox,
                "agents": [
                    {"info": agent, "session": recorded.get((info.sandbox_id, agent.session_id))}
                    for agent in row["agents"]
                ],
                "can_kill": access.can_kill_sandbox(user, sandbox),
            }
        )
    context = {"rows": rows, "can_steer": access.can_steer(user), "error": error}
    return render(request, "agents/sandboxes.html", context)


@require_POST
@login_required
async def sandbox_attach(request: HtmxHttpRequest, sandbox_id: str, agent_id: str) -> HttpResponse:
    await sync_to_async(access.require_steer)(request.user)
    user = await request.auser()
    try:
        session = await actions.attach(user, sandbox_id, agent_id)
    except (OpenComputerError, LookupError) as exc:
        text = shown(exc) if isinstance(exc, OpenComputerError) else str(exc)
        await sync_to_async(messages.error)(request, f"Cannot attach: {text}")
        return redirect("sandboxes")
    return redirect(session)


@sync_to_async
def _killable(request: HttpRequest, sandbox_id: str) -> Sandbox:
    """The sandbox to kill (recorded now if Porthole never saw it), if this person may."""
    sandbox, may_kill = access.sandbox_for_user(request.user, sandbox_id)
    if not may_kill:
        raise PermissionDenied("Only administrators kill sandboxes they did not create.")
    return sandbox or Sandbox.objects.create(upstream_id=sandbox_id)


@require_POST
@login_required
async def sandbox_kill(request: HtmxHttpRequest, sandbox_id: str) -> HttpResponse:
    await sync_to_async(access.require_steer)(request.user)
    back = this_site_or(request, request.POST.get("next", ""), reverse("sandboxes"))
    if request.POST.get("confirm") != sandbox_id:
        await sync_to_async(messages.error)(request, "Type the sandbox id to confirm the kill.")
        return redirect(back)
    sandbox = await _killable(request, sandbox_id)
    user = await request.auser()
    try:
        await actions.kill_sandbox(user, sandbox)
    except OpenComputerError as exc:
        await sync_to_async(messages.error)(request, f"Kill failed: {shown(exc)}")
    else:
        await sync_to_async(access.audit)(user, "sandbox.kill", sandbox_id)
        await sync_to_async(messages.success)(request, f"Sandbox {sandbox_id} killed.")
    return redirect(back)
