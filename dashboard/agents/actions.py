"""What people do to sessions: each action is recorded, attributed, then sent upstream.

The timeline entry is written before the upstream call, so "alice sent a prompt" always
precedes the agent's answer to it; when the call fails a second entry says so, with the
server's message. Upstream errors propagate as `OpenComputerError` for the view to show.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from dashboard.agents import leases, upstream
from dashboard.agents.masking import mask_text
from dashboard.agents.models import AgentSession, Event, Sandbox, SessionId
from dashboard.agents.recording import SESSIONS_GROUP, NewEvent, publish, record
from dashboard.agents.stdin import send_stdin
from dashboard.agents.supervisor import wake_supervisors
from dashboard.opencomputer import OpenComputerError, redact

log = logging.getLogger(__name__)


def shown_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options as the timeline may show them: MCP servers' environment values are secrets
    (tokens for the tools), so only their names are kept. The session's config keeps them
    for `continue`."""
    servers = options.get("mcpServers")
    if not isinstance(servers, dict):
        return dict(options)
    masked = {
        name: {**spec, "env": dict.fromkeys(spec.get("env") or {}, "***")}
        if isinstance(spec, dict) and spec.get("env")
        else spec
        for name, spec in servers.items()
    }
    return {**options, "mcpServers": masked}


def _shown(exc: OpenComputerError) -> str:
    return mask_text(redact(exc.message or str(exc), upstream.secrets()))


class NotDelivered(Exception):
    """A control line no bridge took to the agent; the timeline says so too."""


async def note(session_id: SessionId, data: dict[str, Any], actor: Any = None) -> None:
    """Record a dashboard action in the timeline and announce it."""
    actor_id = getattr(actor, "pk", None)
    event = NewEvent.ours(Event.Source.DASHBOARD, data, actor_id=actor_id)
    _, messages = await database_sync_to_async(record)(session_id, [event])
    await publish(messages)


async def acknowledge(user: Any, session: AgentSession, reasons: list[str]) -> None:
    """Mark the session as handled, for the whole team: the timeline says who and why, and
    the attention rule starts again from this event (dashboard/awareness/attention.py)."""
    await note(session.id, {"type": "acknowledged", "reasons": reasons}, actor=user)


async def _failed(session_id: SessionId, action: str, exc: OpenComputerError) -> None:
    await note(session_id, {"type": "action_failed", "action": action, "message": _shown(exc)})


async def _new_sandbox(
    user: User, template: str, idle_timeout: int, envs: dict[str, str]
) -> Sandbox:
    info = await upstream.client().create_sandbox(
        template=template or "base",
        timeout=idle_timeout,
        envs=envs or None,
        metadata={"created_by": "porthole"},
    )
    return await Sandbox.objects.acreate(
        upstream_id=info.sandbox_id,
        template=info.template_id or template or "base",
        status=Sandbox.Status.RUNNING,
        metadata=dict(info.metadata or {}),
        idle_timeout=idle_timeout,
        created_by=user,
        last_seen_at=timezone.now(),
    )


@database_sync_to_async
def _create_session(
    sandbox: Sandbox,
    upstream_id: str,
    user: Any,
    prompt: str,
    options: dict[str, Any],
    origin: str = AgentSession.Origin.PORTHOLE,
    resumed_from: AgentSession | None = None,
) -> AgentSession:
    with transaction.atomic():
        session = AgentSession.objects.create(
            sandbox=sandbox,
            upstream_id=upstream_id,
            origin=origin,
            title=(
                AgentSession.title_from_prompt(prompt)
                if prompt
                else f"Attached session {upstream_id}"
            ),
            prompt=prompt,
            config=options,
            model=str(options.get("model", "")),
            started_by=user,
            resumed_from=resumed_from,
        )
        if prompt:
            shown = shown_options(options)
            first = {"type": "prompt", "text": prompt, **({"options": shown} if shown else {})}
        else:
            first = {"type": "attach"}
        record(session.id, [NewEvent.ours(Event.Source.DASHBOARD, first, actor_id=user.pk)])
    return session


