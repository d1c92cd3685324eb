"""No secret reaches a browser (DESIGN §4, invariant 4), end to end.

Porthole runs against an embedded sandbox server started with a known, distinctive API
key. An operator drives whole sessions through every action, including actions that fail
upstream (a killed sandbox) where a careless implementation would echo its request; the
bridge records everything; then every page, fragment, download and WebSocket message a
person can receive is searched for the key in every form it could be written in.
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import AsyncClient
from django.urls import reverse
from django.utils import timezone

from dashboard.agents.bridge import Bridge
from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.opencomputer import OpenComputer
from tests.agents.helpers import opened, wait_for
from tests.conftest import LocalSandbox, start_localsandbox, stop_localsandbox

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

# Two long alphanumeric runs around characters that URL-quoting, HTML-escaping and JSON all
# rewrite: whichever way a careless page wrote the key, one of the runs survives verbatim.
HEAD, TAIL = "PHK3Ysecret0x5f1e7A", "Zq8WvN2mR4tLkey"
KEY = f"{HEAD}/b+c=d&e%f~{TAIL}"
OWNER = "secrets-test-worker"
HX = {"HX-Request": "true"}
SHARE_TOKEN = re.compile(r"/share/([A-Za-z0-9_-]{20,})/")


def key_forms(key: str) -> list[str]:
    """The key as a page, a URL, a JSON document or a Basic auth header could carry it."""
    forms = {
        key,
        quote(key, safe=""),
        quote(key),
        quote_plus(key),
        html.escape(key),
        json.dumps(key)[1:-1],
        base64.b64encode(key.encode()).decode(),
    }
    if key == KEY:
        forms |= {HEAD, TAIL}  # also catches a truncated "PHK3Ysecret0x5f1e7A…"
    return sorted(forms)


class Leak(AssertionError):
    """A secret was found in something a person received."""


class Haystack:
    """Everything a person received, labelled by where it came from."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, label: str, text: str) -> None:
        self.items.append((label, text))

    def leaks(self, secrets: list[str]) -> list[str]:
        found = []
        for label, text in self.items:
            for secret in secrets:
                for form in key_forms(secret):
                    if form in text:
                        found.append(f"{form!r} in {label}: …{_around(text, form)}…")
        return found

    def assert_clean(self, secrets: list[str]) -> None:
        found = self.leaks(secrets)
        if found:
            raise Leak(f"{len(found)} leaks:\n" + "\n".join(found[:20]))


def _around(text: str, needle: str, width: int = 120) -> str:
    at = text.index(needle)
    return text[max(0, at - width) : at + len(needle) + width]


# -- the dedicated server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSandbox]:
    server = start_localsandbox(tmp_path_factory.mktemp("keyed-sandbox"), api_key=KEY)
    yield server
    stop_localsandbox(server)


@pytest.fixture
def keyed(keyed_server: LocalSandbox, settings: Any) -> LocalSandbox:
    """Porthole configured against the server that holds KEY."""
    settings.OPENCOMPUTER_API_URL = keyed_server.api_url
    settings.OPENCOMPUTER_API_KEY = keyed_server.api_key
    assert keyed_server.api_key == KEY
    return keyed_server


# -- helpers ------------------------------------------------------------------------------------


@database_sync_to_async
def _reload(session: AgentSession) -> AgentSession:
    return AgentSession.objects.select_related("sandbox").get(id=session.id)


@database_sync_to_async
def _count(session: AgentSession, **filters: object) -> int:
    return Event.objects.filter(session=session, **filters).count()


@database_sync_to_async
def _seqs(session: AgentSession) -> list[int]:
    return list(Event.objects.filter(session=session).order_by("seq").values_list("seq", flat=True))


@database_sync_to_async
def _take_lease(session: AgentSession) -> None:
    AgentSession.objects.filter(id=session.id).update(
        bridge_owner=OWNER, bridge_lease_until=timezone.now() + timedelta(seconds=60)
    )


