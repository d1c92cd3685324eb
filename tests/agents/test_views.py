"""Pages and actions through the Django test client, against the embedded sandbox server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.test import AsyncClient, Client
from django.urls import reverse
from django.utils import timezone

from dashboard.agents.bridge import Bridge
from dashboard.agents.models import AgentSession, AuditEntry, Event, Sandbox
from dashboard.opencomputer import OpenComputer
from tests.agents.helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def upstream(oc, call):  # type: ignore[no-untyped-def]
    """Run one call of our own client against the embedded server, for checking its side."""

    async def run():  # type: ignore[no-untyped-def]
        async with OpenComputer(oc.api_url, oc.api_key) as client:
            return await call(client)

    return asyncio.run(run())


def signed_in(user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(user)
    return client


def start(client: Client, prompt: str = "hello", **fields: str) -> AgentSession:
    response = client.post(reverse("new_session"), {"prompt": prompt, "sandbox": "new", **fields})
    assert response.status_code == 302, response.content.decode()[:2000]
    return AgentSession.objects.get(id=response.url.strip("/").split("/")[-1])


def timeline(session: AgentSession) -> list[tuple[str, str]]:
    return list(session.events.order_by("seq").values_list("source", "type"))


# -- access ------------------------------------------------------------------------------------


def test_it_sends_anonymous_people_to_sign_in(db):
    response = Client().get(reverse("index"))
    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


def test_it_forbids_viewers_to_start_sessions(oc, bob):
    client = signed_in(bob)
    assert client.get(reverse("new_session")).status_code == 403
    assert client.post(reverse("new_session"), {"prompt": "x"}).status_code == 403


def test_it_forbids_viewers_to_steer(oc, alice, bob):
    session = start(signed_in(alice), "sleep 5")
    client = signed_in(bob)
    for name in ("session_prompt", "session_interrupt", "session_kill", "session_continue"):
        response = client.post(reverse(name, args=[session.id]), {"text": "x", "prompt": "x"})
        assert response.status_code == 403, name
    assert client.get(session.get_absolute_url()).status_code == 200


def test_it_rejects_a_post_without_csrf_token(oc, alice):
    session = start(signed_in(alice), "sleep 5")
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    response = client.post(reverse("session_interrupt", args=[session.id]))
    assert response.status_code == 403


# -- the start form ------------------------------------------------------------------------------


def test_it_shows_the_start_form(oc, alice):
    response = signed_in(alice).get(reverse("new_session"))
    assert response.status_code == 200
    for name in ("prompt", "model", "permission_mode", "mcp_servers", "sandbox", "envs"):
        assert f'name="{name}"' in response.content.decode()


def test_it_starts_a_session_and_redirects_to_its_page(oc, alice):
    session = start(signed_in(alice), "Fix the tests\nsecond line", model="demo-model")
    assert session.title == "Fix the tests"
    assert session.started_by == alice
    assert session.config["model"] == "demo-model"
    sandbox_id = session.sandbox.upstream_id
    listed = upstream(oc, lambda c: c.list_agents(sandbox_id))
    assert [s.session_id for s in listed] == [session.upstream_id]
    first = session.events.get(seq=1)
    assert (first.source, first.type, first.actor) == ("dashboard", "prompt", alice)


def test_it_keeps_what_was_typed_when_the_form_is_invalid(oc, alice):
    response = signed_in(alice).post(
        reverse("new_session"),
        {"prompt": "keep me", "sandbox": "new", "mcp_servers": "{not json"},
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert "Not valid JSON" in html
    assert "keep me" in html
    assert not AgentSession.objects.exists()
    # Said at the top too, linking to the field far down the form.
    summary = html.split('class="error form-errors" role="alert">', 1)[1].split("</div>", 1)[0]
    assert 'href="#id_mcp_servers"' in summary and "Not valid JSON" in summary


def test_it_explains_a_bad_mcp_server_definition(oc, alice):
    response = signed_in(alice).post(
        reverse("new_session"),
        {"prompt": "p", "sandbox": "new", "mcp_servers": '{"fs": {"args": ["x"]}}'},
    )
    assert response.status_code == 400
    assert "needs a “command” string" in response.content.decode()


def test_it_requires_a_prompt(oc, alice):
    response = signed_in(alice).post(reverse("new_session"), {"prompt": "  ", "sandbox": "new"})
    assert response.status_code == 400
    assert "Write a prompt." in response.content.decode()


def test_it_shows_the_servers_message_when_upstream_refuses(oc, alice):
    client = signed_in(alice)
    first = start(client, "sleep 1")
    first_sandbox = first.sandbox.upstream_id
    upstream(oc, lambda c: c.kill_sandbox(first_sandbox))
    response = client.post(
        reverse("new_session"), {"prompt": "typed prompt", "sandbox": str(first.sandbox.id)}
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert "The sandbox server refused" in html
    assert "typed prompt" in html
    assert oc.api_key not in html


# -- the session page ----------------------------------------------------------------------------


def test_it_renders_a_session_page_with_its_timeline(oc, alice):
    session = start(signed_in(alice), "Hello from the test")
    response = signed_in(alice).get(session.get_absolute_url())
    html = response.content.decode()
    assert response.status_code == 200
    assert "Hello from the test" in html
    assert f'ws-connect="/ws/sessions/{session.id}/"' in html
    assert 'id="timeline"' in html and 'id="stderr-log"' in html


def test_it_loads_older_events_on_demand(oc, alice):
    session = start(signed_in(alice), "x")
    Event.objects.bulk_create(
        Event(session=session, seq=n, source="agent", type="ready", raw='{"type":"ready"}')
        for n in range(2, 302)
    )
    AgentSession.objects.filter(id=session.id).update(next_seq=302)
    client = signed_in(alice)
    page = client.get(session.get_absolute_url()).content.decode()
    assert 'id="event-301"' in page and 'id="event-101"' not in page
    older = client.get(reverse("older_events", args=[session.id]), {"before": 102}).content.decode()
    assert 'id="event-101"' in older and 'id="event-1"' in older
    assert 'id="event-102"' not in older


def test_it_sends_a_follow_up_prompt_and_records_who_sent_it(oc, alice, charlie):
    session = start(signed_in(alice), "first")
    response = signed_in(charlie).post(
        reverse("session_prompt", args=[session.id]),
        {"text": "second prompt"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200
    assert "Prompt sent." in response.content.decode()
    prompt = session.events.filter(type="prompt").last()
    assert prompt.actor == charlie and json.loads(prompt.raw)["text"] == "second prompt"


def test_it_marks_a_prompt_sent_while_the_agent_works_as_queued(oc, alice):
    session = start(signed_in(alice), "sleep 30")
    AgentSession.objects.filter(id=session.id).update(status=AgentSession.Status.WORKING)
    client = signed_in(alice)
    client.post(reverse("session_prompt", args=[session.id]), {"text": "after that"})
    prompt = session.events.filter(type="prompt").last()
    assert json.loads(prompt.raw) == {"type": "prompt", "text": "after that", "queued": True}
    page = client.get(reverse("session", args=[session.id])).content.decode()
    assert "alice sent a prompt (queued: the agent takes it when its turn ends)" in page


def test_it_refuses_an_empty_follow_up(oc, alice):
    session = start(signed_in(alice), "first")
    response = signed_in(alice).post(
        reverse("session_prompt", args=[session.id]),
        {"text": " "},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 400
    assert "Write a prompt." in response.content.decode()


def test_it_interrupts_and_records_it(oc, alice):
    session = start(signed_in(alice), "sleep 30")
    response = signed_in(alice).post(reverse("session_interrupt", args=[session.id]))
    assert response.status_code == 302
    assert session.events.filter(source="dashboard", type="interrupt", actor=alice).exists()


def test_it_kills_a_session_upstream(oc, alice):
    session = start(signed_in(alice), "sleep 30")
    response = signed_in(alice).post(
        reverse("session_kill", args=[session.id]), headers={"HX-Request": "true"}
    )
    assert response.status_code == 200
    assert AgentSession.objects.get(id=session.id).kill_requested

    sandbox_id = session.sandbox.upstream_id

    def ended() -> bool:
        infos = upstream(oc, lambda c: c.list_agents(sandbox_id))
        return not infos[0].running

    wait_until(ended)
    assert session.events.filter(type="kill", actor=alice).exists()


def test_it_refuses_to_steer_an_ended_session(oc, alice):
    session = start(signed_in(alice), "x")
    AgentSession.objects.filter(id=session.id).update(status=AgentSession.Status.EXITED)
    response = signed_in(alice).post(
        reverse("session_prompt", args=[session.id]),
        {"text": "late"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 409
    assert "has ended" in response.content.decode()


def test_it_refuses_configure_when_no_bridge_holds_the_session(oc, alice):
    session = start(signed_in(alice), "x")
    response = signed_in(alice).post(
        reverse("session_configure", args=[session.id]),
        {"model": "other-model"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 503
    assert "Not connected to the agent" in response.content.decode()
    assert not session.events.filter(type="configure").exists()


async def test_it_sends_configure_and_records_it(oc, alice):
    """Configure travels through the bridge that holds the session: a real one here."""
    client = AsyncClient()
    await database_sync_to_async(client.force_login)(alice)
    response = await client.post(reverse("new_session"), {"prompt": "x", "sandbox": "new"})
    session = await AgentSession.objects.aget(id=response.url.strip("/").split("/")[-1])
    await AgentSession.objects.filter(id=session.id).aupdate(  # as a supervisor would
        bridge_owner="views-test-worker", bridge_lease_until=timezone.now() + timedelta(seconds=60)
    )
    bridge = asyncio.create_task(Bridge(str(session.id), "views-test-worker").run())

    async def ready() -> bool:  # the agent is up: configure can be acknowledged
        return await session.events.filter(type="ready").aexists()

    await wait_for(ready)
    response = await client.post(
        reverse("session_configure", args=[session.id]),
        {"model": "other-model", "max_turns": "7"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200, response.content.decode()
    event = await session.events.aget(type="configure")
    assert json.loads(event.raw) == {"type": "configure", "model": "other-model", "maxTurns": 7}
    await client.post(reverse("session_kill", args=[session.id]), headers={"HX-Request": "true"})
    await asyncio.wait_for(bridge, 30)


def test_it_continues_in_a_new_session_with_resume(oc, alice):
    session = start(signed_in(alice), "x")
    AgentSession.objects.filter(id=session.id).update(
        status=AgentSession.Status.EXITED, claude_session_id="claude-123"
    )
    response = signed_in(alice).post(
        reverse("session_continue", args=[session.id]), {"prompt": "carry on"}
    )
    assert response.status_code == 302
    new = AgentSession.objects.exclude(id=session.id).get()
    assert new.resumed_from_id == session.id
    assert new.config["resume"] == "claude-123"
    assert new.sandbox_id == session.sandbox_id
    assert session.events.filter(type="continue").exists()


def test_it_shows_an_upstream_error_instead_of_a_broken_page(oc, alice):
    session = start(signed_in(alice), "x")
    sandbox_id = session.sandbox.upstream_id
    upstream(oc, lambda c: c.kill_sandbox(sandbox_id))
    response = signed_in(alice).post(
        reverse("session_prompt", args=[session.id]),
        {"text": "anyone?"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 502
    html = response.content.decode()
    assert "Not sent:" in html
    assert session.events.filter(type="action_failed").exists()


# -- exports -------------------------------------------------------------------------------------


def test_it_exports_jsonl_and_markdown(oc, alice):
    session = start(signed_in(alice), "Export me")
    client = signed_in(alice)
    jsonl = client.get(reverse("export_jsonl", args=[session.id]))
    assert jsonl["Content-Disposition"].startswith("attachment")
    # Streamed from an async iterator: iterating the response reads it in this sync test.
    rows = [json.loads(line) for line in b"".join(jsonl).splitlines()]
    assert rows[0]["seq"] == 1 and rows[0]["event"]["text"] == "Export me"
    markdown = client.get(reverse("export_markdown", args=[session.id]))
    assert "Export me" in b"".join(markdown).decode()


def test_it_downloads_an_events_full_payload(oc, alice):
    session = start(signed_in(alice), "x" * 50_000)
    response = signed_in(alice).get(reverse("event_raw", args=[session.id, 1]))
    assert response.status_code == 200
    assert len(json.loads(response.content)["text"]) == 50_000


# -- sandboxes -------------------------------------------------------------------------------------


def test_it_lists_sandboxes_with_sessions_started_elsewhere_and_attaches(oc, alice):
    async def elsewhere(c):  # type: ignore[no-untyped-def]
        sandbox = await c.create_sandbox()
        agent = await c.start_agent(sandbox.sandbox_id, prompt="started by a script")
        return sandbox.sandbox_id, agent.session_id

    sandbox_id, session_id = upstream(oc, elsewhere)
    client = signed_in(alice)
    page = client.get(reverse("sandboxes")).content.decode()
    assert sandbox_id in page and session_id in page and "Attach and record" in page

    response = client.post(reverse("sandbox_attach", args=[sandbox_id, session_id]))
    session = AgentSession.objects.get(upstream_id=session_id)
    assert response.url == session.get_absolute_url()
    assert session.origin == AgentSession.Origin.ATTACHED
    assert session.events.get(seq=1).type == "attach"
    # Recorded here, it shows the status the session list shows, not the process's.
    AgentSession.objects.filter(id=session.id).update(status=AgentSession.Status.IDLE)
    row = client.get(reverse("sandboxes")).content.decode().split(session_id, 1)[0]
    assert row.rsplit("<li>", 1)[1].strip().startswith('<span class="badge badge-idle"')


def test_it_kills_a_sandbox_only_when_confirmed(oc, alice):
    session = start(signed_in(alice), "sleep 30")
    sandbox_id = session.sandbox.upstream_id
    client = signed_in(alice)
    client.post(reverse("sandbox_kill", args=[sandbox_id]), {"confirm": "wrong"})
    assert upstream(oc, lambda c: c.get_sandbox(sandbox_id)).status == "running"

    client.post(reverse("sandbox_kill", args=[sandbox_id]), {"confirm": sandbox_id})
    assert Sandbox.objects.get(upstream_id=sandbox_id).status == Sandbox.Status.KILLED
    assert session.events.filter(type="sandbox_kill", actor=alice).exists()
    assert AuditEntry.objects.filter(action="sandbox.kill", target=sandbox_id, actor=alice).exists()


# -- the list ------------------------------------------------------------------------------------


def test_it_lists_filters_and_searches_sessions(oc, alice, charlie):
    mine = start(signed_in(alice), "Refactor the parser")
    theirs = start(signed_in(charlie), "Write docs")
    AgentSession.objects.filter(id=theirs.id).update(status=AgentSession.Status.EXITED, exit_code=1)
    client = signed_in(alice)
    html = client.get(reverse("index")).content.decode()
    assert "Refactor the parser" in html and "Write docs" in html

    attention = client.get(reverse("index"), {"status": "attention"}).content.decode()
    assert "Write docs" in attention and "Refactor the parser" not in attention
    running = client.get(reverse("index"), {"status": "running"}).content.decode()
    assert "Refactor the parser" in running and "Write docs" not in running
    by_charlie = client.get(reverse("index"), {"starter": "charlie"}).content.decode()
    assert "Write docs" in by_charlie and "Refactor the parser" not in by_charlie
    found = client.get(reverse("index"), {"q": "parser"}, headers={"HX-Request": "true"})
    assert 'id="results"' in found.content.decode()
    assert "<html" not in found.content.decode()
    assert str(mine.id) in found.content.decode()


def test_it_searches_the_list_with_a_query_of_any_length(oc, alice):
    start(signed_in(alice), "Refactor the parser")
    client = signed_in(alice)
    for query in ("parser" + " " * 60_000, "x" * 60_000, "parser" + "x" * 60_000):
        response = client.get(reverse("index"), {"q": query})
        assert response.status_code == 200
    found = client.get(reverse("index"), {"q": "parser" + " " * 60_000}).content.decode()
    assert "Refactor the parser" in found


def test_it_paginates_the_list(oc, alice):
    sandbox = Sandbox.objects.create(upstream_id="sb-many")
    AgentSession.objects.bulk_create(
        AgentSession(sandbox=sandbox, upstream_id=f"s{n}", title=f"session {n}") for n in range(30)
    )
    client = signed_in(alice)
    first = client.get(reverse("index")).content.decode()
    assert "Page 1 of 2" in first
    second = client.get(reverse("index"), {"page": 2}).content.decode()
    assert "Page 2 of 2" in second
