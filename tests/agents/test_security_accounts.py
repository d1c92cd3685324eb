"""Accounts and forms: deactivation signs a person out everywhere, a start form submitted
five times at once starts one session, and an over-long prompt is told its limit."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.test import AsyncClient, Client
from django.urls import reverse

from dashboard.agents.models import AgentSession, Sandbox
from dashboard.asgi import application
from dashboard.opencomputer import OpenComputer
from tests.agents.helpers import communicator, session_cookie

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

LIMIT = 200_000


def _signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _sessions_of(user: User) -> int:
    return sum(
        1 for s in Session.objects.all() if s.get_decoded().get("_auth_user_id") == str(user.pk)
    )


# -- deactivation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["people", "save"])
async def test_it_signs_a_deactivated_person_out_everywhere(oc, bob, dave, how):
    sandbox = await Sandbox.objects.acreate(upstream_id="sb")
    session = await AgentSession.objects.acreate(sandbox=sandbox, upstream_id="s")
    browsers = [await database_sync_to_async(_signed_in)(bob) for _ in range(2)]
    page = await communicator(f"/ws/sessions/{session.id}/", cookie=session_cookie(browsers[0]))
    listing = await communicator("/ws/sessions/", cookie=session_cookie(browsers[1]))
    for socket in (page, listing):
        assert (await socket.connect())[0]
    await page.send_json_to({"last_seq": 0})
    assert await database_sync_to_async(_sessions_of)(bob) == 2

    def deactivate() -> None:
        # The People page sends nothing to sockets itself: both branches go through the
        # model hooks (dashboard.agents.revocation), as Django admin and a shell do.
        if how == "people":
            response = _signed_in(dave).post(
                reverse("person_update", args=[bob.pk]), {"role": "viewer"}
            )
            assert response.status_code == 302
        else:  # Django admin, a shell, a script: anything that saves the user
            person = User.objects.get(pk=bob.pk)
            person.is_active = False
            person.save()

    await database_sync_to_async(deactivate)()
    for socket in (page, listing):
        while (output := await socket.receive_output(timeout=10))["type"] != "websocket.close":
            pass
        assert output["code"] == 4403
    assert await database_sync_to_async(_sessions_of)(bob) == 0

    # Active again, the old browsers are still signed out: they sign in afresh.
    await User.objects.filter(pk=bob.pk).aupdate(is_active=True)
    for browser in browsers:
        response = await database_sync_to_async(browser.get)(reverse("index"))
        assert response.status_code == 302 and response.url.startswith(reverse("login"))


def test_it_leaves_other_people_signed_in(oc, alice, bob, dave):
    _signed_in(alice)
    _signed_in(bob)
    response = _signed_in(dave).post(reverse("person_update", args=[bob.pk]), {"role": "viewer"})
    assert response.status_code == 302
    assert _sessions_of(alice) == 1 and _sessions_of(bob) == 0


# -- one session per submitted form ----------------------------------------------------------------


def _form_fields(html: str) -> dict[str, str]:
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html))
    return fields


async def test_it_starts_one_session_when_the_same_form_is_submitted_five_times_at_once(oc, alice):
    client = AsyncClient()
    await database_sync_to_async(client.force_login)(alice)
    form = (await client.get(reverse("new_session"))).content.decode()
    hidden = _form_fields(form)
    assert "submission" in hidden, "the form carries a one-time token"
    data: dict[str, Any] = {**hidden, "prompt": "only once", "sandbox": "new"}

    responses = await asyncio.gather(*(client.post(reverse("new_session"), data) for _ in range(5)))

    assert [r.status_code for r in responses] == [302] * 5
    assert await AgentSession.objects.acount() == 1
    assert await Sandbox.objects.acount() == 1
    session = await AgentSession.objects.aget()
    assert {r.url for r in responses} == {session.get_absolute_url()}

    # A new form (a new token) starts a new session.
    again = _form_fields((await client.get(reverse("new_session"))).content.decode())
    assert again["submission"] != hidden["submission"]
    response = await client.post(reverse("new_session"), {**data, **again})
    assert response.status_code == 302 and response.url != session.get_absolute_url()
    assert await AgentSession.objects.acount() == 2


async def _wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _post_and_hang_up(
    path: str, body: bytes, cookies: str, hang_up: asyncio.Event
) -> list[dict[str, Any]]:
    """A browser's POST straight into the ASGI application, aborted when `hang_up` is set
    (what the server sends when the browser drops the connection: `http.disconnect`)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"localhost"),
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"content-length", str(len(body)).encode()),
            (b"cookie", cookies.encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    given = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await application(scope, receive, send)
    return sent


async def test_it_starts_one_session_when_the_first_submit_is_abandoned_mid_start(oc, alice):
    """A double click: the browser aborts the first POST (Django cancels its view) and sends
    the second. The first start still completes and is recorded; the second lands on it."""
    browser = await database_sync_to_async(_signed_in)(alice)
    page = await database_sync_to_async(browser.get)(reverse("new_session"))
    hidden = _form_fields(page.content.decode())
    data = {**hidden, "prompt": "only once", "sandbox": "new"}
    cookies = "; ".join(f"{name}={morsel.value}" for name, morsel in browser.cookies.items())
    upstream = OpenComputer(oc.api_url, oc.api_key)
    before = {s.sandbox_id for s in await upstream.list_sandboxes()}

    hang_up = asyncio.Event()
    first = asyncio.create_task(
        _post_and_hang_up(reverse("new_session"), urlencode(data).encode(), cookies, hang_up)
    )
    # Hang up once the sandbox exists: the agent is being started, the session not recorded.
    await _wait_for(Sandbox.objects.aexists)
    hang_up.set()
    await first

    again = AsyncClient()
    await database_sync_to_async(again.force_login)(alice)
    second = await again.post(reverse("new_session"), data)

    assert second.status_code == 302
    session = await AgentSession.objects.select_related("sandbox").aget()
    assert second.url == session.get_absolute_url()
    assert await Sandbox.objects.acount() == 1
    made = {s.sandbox_id for s in await upstream.list_sandboxes()} - before
    assert made == {session.sandbox.upstream_id}
    await upstream.aclose()


async def test_it_keeps_one_persons_token_from_starting_anothers_session(oc, alice, charlie):
    mine = AsyncClient()
    await database_sync_to_async(mine.force_login)(alice)
    hidden = _form_fields((await mine.get(reverse("new_session"))).content.decode())
    data = {**hidden, "prompt": "mine", "sandbox": "new"}
    first = await mine.post(reverse("new_session"), data)
    theirs = AsyncClient()
    await database_sync_to_async(theirs.force_login)(charlie)
    second = await theirs.post(reverse("new_session"), data)
    assert first.status_code == second.status_code == 302
    assert first.url != second.url
    assert await AgentSession.objects.filter(started_by=charlie).aexists()


async def test_it_lets_a_form_that_failed_be_submitted_again(oc, alice):
    client = AsyncClient()
    await database_sync_to_async(client.force_login)(alice)
    hidden = _form_fields((await client.get(reverse("new_session"))).content.decode())
    bad = await client.post(
        reverse("new_session"), {**hidden, "prompt": "p", "sandbox": "new", "mcp_servers": "{"}
    )
    assert bad.status_code == 400
    # The form shown again carries a token that works.
    retry = _form_fields(bad.content.decode())
    response = await client.post(reverse("new_session"), {**retry, "prompt": "p", "sandbox": "new"})
    assert response.status_code == 302


# -- the prompt's limit ----------------------------------------------------------------------------


def _start(client: Client, prompt: str) -> Any:
    return client.post(reverse("new_session"), {"prompt": prompt, "sandbox": "new"})


def test_it_says_what_the_prompt_limit_is_on_every_form(oc, alice):
    client = _signed_in(alice)
    too_long = "x" * (LIMIT + 1)
    response = _start(client, too_long)
    assert response.status_code == 400
    assert "200,000" in response.content.decode()
    assert not AgentSession.objects.exists()

    response = client.post(
        reverse("new_session"), {"prompt": "p", "sandbox": "new", "system_prompt": too_long}
    )
    assert response.status_code == 400
    assert "200,000" in response.content.decode()

    response = _start(client, "short")
    session = AgentSession.objects.get(id=response.url.strip("/").split("/")[-1])
    prompt = client.post(
        reverse("session_prompt", args=[session.id]),
        {"text": too_long},
        headers={"HX-Request": "true"},
    )
    assert prompt.status_code == 400
    assert "200,000" in prompt.content.decode()
    assert "Write a prompt." not in prompt.content.decode()

    AgentSession.objects.filter(id=session.id).update(status=AgentSession.Status.EXITED)
    later = client.post(
        reverse("session_continue", args=[session.id]),
        {"prompt": too_long},
        headers={"HX-Request": "true"},
    )
    assert later.status_code == 400
    assert "200,000" in later.content.decode()
    assert AgentSession.objects.count() == 1


def test_it_still_takes_a_prompt_of_exactly_the_limit(oc, alice):
    response = _start(_signed_in(alice), "x" * LIMIT)
    assert response.status_code == 302