async def bridge(session: AgentSession) -> asyncio.Task[None]:
    await _take_lease(session)
    return asyncio.create_task(Bridge(str(session.id), OWNER).run())


async def signed_in(user: User) -> AsyncClient:
    client = AsyncClient()
    await client.aforce_login(user)
    return client


socket = opened


async def received_until(
    communicator: WebsocketCommunicator, into: list[str], marker: str, timeout: float = 20.0
) -> None:
    """Collect what the socket sends until `marker` has arrived."""

    async def collect() -> None:
        while marker not in "".join(into):
            into.append(await communicator.receive_from(timeout=timeout))

    await asyncio.wait_for(collect(), timeout)


async def drained(communicator: WebsocketCommunicator, into: list[str]) -> None:
    """Everything the socket has sent and nobody read yet."""
    while not await communicator.receive_nothing(timeout=0.2):
        into.append(await communicator.receive_from(timeout=5))


async def body(response: Any) -> str:
    if getattr(response, "streaming", False):
        content = response.streaming_content
        if hasattr(content, "__aiter__"):  # an async streaming response (the exports)
            return b"".join([bytes(chunk) async for chunk in content]).decode()
        chunks = await sync_to_async(lambda: b"".join(content))()
        return chunks.decode()
    return response.content.decode()


class Walker:
    """Fetches as a person would and keeps what came back, checking each response is real."""

    def __init__(self, haystack: Haystack) -> None:
        self.haystack = haystack

    async def get(
        self,
        client: AsyncClient,
        url: str,
        *,
        expect: str = "",
        status: int = 200,
        min_size: int = 200,
        **kwargs: Any,
    ) -> str:
        response = await client.get(url, **kwargs)
        return await self._keep(
            f"GET {url} {kwargs.get('data', '')}", response, expect, status, min_size
        )

    async def post(
        self,
        client: AsyncClient,
        url: str,
        data: dict[str, Any] | None = None,
        *,
        expect: str = "",
        status: int = 200,
        min_size: int = 20,  # steering replies are one feedback line; `expect` checks it
        **kwargs: Any,
    ) -> str:
        response = await client.post(url, data or {}, **kwargs)
        return await self._keep(f"POST {url}", response, expect, status, min_size)

    async def _keep(
        self, label: str, response: Any, expect: str, status: int, min_size: int
    ) -> str:
        text = await body(response)
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        cookies = "\n".join(f"{k}={v.value}" for k, v in response.cookies.items())
        self.haystack.add(label, f"{headers}\n{cookies}\n\n{text}")
        assert response.status_code == status, f"{label}: {response.status_code}\n{text[:3000]}"
        assert len(text) >= min_size, f"{label}: only {len(text)} characters"
        assert expect in text, f"{label}: {expect!r} not in\n{text[:3000]}"
        return text


def session_from(response_url: str) -> AgentSession:
    return AgentSession.objects.select_related("sandbox").get(
        id=response_url.strip("/").split("/")[-1]
    )


async def start(client: AsyncClient, prompt: str, **fields: str) -> AgentSession:
    response = await client.post(
        reverse("new_session"), {"prompt": prompt, "sandbox": "new", **fields}
    )
    assert response.status_code == 302, (await body(response))[:3000]
    return await database_sync_to_async(session_from)(response.url)


@database_sync_to_async
def _all_events(*sessions: AgentSession) -> list[tuple[AgentSession, int]]:
    return [
        (s, seq) for s in sessions for seq in s.events.order_by("seq").values_list("seq", flat=True)
    ]


@database_sync_to_async
def _superuser() -> User:
    return User.objects.create_superuser("root", "root@example.org", "password")


@database_sync_to_async
def _admin_objects() -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    rows += [("sandbox", pk) for pk in Sandbox.objects.values_list("pk", flat=True)]
    rows += [("agentsession", pk) for pk in AgentSession.objects.values_list("pk", flat=True)]
    rows += [("event", pk) for pk in Event.objects.values_list("pk", flat=True)]
    return rows