async def _reattach(user: Any, session: AgentSession) -> AgentSession:
    """A lost session the upstream still has: record it again, from its scrollback on
    (the bridge lines the replay up with what is stored, or marks the gap)."""
    await AgentSession.objects.filter(id=session.id, status=AgentSession.Status.LOST).aupdate(
        status=AgentSession.Status.IDLE, ended_at=None, bridge_owner="", bridge_lease_until=None
    )
    await note(session.id, {"type": "attach"}, user)
    await _announce_new_session()
    return await AgentSession.objects.select_related("sandbox").aget(id=session.id)


async def _announce_new_session() -> None:
    await wake_supervisors()
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(SESSIONS_GROUP, {"type": "sessions.new"})


async def start_session(
    user: Any,
    *,
    prompt: str,
    options: dict[str, Any],
    sandbox: Sandbox | None = None,
    template: str = "base",
    idle_timeout: int = 0,
    envs: dict[str, str] | None = None,
    resumed_from: AgentSession | None = None,
) -> AgentSession:
    if sandbox is None:
        sandbox = await _new_sandbox(user, template, idle_timeout, envs or {})
    # No prompt yet: the agent waits for it while a bridge attaches, so the record starts
    # at the agent's first byte however much it prints at once.
    info = await upstream.client().start_agent(
        sandbox.upstream_id, prompt=None, **_client_options(options)
    )
    session = await _create_session(
        sandbox, info.session_id, user, prompt, options, resumed_from=resumed_from
    )
    await _announce_new_session()
    await _first_prompt(session, prompt)
    return session


FIRST_PROMPT_WAIT = 10.0


async def _first_prompt(session: AgentSession, text: str) -> None:
    """Send the first prompt through the bridge once it holds the session. With no bridges
    worker running, or none answering in time, send it through the REST API instead."""
    alive = await database_sync_to_async(leases.workers_alive)()
    problem = (
        await send_stdin(session.id, {"type": "prompt", "text": text}, wait=FIRST_PROMPT_WAIT)
        if alive
        else "no bridges worker is running"
    )
    if problem is not None:
        log.warning("session %s: first prompt sent without a bridge: %s", session.id, problem)
        if alive:
            await note(
                session.id,
                {
                    "type": "notice",
                    "message": f"The first prompt went out before recording began ({problem}); "
                    "output printed before then may be missing.",
                },
            )
        try:
            await upstream.client().send_prompt(
                session.sandbox.upstream_id, session.upstream_id, text
            )
        except OpenComputerError as exc:
            await _failed(session.id, "prompt", exc)
            raise


def _client_options(options: dict[str, Any]) -> dict[str, Any]:
    names = {
        "model": "model",
        "systemPrompt": "system_prompt",
        "allowedTools": "allowed_tools",
        "permissionMode": "permission_mode",
        "maxTurns": "max_turns",
        "cwd": "cwd",
        "mcpServers": "mcp_servers",
        "resume": "resume",
    }
    return {names[k]: v for k, v in options.items() if k in names}


async def send_prompt(user: Any, session: AgentSession, text: str) -> None:
    # Sent while the agent works, it waits for the turn to end: the timeline says so.
    queued = {"queued": True} if session.is_working else {}
    await note(session.id, {"type": "prompt", "text": text, **queued}, user)
    try:
        await upstream.client().send_prompt(session.sandbox.upstream_id, session.upstream_id, text)
    except OpenComputerError as exc:
        await _failed(session.id, "prompt", exc)
        raise


async def interrupt(user: Any, session: AgentSession) -> None:
    await note(session.id, {"type": "interrupt"}, user)
    try:
        await upstream.client().interrupt(session.sandbox.upstream_id, session.upstream_id)
    except OpenComputerError as exc:
        await _failed(session.id, "interrupt", exc)
        raise


