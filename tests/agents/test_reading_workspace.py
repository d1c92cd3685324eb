"""The Changes panel (issue 12): files the agent wrote or edited, from the recorded tool
calls, and, on demand, their current content or diff fetched through the sandbox's exec API,
here from the embedded sandbox server over real loopback sockets. Stale, and saying so, once
the sandbox is gone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from dashboard.agents.models import AgentSession, Sandbox
from dashboard.agents.workspace import changed_files, run_in_sandbox
from dashboard.opencomputer import OpenComputer
from tests.agents.test_rendering import add_event, assert_safe, parse

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


def write(tool_id: str, name: str, tool_input: dict[str, Any]) -> dict[str, Any]:
    block = {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}
    return {"type": "assistant", "message": {"content": [block]}}


def live_sandbox(oc: Any) -> str:
    async def create() -> str:
        async with OpenComputer(oc.api_url, oc.api_key) as client:
            return (await client.create_sandbox()).sandbox_id

    return asyncio.run(create())


def session_in(sandbox_id: str, **fields: Any) -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id=sandbox_id, status=fields.pop("status", "running"))
    return AgentSession.objects.create(sandbox=sandbox, upstream_id="agent-w", title="w", **fields)


def test_it_lists_the_files_the_session_wrote_most_recent_first() -> None:
    session = session_in("sb-list")
    add_event(session, "agent", write("t1", "Write", {"file_path": "/w/a.py", "content": "x"}))
    add_event(session, "agent", write("t2", "Read", {"file_path": "/w/other.py"}))
    add_event(
        session,
        "agent",
        write("t3", "Edit", {"file_path": "/w/b.py", "old_string": "a", "new_string": "b"}),
    )
    add_event(
        session,
        "agent",
        write("t4", "Edit", {"file_path": "/w/a.py", "old_string": "x", "new_string": "y"}),
    )
    files = changed_files(session)
    assert [(f.path, f.tools, f.count) for f in files] == [
        ("/w/a.py", ["Edit", "Write"], 2),
        ("/w/b.py", ["Edit"], 1),
    ]


def test_it_fetches_the_current_content_from_the_live_sandbox(oc: Any, alice: User) -> None:
    sandbox_id = live_sandbox(oc)
    code, cwd = asyncio.run(run_in_sandbox(sandbox_id, "pwd", []))
    assert code == 0
    path = cwd.decode().strip() + "/notes.py"
    script = f"printf 'def f():\\n    return \"<b>1</b>\"\\n' > {path}"
    code, _ = asyncio.run(run_in_sandbox(sandbox_id, "sh", ["-c", script]))
    assert code == 0
    session = session_in(sandbox_id)
    add_event(session, "agent", write("t1", "Write", {"file_path": path, "content": "old"}))

    client = Client()
    client.force_login(alice)
    panel = client.get(reverse("workspace_changes", args=[session.id]))
    assert panel.status_code == 200
    page = parse(panel.content.decode())  # (our own buttons: assert_safe is for events)
    buttons = [b.attrs["hx-get"] for b in page.elements if b.attrs.get("hx-get")]
    assert len(buttons) == 2 and all(path.split("/")[-1] in b for b in buttons)

    response = client.get(reverse("workspace_file", args=[session.id]), {"path": path})
    assert response.status_code == 200
    html = response.content.decode()
    fetched = assert_safe(html)
    shown = "".join(fetched.text)
    assert 'return "<b>1</b>"' in shown, "fetched now, and escaped"
    assert {"k", "nf"} <= {
        c for e in fetched.find("span") for c in e.attrs.get("class", "").split()
    }


def test_it_fetches_only_files_the_session_wrote(oc: Any, alice: User) -> None:
    session = session_in(live_sandbox(oc))
    add_event(session, "agent", write("t1", "Write", {"file_path": "/w/a.py", "content": "x"}))
    client = Client()
    client.force_login(alice)
    for path in ("/etc/passwd", "/w/a.py/../../etc/passwd", ""):
        response = client.get(reverse("workspace_file", args=[session.id]), {"path": path})
        assert response.status_code == 404, path


def test_it_says_the_list_is_stale_when_the_sandbox_is_gone(alice: User) -> None:
    session = session_in("sb-gone", status="gone")
    add_event(session, "agent", write("t1", "Write", {"file_path": "/w/a.py", "content": "x"}))
    client = Client()
    client.force_login(alice)
    panel = client.get(reverse("workspace_changes", args=[session.id])).content.decode()
    assert "The sandbox is gone" in panel
    assert not [e for e in parse(panel).elements if e.attrs.get("hx-get")], "nothing to fetch"
    answer = client.get(reverse("workspace_file", args=[session.id]), {"path": "/w/a.py"})
    assert "The sandbox is gone" in answer.content.decode()


def test_it_reports_a_missing_file_and_a_sandbox_without_git(oc: Any, alice: User) -> None:
    session = session_in(live_sandbox(oc))
    add_event(
        session, "agent", write("t1", "Write", {"file_path": "/nowhere/x.py", "content": "x"})
    )
    client = Client()
    client.force_login(alice)
    url = reverse("workspace_file", args=[session.id])
    content = client.get(url, {"path": "/nowhere/x.py"}).content.decode()
    assert "not there any more" in content
    diff = client.get(url, {"path": "/nowhere/x.py", "view": "diff"}).content.decode()
    assert "git" in diff