@pytest.fixture
async def oc_client(keyed: LocalSandbox) -> AsyncIterator[OpenComputer]:
    """Our own client on the keyed server, for doing things behind Porthole's back."""
    client = OpenComputer(keyed.api_url, keyed.api_key)
    yield client
    await client.aclose()


# -- the walk -----------------------------------------------------------------------------------

SCRIPT = "\n".join(
    [
        "Looking around the **workspace** for `config` files.",
        "$ echo tool-output-marker && pwd",
        "$ env",
        "$ ls /definitely-missing-directory",
        "fail a deliberate failure to end this turn",
    ]
)


async def test_it_shows_the_api_key_in_no_page_fragment_export_or_socket(
    keyed, oc_client, settings, alice, bob, dave, caplog
):
    caplog.set_level(logging.INFO)
    haystack = Haystack()
    walk = Walker(haystack)
    client = await signed_in(alice)
    sandbox_tokens: list[str] = []
    listing = await socket("/ws/sessions/", alice)

    # -- session A: tools, a failure, a follow-up, interrupt, configure, share, kill ----------
    a = await start(client, SCRIPT, model="demo-model", allowed_tools="Bash, Read")
    await listing.send_json_to({"rows": [str(a.id)]})  # the rows its page shows
    sandbox_tokens.append((await oc_client.get_sandbox(a.sandbox.upstream_id)).token or "")
    viewer = await socket(f"/ws/sessions/{a.id}/", alice)
    await viewer.send_json_to({"last_seq": 0})
    a_bridge = await bridge(a)

    async def turns_done(n: int) -> bool:
        return await _count(a, source="agent", type="turn_complete") >= n

    await wait_for(lambda: turns_done(1))
    assert await _count(a, source="agent", type="result", subtype="error_during_execution") == 1
    session_url = a.get_absolute_url()
    await walk.get(client, session_url, expect="tool-output-marker")

    await walk.post(
        client,
        reverse("session_prompt", args=[a.id]),
        {"text": "Second turn\n$ echo second-turn-marker\nsleep 20"},
        headers=HX,
        expect="Prompt sent.",
    )

    async def sleeping() -> bool:
        fresh = await _reload(a)
        return (
            fresh.status == AgentSession.Status.WORKING
            and await _count(a, source="agent", raw__contains="second-turn-marker", type="user")
            >= 1
        )

    await wait_for(sleeping)
    await walk.post(
        client, reverse("session_interrupt", args=[a.id]), headers=HX, expect="Interrupt sent."
    )
    await wait_for(lambda: _count(a, source="agent", type="interrupted"))
    await walk.post(
        client,
        reverse("session_configure", args=[a.id]),
        {"model": "configured-model", "max_turns": "3", "allowed_tools": "Bash"},
        headers=HX,
        expect="Configuration sent.",
    )
    await wait_for(lambda: _count(a, source="agent", type="configured"))

    shared = await walk.post(
        client,
        reverse("share_create", args=[a.id]),
        {"label": "for review", "expiry": "1d"},
        headers=HX,
        expect="shown only once",
    )
    token = SHARE_TOKEN.search(shared).group(1)  # type: ignore[union-attr]
    await walk.post(
        client,
        reverse("share_create", args=[a.id]),
        {"label": "to revoke", "expiry": "1h"},
        headers=HX,
        expect="shown only once",
    )
    revoked = await database_sync_to_async(lambda: a.share_links.get(label="to revoke").pk)()
    await walk.post(
        client, reverse("share_revoke", args=[revoked]), headers=HX, expect="for review"
    )
    sharer = await socket(f"/ws/share/{token}/")
    await sharer.send_json_to({"last_seq": 0})

    await walk.post(client, reverse("session_kill", args=[a.id]), headers=HX, expect="Kill sent.")
    await asyncio.wait_for(a_bridge, 30)
    assert (await _reload(a)).status == AgentSession.Status.KILLED

    # -- session B: its sandbox dies behind Porthole's back; every action then fails upstream --
    b = await start(client, "sleep 30")
    b_sandbox = b.sandbox.upstream_id
    sandbox_tokens.append((await oc_client.get_sandbox(b_sandbox)).token or "")
    await oc_client.kill_sandbox(b_sandbox)
    await walk.post(
        client,
        reverse("session_prompt", args=[b.id]),
        {"text": "anyone there?"},
        headers=HX,
        status=502,
        expect="Not sent:",
    )
    await walk.post(
        client,
        reverse("session_interrupt", args=[b.id]),
        headers=HX,
        status=502,
        expect="Interrupt failed:",
    )
    await walk.post(
        client, reverse("session_kill", args=[b.id]), headers=HX, status=502, expect="Kill failed:"
    )
    await walk.post(
        client,
        reverse("new_session"),
        {"prompt": "into the dead sandbox", "sandbox": str(b.sandbox.pk)},
        status=400,
        expect="The sandbox server refused",
    )
    await walk.post(
        client,
        reverse("sandbox_attach", args=[b_sandbox, "no-such-agent"]),
        follow=True,
        expect="Cannot attach:",
    )
    await walk.post(
        client,
        reverse("session_continue", args=[b.id]),
        {"prompt": "carry on"},
        headers=HX,
        status=502,
        expect="Could not continue:",
    )
    await asyncio.wait_for(await bridge(b), 30)
    assert (await _reload(b)).status == AgentSession.Status.LOST
    await walk.post(
        client,
        reverse("sandbox_kill", args=[b_sandbox]),
        {"confirm": b_sandbox, "next": b.get_absolute_url()},
        follow=True,
        expect="Kill failed:",
    )

    # -- session C: A continued in a new session, then A's sandbox killed from Porthole --------
    response = await client.post(
        reverse("session_continue", args=[a.id]),
        {"prompt": "$ echo continued-marker\nexit 0"},
        headers=HX,
    )
    assert response.status_code == 200 and response["HX-Redirect"]
    haystack.add("POST continue (HX)", "\n".join(f"{k}: {v}" for k, v in response.items()))
    c = await database_sync_to_async(session_from)(response["HX-Redirect"])
    await listing.send_json_to({"rows": [str(a.id), str(c.id)]})  # the page now shows c too
    await asyncio.wait_for(await bridge(c), 30)
    assert (await _reload(c)).status == AgentSession.Status.EXITED
    await walk.post(
        client,
        reverse("sandbox_kill", args=[a.sandbox.upstream_id]),
        {"confirm": a.sandbox.upstream_id, "next": session_url},
        follow=True,
        expect="killed.",
    )

    # -- every page of every session ------------------------------------------------------------
    sessions = [await _reload(s) for s in (a, b, c)]
    for filters in (
        {},
        {"status": "running"},
        {"status": "attention"},
        {"status": "finished"},
        {"starter": "alice"},
        {"q": "workspace"},
        {"page": "1"},
    ):
        await walk.get(client, reverse("index"), data=filters, expect="Sessions")
        await walk.get(
            client, reverse("index"), data=filters, headers=HX, expect='id="results"', min_size=100
        )
    await walk.get(client, reverse("new_session"), expect='name="prompt"')
    await walk.get(
        client, reverse("new_session"), data={"sandbox": a.sandbox.pk}, expect='name="envs"'
    )
    viewer_client = await signed_in(bob)
    for session in sessions:
        await walk.get(client, session.get_absolute_url(), expect=str(session.title))
        await walk.get(viewer_client, session.get_absolute_url(), expect="watching read-only")
        await walk.get(
            client,
            reverse("older_events", args=[session.id]),
            data={"before": session.next_seq},
            expect='id="event-1"',
        )
        await walk.get(client, reverse("export_jsonl", args=[session.id]), expect='"seq"')
        await walk.get(
            client, reverse("export_markdown", args=[session.id]), expect=str(session.title)
        )
    for session, seq in await _all_events(*sessions):
        await walk.get(client, reverse("event_raw", args=[session.id, seq]), min_size=5)
    await walk.get(client, reverse("sandboxes"), expect="Sandboxes")

    # -- the share link, as a stranger sees it --------------------------------------------------
    stranger = AsyncClient()
    await walk.get(stranger, reverse("share", args=[token]), expect="Shared read-only view")
    await walk.get(
        stranger,
        reverse("share_older", args=[token]),
        data={"before": sessions[0].next_seq},
        expect='id="event-1"',
    )
    for seq in await _seqs(a):
        await walk.get(stranger, reverse("event_raw", args=[a.id, seq]), min_size=5)

    # -- accounts, administration, health -------------------------------------------------------
    await walk.get(await signed_in(dave), reverse("people"), expect="alice")
    anonymous = AsyncClient()
    await walk.get(anonymous, reverse("login"), expect='name="password"')
    await walk.post(
        anonymous,
        reverse("login"),
        {"username": "alice", "password": "wrong"},
        expect='name="password"',
    )
    await walk.get(anonymous, reverse("healthz"), expect="ok", min_size=2)
    await walk.get(anonymous, reverse("setup"), status=404, min_size=0)
    admin = await signed_in(await _superuser())
    await walk.get(admin, "/admin/", expect="Site administration")
    for model in ("sandbox", "agentsession", "event"):
        await walk.get(admin, f"/admin/agents/{model}/", expect="Select")
    for model, pk in await _admin_objects():
        await walk.get(admin, f"/admin/agents/{model}/{pk}/change/", expect="Change")

    # -- everything the sockets sent ------------------------------------------------------------
    last = (await _seqs(a))[-1]
    live: list[str] = []
    await received_until(viewer, live, f'id="event-{last}"')
    await drained(viewer, live)
    via_link: list[str] = []
    await received_until(sharer, via_link, f'id="event-{last}"')
    await drained(sharer, via_link)
    rows: list[str] = []
    await drained(listing, rows)
    assert "tool-output-marker" in "".join(live) and "configured-model" in "".join(via_link)
    assert f'id="row-{c.id}"' in "".join(rows)
    for label, messages in (
        ("session socket", live),
        ("share socket", via_link),
        ("list socket", rows),
    ):
        for n, message in enumerate(messages):
            haystack.add(f"{label} message {n}", message)
    for communicator in (viewer, sharer, listing):
        await communicator.disconnect()

    # The walk saw the places a careless implementation would have echoed a request.
    labels = " ".join(label for label, _ in haystack.items)
    assert len(haystack.items) > 100, labels
    assert all(sandbox_tokens), "the server gave no sandbox tokens to look for"
    haystack.assert_clean([KEY, *sandbox_tokens])
    logged = Haystack()
    for record in caplog.records:
        logged.add(f"log {record.name} {record.levelname}", record.getMessage())
    logged.assert_clean([KEY])

    # -- a gateway-style API URL that carries the key: the server's 404 then echoes it ----------
    gateway = Walker(Haystack())
    root = keyed.api_url.removesuffix("/api")
    settings.OPENCOMPUTER_API_URL = f"{root}/gateway/{quote(KEY, safe='')}/api"
    await gateway.get(
        client, reverse("sandboxes"), expect="Cannot list sandboxes: no such endpoint"
    )
    await gateway.post(
        client,
        reverse("new_session"),
        {"prompt": "through the gateway", "sandbox": "new"},
        status=400,
        expect="The sandbox server refused: no such endpoint",
    )
    await gateway.post(
        client,
        reverse("sandbox_attach", args=[a.sandbox.upstream_id, "agent"]),
        follow=True,
        expect="Cannot attach: no such endpoint",
    )
    gateway.haystack.assert_clean([KEY])