async def configure(user: Any, session: AgentSession, options: dict[str, Any]) -> None:
    """There is no REST call for configure: the bridge writes the line to the agent's stdin
    and acknowledges it. Without an acknowledgement the timeline records the failure and
    `NotDelivered` tells the person."""
    if not await database_sync_to_async(leases.held)(session.id):
        message = "Not connected to the agent right now: no bridge holds this session."
        await note(
            session.id, {"type": "action_failed", "action": "configure", "message": message}, user
        )
        raise NotDelivered(message)
    await note(session.id, {"type": "configure", **shown_options(options)}, user)
    problem = await send_stdin(session.id, {"type": "configure", **options})
    if problem is not None:
        message = f"Not sent: {problem}."
        await note(session.id, {"type": "action_failed", "action": "configure", "message": message})
        raise NotDelivered(message)


async def kill(user: Any, session: AgentSession, signal: int = 9) -> None:
    await AgentSession.objects.filter(id=session.id).aupdate(kill_requested=True)
    await note(session.id, {"type": "kill", "signal": signal}, user)
    try:
        await upstream.client().kill_agent(
            session.sandbox.upstream_id, session.upstream_id, signal=signal
        )
    except OpenComputerError as exc:
        await AgentSession.objects.filter(id=session.id).aupdate(kill_requested=False)
        await _failed(session.id, "kill", exc)
        raise


async def continue_session(user: Any, session: AgentSession, prompt: str) -> AgentSession:
    """A new session in the same sandbox that resumes this one's Claude conversation."""
    options = dict(session.config or {})
    if session.claude_session_id:
        options["resume"] = session.claude_session_id
    new = await start_session(
        user, prompt=prompt, options=options, sandbox=session.sandbox, resumed_from=session
    )
    # No title: the old session's share links must not show what the next one is about.
    await note(session.id, {"type": "continue", "session": str(new.id)}, user)
    return new


async def kill_sandbox(user: Any, sandbox: Sandbox) -> None:
    live = [
        s
        async for s in AgentSession.objects.filter(
            sandbox=sandbox, status__in=AgentSession.LIVE_STATUSES
        )
    ]
    await AgentSession.objects.filter(id__in=[s.id for s in live]).aupdate(kill_requested=True)
    for session in live:
        await note(session.id, {"type": "sandbox_kill"}, user)
    try:
        await upstream.client().kill_sandbox(sandbox.upstream_id)
    except OpenComputerError as exc:
        await AgentSession.objects.filter(id__in=[s.id for s in live]).aupdate(kill_requested=False)
        for session in live:
            await _failed(session.id, "sandbox_kill", exc)
        raise
    await Sandbox.objects.filter(id=sandbox.id).aupdate(status=Sandbox.Status.KILLED)


async def attach(user: Any, sandbox_upstream_id: str, session_upstream_id: str) -> AgentSession:
    """Record a session started elsewhere, from its scrollback on."""
    existing = await AgentSession.objects.filter(
        sandbox__upstream_id=sandbox_upstream_id, upstream_id=session_upstream_id
    ).afirst()
    if existing is not None and existing.status != AgentSession.Status.LOST:
        return existing
    client = upstream.client()
    info = await client.get_sandbox(sandbox_upstream_id)
    sessions = await client.list_agents(sandbox_upstream_id)
    if not any(s.session_id == session_upstream_id for s in sessions):
        raise LookupError("That session is not an agent session of this sandbox.")
    if existing is not None:
        return await _reattach(user, existing)
    sandbox, _ = await Sandbox.objects.aget_or_create(
        upstream_id=sandbox_upstream_id,
        defaults={
            "template": info.template_id or "",
            "metadata": dict(info.metadata or {}),
            "status": Sandbox.Status.RUNNING,
        },
    )
    session = await _create_session(
        sandbox, session_upstream_id, user, "", {}, origin=AgentSession.Origin.ATTACHED
    )
    await _announce_new_session()
    return session