# -- other secrets --------------------------------------------------------------------------------

MCP_SECRET = "ghp_MCPenvSECRET0x5f1e7AZq8Wv"


async def walk_session_as_viewer_and_stranger(
    walk: Walker, operator: AsyncClient, viewer: AsyncClient, session: AgentSession
) -> None:
    shared = await walk.post(
        operator,
        reverse("share_create", args=[session.id]),
        {"label": "look", "expiry": "1h"},
        headers=HX,
        expect="shown only once",
    )
    token = SHARE_TOKEN.search(shared).group(1)  # type: ignore[union-attr]
    stranger = AsyncClient()
    await walk.get(stranger, reverse("share", args=[token]), expect="Shared read-only view")
    for seq in await _seqs(session):
        await walk.get(stranger, reverse("event_raw", args=[session.id, seq]), min_size=5)
        await walk.get(viewer, reverse("event_raw", args=[session.id, seq]), min_size=5)
    await walk.get(viewer, session.get_absolute_url(), expect="watching read-only")
    await walk.get(viewer, reverse("export_jsonl", args=[session.id]), expect='"seq"')
    await walk.get(viewer, reverse("export_markdown", args=[session.id]), expect="sent a prompt")


async def test_it_keeps_mcp_server_env_values_from_viewers_and_share_links(keyed, alice, bob):
    client = await signed_in(alice)
    servers = {"github": {"command": "github-mcp", "env": {"GITHUB_TOKEN": MCP_SECRET}}}
    session = await start(client, "hello\nexit 0", mcp_servers=json.dumps(servers))
    await asyncio.wait_for(await bridge(session), 30)
    # The agent itself knows to mask them in what it prints.
    assert await _count(session, source="agent", type="configured") == 1
    walk = Walker(Haystack())
    await walk_session_as_viewer_and_stranger(walk, client, await signed_in(bob), session)
    walk.haystack.assert_clean([MCP_SECRET])


async def test_it_keeps_the_key_out_of_what_an_agent_of_the_embedded_server_prints(
    keyed, alice, bob
):
    client = await signed_in(alice)
    # What `ps -eo args` and `ps e` show: command lines and environments of every process.
    listing = "$ cat /proc/[0-9]*/cmdline /proc/[0-9]*/environ | tr '\\0' ' '"
    session = await start(client, f"Which processes run here?\n{listing}\nexit 0")
    await asyncio.wait_for(await bridge(session), 30)
    # The listing worked: it shows command lines (inside the jail, its own processes'; the
    # embedded server's too when it runs without one).
    assert await _count(session, type="user", raw__contains="dashboard/localsandbox") == 1
    walk = Walker(Haystack())
    await walk_session_as_viewer_and_stranger(walk, client, await signed_in(bob), session)
    walk.haystack.assert_clean([KEY])


# -- masking what a sandbox prints, in every form (masking.py) ---------------------------------


def _escaped(text: str, every: int = 1) -> str:
    """The text with every `every`-th character written as a JSON \\u escape."""
    return "".join(
        f"\\u{ord(c):04x}" if i % every == 0 else json.dumps(c)[1:-1] for i, c in enumerate(text)
    )


def _b64_at(shift: int, key: str = KEY) -> str:
    return base64.b64encode(b"x" * shift + key.encode() + b"tail").decode()


@pytest.mark.parametrize(
    "line",
    [
        f'{{"type":"assistant","text":"{_escaped(KEY)}"}}',
        f'{{"type":"assistant","text":"a {_escaped(KEY, 3)} b"}}',
        f'{{"type":"user","content":[{{"{_escaped(KEY, 2)}":1}}]}}',
        '{"type":"x","nested":' + json.dumps(json.dumps({"k": KEY})) + "}",
        f'{{"type":"x","b64":"{_b64_at(0)}"}}',
        f'{{"type":"x","b64":"{_b64_at(1)}"}}',
        f'{{"type":"x","b64":"{_b64_at(2)}"}}',
        f'{{"type":"x","b64url":"{base64.urlsafe_b64encode(KEY.encode()).decode()}"}}',
        f'{{"type":"x","hex":"{KEY.encode().hex()}","HEX":"{KEY.encode().hex().upper()}"}}',
        f'{{"type":"x","url":"{quote(KEY, safe="")}","plus":"{quote_plus(KEY)}"}}',
        f'{{"type":"x","lower":"{quote(KEY, safe="").lower()}"}}',
        f"not json: {KEY} and {_b64_at(1)} and {quote(KEY)}",
        "not json either: " + _escaped(KEY),
    ],
)
def test_it_masks_every_form_of_a_secret_in_what_is_stored(line: str, settings: Any) -> None:
    from dashboard.agents.masking import mask_line
    from dashboard.opencomputer import parse_line

    settings.OPENCOMPUTER_API_KEY = KEY
    parsed = parse_line(line)
    raw, data = mask_line(parsed.text, parsed.data)
    shown = raw + (json.dumps(data, ensure_ascii=False) if data is not None else "")
    decoded = json.loads(raw) if data is not None else None
    for text in (shown, json.dumps(decoded, ensure_ascii=False)):
        for form in key_forms(KEY):
            assert form not in text
        assert HEAD not in text and TAIL not in text
    assert "[redacted]" in raw


def test_it_masks_the_anthropic_key_handed_to_agents(settings: Any, monkeypatch) -> None:
    from dashboard.agents.masking import mask_line

    anthropic = "sk-ant-api03-" + "Q" * 20 + "wxyz"
    monkeypatch.setenv("ANTHROPIC_API_KEY", anthropic)
    settings.OPENCOMPUTER_API_KEY = KEY
    raw, data = mask_line(
        f'{{"type":"user","content":"ANTHROPIC_API_KEY={_escaped(anthropic, 2)}"}}',
        {"type": "user", "content": f"ANTHROPIC_API_KEY={anthropic}"},
    )
    assert anthropic not in raw and data is not None and anthropic not in data["content"]


def test_it_leaves_lines_without_secrets_untouched(settings: Any) -> None:
    from dashboard.agents.masking import mask_line

    settings.OPENCOMPUTER_API_KEY = KEY
    raw = '{"type":"assistant","text":"caf\\u00e9 \\n fine"}'
    data = json.loads(raw)
    assert mask_line(raw, data) == (raw, data)


async def test_it_keeps_encoded_keys_an_agent_prints_out_of_every_page(keyed, alice, bob):
    """Issue 7: a line carrying the key as \\u escapes showed it in clear on pages, sockets,
    exports and share pages; so did base64, hex and URL-quoted forms."""
    client = await signed_in(alice)
    rogue = json.dumps(
        {"type": "assistant", "message": {"content": [{"type": "text", "text": "K"}]}}
    ).replace('"K"', f'"{_escaped(KEY, 2)}"')
    # The key is put together inside the sandbox: the prompt itself never holds it.
    pieces = "'" + "''".join([KEY[:6], KEY[6:36], KEY[36:]]) + "'"
    script = "\n".join(
        [
            "Encodings of the key:",
            f"$ printf '%s\\n' '{rogue}' > /proc/$PPID/fd/1",
            f"$ printf '%s' {pieces} | base64",
            f"$ printf '%s' xy{pieces} | base64 -w0",
            f"$ printf '%s' {pieces} | od -An -tx1 | tr -d ' \\n'",
            "exit 0",
        ]
    )
    session = await start(client, script)
    await asyncio.wait_for(await bridge(session), 30)
    assert await _count(session, raw__contains="[redacted]") >= 3
    stored = await database_sync_to_async(
        lambda: list(Event.objects.filter(session=session).values_list("raw", flat=True))
    )()
    record = Haystack()
    for raw in stored:
        record.add("stored", raw)
        if raw.startswith("{"):
            record.add("stored, decoded", json.dumps(json.loads(raw), ensure_ascii=False))
    record.assert_clean([KEY])
    walk = Walker(Haystack())
    await walk_session_as_viewer_and_stranger(walk, client, await signed_in(bob), session)
    walk.haystack.assert_clean([KEY])
