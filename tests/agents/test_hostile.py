"""Hostile content end to end: XSS payloads through the real pipeline (DESIGN §4, invariant 3).

A demo agent on the embedded sandbox server prints filter-evasion payloads (after the OWASP
XSS cheat sheet) as assistant text, tool inputs, tool outputs and an error result; the
operator's own prompts carry them too; stderr, unknown event types and malformed lines are
recorded directly. A bridge records the session while a viewer watches it live; then the
session page, the share page, the "load older" fragment, the session list and the
fragments both sockets received are parsed and must hold no active content from the sandbox.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import shlex
from datetime import timedelta
from html.parser import HTMLParser
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import AsyncClient
from django.urls import reverse
from django.utils import timezone

from dashboard.agents.bridge import Bridge
from dashboard.agents.models import AgentSession, Event
from dashboard.agents.recording import NewEvent, publish, record
from dashboard.opencomputer import OpenComputer
from tests.agents.helpers import opened, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(90)]

OWNER = "hostile-test-worker"
HX = {"HX-Request": "true"}

# -- the checker ---------------------------------------------------------------------------------

BAD_SCHEMES = ("javascript:", "data:", "vbscript:")
URL_ATTRIBUTES = {
    "href",
    "src",
    "action",
    "formaction",
    "xlink:href",
    "data",
    "poster",
    "background",
    "srcset",
    "ping",
    "cite",
    "codebase",
    "dynsrc",
    "lowsrc",
    "longdesc",
    "usemap",
    "manifest",
    "icon",
    "archive",
    "classid",
}
FORBIDDEN_TAGS = {
    "iframe",
    "frame",
    "frameset",
    "svg",
    "math",
    "object",
    "embed",
    "applet",
    "style",
    "base",
    "portal",
    "xmp",
    "listing",
    "plaintext",
}
# Elements that let content act on the page or post somewhere, never inside an event.
FORM_TAGS = {"form", "input", "button", "textarea", "select", "option", "label"}
HTMX_PREFIXES = ("hx-", "data-hx-", "ws-", "data-ws-")
OUR_IDS = re.compile(
    r"(event-\d+|fold-\d+(-body|-count)?"
    r"|(toolstatus|toolduration|toolcall|toolresult|toolchildren)-[A-Za-z0-9_-]+)"
)
CONTROL = re.compile(r"[\x00-\x20\x7f]+")


def normalised_url(value: str) -> str:
    """What a browser would make of an URL attribute: entities decoded (twice, to be safe
    against double encoding), control characters and whitespace dropped, lowercased."""
    return CONTROL.sub("", html.unescape(html.unescape(value))).lower()


class Parsed(HTMLParser):
    """Every element with its attributes (entities decoded), whether it sits inside an
    event (`<article>`), and the text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str], bool]] = []
        self.text: list[str] = []
        self.depth_in_event = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, self.depth_in_event > 0))
        if tag == "article":
            self.depth_in_event += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, self.depth_in_event > 0))

    def handle_endtag(self, tag: str) -> None:
        if tag == "article" and self.depth_in_event:
            self.depth_in_event -= 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def assert_no_active_content(document: str, *, nonce: str | None = None) -> str:
    """Parse `document` (a page or a fragment); fail on anything that could run or navigate.

    Porthole's own scripts (src under /static/, carrying the page's CSP nonce) and its own
    stylesheets and icon are the only exceptions. Returns the document's text content.
    """
    parsed = Parsed()
    parsed.feed(document)
    parsed.close()
    problems = []
    for tag, attrs, in_event in parsed.elements:
        where = f"<{tag} {attrs}>"
        if tag == "script":
            ours = attrs.get("src", "").startswith("/static/") and attrs.get("nonce")
            if not ours or (nonce is not None and attrs["nonce"] != nonce):
                problems.append(f"script {where}")
        if tag in FORBIDDEN_TAGS:
            problems.append(f"forbidden element {where}")
        if tag in ("img", "link") and not (attrs.get("src") or attrs.get("href", "")).startswith(
            "/static/"
        ):
            problems.append(f"foreign resource {where}")
        if tag == "meta" and ("http-equiv" in attrs or "url=" in attrs.get("content", "").lower()):
            problems.append(f"meta refresh {where}")
        if tag == "form" and not re.match(r"/(?!/)", attrs.get("action", "")):
            problems.append(f"form posting elsewhere {where}")
        for name, value in attrs.items():
            if name.startswith("on"):
                problems.append(f"event handler {name} on {where}")
            if name in ("style", "srcdoc"):
                problems.append(f"{name} attribute on {where}")
            if name in URL_ATTRIBUTES and normalised_url(value).startswith(BAD_SCHEMES):
                problems.append(f"{name} with a script or data URL on {where}")
            if in_event and name.startswith(HTMX_PREFIXES):
                problems.append(f"htmx attribute {name} inside an event: {where}")
            if in_event and name == "id" and not OUR_IDS.fullmatch(value):
                problems.append(f"content-chosen id inside an event: {where}")
        if in_event and tag in FORM_TAGS:
            problems.append(f"form element inside an event: {where}")
        if in_event and tag == "a" and re.match(r"[a-z]+:", normalised_url(attrs.get("href", ""))):
            rel = set(attrs.get("rel", "").split())
            if not {"noopener", "noreferrer", "nofollow"} <= rel:
                problems.append(f"outside link without rel=noopener noreferrer nofollow: {where}")
    assert not problems, "\n".join(problems[:30])
    return "".join(parsed.text)


# -- the payloads --------------------------------------------------------------------------------

# Each carries a marker XSSnn: it must be visible as text once the page is rendered, so the
# test cannot pass by the payload having been lost on the way.
PAYLOADS = [
    "<script>alert('XSS01')</script>",
    "<img src=x onerror=alert('XSS02')>",
    "<svg onload=alert('XSS03')>",
    "<svg><script>alert('XSS04')</script></svg>",
    "<a href=\"javascript:alert('XSS05')\">click</a>",
    "<a href=\"JaVaScRiPt:alert('XSS06')\">click</a>",
    "<a href=\"&#x6A;&#x61;&#x76;&#x61;&#x73;&#x63;&#x72;&#x69;&#x70;&#x74;:alert('XSS07')\">e</a>",
    "<a href=\"jav&#x09;ascript:alert('XSS08')\">tab</a>",
    "[md link](javascript:alert('XSS09'))",
    "[md link](JaVaScRiPt:alert('XSS10'))",
    "[md link](&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert('XSS11'))",
    "[md link](jav\tascript:alert('XSS12'))",
    "![md image](javascript:alert('XSS13'))",
    "![md image](x\" onerror=\"alert('XSS14'))",
    "[data link](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==) XSS15",
    "<a href='data:text/html,<script>alert(\"XSS16\")</script>'>data</a>",
    "[vb](vbscript:msgbox('XSS17'))",
    "<iframe src=\"javascript:alert('XSS18')\"></iframe>",
    "<iframe srcdoc=\"<script>alert('XSS19')</script>\"></iframe>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert('XSS20')>",
    "<style>body{background:url(\"javascript:alert('XSS21')\")}</style>",
    "<scr<script>ipt>alert('XSS22')</scr</script>ipt>",
    "\"><script>alert('XSS23')</script>",
    "'><img src=x onerror=alert('XSS24')>",
    '" onmouseover="alert(\'XSS25\')" x="',
    "' onfocus='alert(\"XSS26\")' autofocus x='",
    "<<script>script>alert('XSS27')<</script>/script>",
    '<object data="javascript:alert(\'XSS28\')"></object><embed src="javascript:alert(1)">',
    '<form action="javascript:alert(\'XSS29\')"><button formaction="javascript:alert(1)">go',
    '<div hx-get="/evil" hx-trigger="load" hx-swap-oob="true" id="controls">XSS30</div>',
    '<meta http-equiv="refresh" content="0;url=javascript:alert(\'XSS31\')">',
    "<base href=\"javascript:alert('XSS32')//\">",
    "<!--<script>alert('XSS33')//-->",
    "<http://example.com/\"onmouseover=\"alert('XSS34')>",
    "<details open ontoggle=alert('XSS35')>",
    "</textarea></pre></article><script>alert('XSS36')</script>",
    "{{ 7*7 }} {% debug %} XSS37",
    "<body onload=alert('XSS38')>",
    "<a href=\"  &#14;  javascript:alert('XSS39')\">leading controls</a>",
]
MARKERS = [re.search(r"XSS\d\d", p).group(0) for p in PAYLOADS]  # type: ignore[union-attr]
TITLE = "\"><script>alert('XSS00')</script><img src=x onerror=alert(0)> title"


def first_prompt() -> str:
    """Assistant text (markdown), a printf per payload (tool input and output), then a failure."""
    lines = [TITLE, ""]
    for payload in PAYLOADS:
        lines += [payload, ""]
    lines += [f"$ printf '%s\\n' {shlex.quote(payload)}" for payload in PAYLOADS]
    lines.append("fail <img src=x onerror=alert('XSS90')> \"><script>alert('XSS91')</script>")
    return "\n".join(lines)


SANDBOX_TEMPLATE = "<img src=x onerror=alert('XSS60')>\"><script>alert(60)</script>"
FOLLOW_UP = "\n".join(
    [
        "<svg/onload=alert('XSS92')> follow-up from a person",
        "[again](javascript:alert('XSS93'))",
        "exit 0",
    ]
)


def direct_events() -> list[NewEvent]:
    """What the demo agent cannot print: stderr, unknown types, malformed lines, odd tools."""
    unknown = {
        "type": "<img src=x onerror=alert('XSS40')>",
        "subtype": "<svg onload=alert('XSS41')>",
        "html": "<script>alert('XSS42')</script>",
        "url": "javascript:alert('XSS43')",
    }
    future = {"type": "future_event", "message": "<iframe src=javascript:alert('XSS44')>"}
    system = {"type": "system", "subtype": "<script>alert('XSS45')</script>", "x": PAYLOADS[1]}
    tool = {
        "type": "assistant",
        "message": {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "\"><script>alert('XSS46')</script>",
                    "name": "<img src=x onerror=alert('XSS47')>",
                    "input": {"url": "javascript:alert('XSS48')", "html": PAYLOADS[0]},
                }
            ],
        },
        "parent_tool_use_id": None,
    }
    events = [
        NewEvent.from_line("stderr", "<script>alert('XSS50')</script> on stderr", None),
        NewEvent.from_line("stderr", "<img src=x onerror=alert('XSS51')>", None),
    ]
    for data in (unknown, future, system, tool):
        events.append(NewEvent.from_line("agent", json.dumps(data), data))
    events.append(NewEvent.from_line("agent", "<script>alert('XSS52')</script> {not json", None))
    events.append(
        NewEvent.from_line("agent", '{"type": "assistant", "message": <svg onload=XSS53>', None)
    )
    return events


# XSS46 is a tool id: never shown, only hashed into element ids.
DIRECT_MARKERS = [f"XSS{n}" for n in (40, 41, 42, 43, 44, 45, 47, 48, 52, 53)]
STDERR_MARKERS = ["XSS50", "XSS51"]
# The title (the prompt's first line), the error result, the person's follow-up prompt.
SCRIPTED_MARKERS = ["XSS00", *MARKERS, "XSS90", "XSS91", "XSS92", "XSS93"]
EVERY_MARKER = [*SCRIPTED_MARKERS, *DIRECT_MARKERS, *STDERR_MARKERS]

# -- helpers -------------------------------------------------------------------------------------


@database_sync_to_async
def _count(session: AgentSession, **filters: object) -> int:
    return Event.objects.filter(session=session, **filters).count()


@database_sync_to_async
def _reload(session: AgentSession) -> AgentSession:
    return AgentSession.objects.select_related("sandbox").get(id=session.id)


@database_sync_to_async
def _take_lease(session: AgentSession) -> None:
    AgentSession.objects.filter(id=session.id).update(
        bridge_owner=OWNER, bridge_lease_until=timezone.now() + timedelta(seconds=60)
    )


async def socket(path: str, user: User | None = None) -> WebsocketCommunicator:
    communicator = await opened(path, user)
    await communicator.send_json_to({"last_seq": 0})
    return communicator


async def received_until(communicator: WebsocketCommunicator, marker: str) -> list[str]:
    """What the socket sends until `marker` has arrived, each message on its own."""
    messages: list[str] = []

    async def collect() -> None:
        while marker not in "".join(messages):
            messages.append(await communicator.receive_from(timeout=20))

    await asyncio.wait_for(collect(), 20)
    return messages


def csp_nonce(response: Any) -> str:
    policy = response["Content-Security-Policy"]
    script_src = next(d for d in policy.split(";") if d.strip().startswith("script-src"))
    assert "unsafe-inline" not in script_src and "unsafe-eval" not in script_src, policy
    return re.search(r"'nonce-([^']+)'", script_src).group(1)  # type: ignore[union-attr]


def assert_visible(text: str, markers: list[str], where: str) -> None:
    missing = [m for m in markers if m not in text]
    assert not missing, f"{where}: the payloads {missing} did not arrive as text"


# -- the tests -----------------------------------------------------------------------------------


def caught(document: str) -> bool:
    try:
        assert_no_active_content(document)
    except AssertionError:
        return True
    return False


def test_it_has_a_checker_that_catches_each_payload_left_raw():
    """The checker itself: each payload written into a page unescaped, as element content or
    in a quoted attribute, is caught (markdown syntax and plain text are inert until a
    renderer turns them into markup)."""
    inert = {"XSS09", "XSS10", "XSS11", "XSS12", "XSS13", "XSS15", "XSS17", "XSS33", "XSS37"}
    inert.add("XSS22")  # aimed at a filter that strips "<script>" once; raw, a browser
    # reads the element "scr<script" and text
    for payload, marker in zip(PAYLOADS, MARKERS, strict=True):
        contexts = (
            f"<main><article id='event-1'>{payload}</article></main>",
            f'<main><article id="event-1"><span title="{payload}">x</span></article></main>',
            f"<main><article id='event-1'><span title='{payload}'>x</span></article></main>",
        )
        assert any(caught(page) for page in contexts) == (marker not in inert), payload
    ours = "<script src='/static/porthole/app.js' nonce='n1'></script><p>fine</p>"
    assert_no_active_content(ours, nonce="n1")
    with pytest.raises(AssertionError):
        assert_no_active_content(ours, nonce="n2")
    with pytest.raises(AssertionError):  # a markdown link a careless renderer made live
        assert_no_active_content("<article><p><a href='javascript:alert(1)'>x</a></p></article>")
    with pytest.raises(AssertionError):
        assert_no_active_content("<article><a href='https://evil.example'>x</a></article>")


async def test_it_renders_hostile_agent_output_inert_everywhere(oc, alice):
    client = AsyncClient()
    await client.aforce_login(alice)
    response = await client.post(
        reverse("new_session"), {"prompt": first_prompt(), "sandbox": "new"}
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    session = await database_sync_to_async(
        lambda: AgentSession.objects.get(id=response.url.strip("/").split("/")[-1])
    )()
    listing = await socket("/ws/sessions/", alice)
    await listing.send_json_to({"rows": [str(session.id)]})  # the rows its page shows
    viewer = await socket(f"/ws/sessions/{session.id}/", alice)

    await _take_lease(session)
    recording = asyncio.create_task(Bridge(str(session.id), OWNER).run())
    await wait_for(lambda: _count(session, source="agent", type="turn_complete"))
    assert await _count(session, type="result", subtype="error_during_execution") == 1
    followed = await client.post(
        reverse("session_prompt", args=[session.id]), {"text": FOLLOW_UP}, headers=HX
    )
    assert followed.status_code == 200
    assert_no_active_content(followed.content.decode())
    await asyncio.wait_for(recording, 30)
    assert (await _reload(session)).status == AgentSession.Status.EXITED

    _, messages = await database_sync_to_async(record)(session.id, direct_events())
    await publish(messages)
    session = await _reload(session)
    last = session.next_seq - 1
    assert await _count(session, type="user") >= len(PAYLOADS)  # every printf's output

    # (c) what a viewer received live, fragment by fragment
    live = await received_until(viewer, f'id="event-{last}"')
    visible = "".join(assert_no_active_content(message) for message in live)
    assert_visible(visible, EVERY_MARKER, "live")
    rows = []
    while not await listing.receive_nothing(timeout=0.2):
        rows.append(await listing.receive_from())
    assert rows
    for row in rows:
        assert_no_active_content(row)

    # (a) the session page, and the fragment that loads older events
    page = await client.get(session.get_absolute_url())
    assert page.status_code == 200
    text = assert_no_active_content(page.content.decode(), nonce=csp_nonce(page))
    assert_visible(text, EVERY_MARKER, "session page")
    older = await client.get(
        reverse("older_events", args=[session.id]), {"before": session.next_seq}
    )
    assert 'id="event-1"' in older.content.decode()
    older_text = assert_no_active_content(older.content.decode())
    assert_visible(older_text, [*SCRIPTED_MARKERS, *DIRECT_MARKERS], "older events")
    index = await client.get(reverse("index"))
    assert_visible(assert_no_active_content(index.content.decode()), ["XSS00"], "session list")

    # (b) the share page, for a stranger, and what its socket replays
    panel = await client.post(
        reverse("share_create", args=[session.id]), {"expiry": "1h"}, headers=HX
    )
    token = re.search(r"/share/([A-Za-z0-9_-]{20,})/", panel.content.decode()).group(1)  # type: ignore[union-attr]
    shared = await AsyncClient().get(reverse("share", args=[token]))
    assert shared.status_code == 200
    text = assert_no_active_content(shared.content.decode(), nonce=csp_nonce(shared))
    assert_visible(text, EVERY_MARKER, "share page")
    stranger = await socket(f"/ws/share/{token}/")
    replayed = await received_until(stranger, f'id="event-{last}"')
    visible = "".join(assert_no_active_content(message) for message in replayed)
    assert_visible(visible, EVERY_MARKER, "share socket")

    # (d) downloads are attachments the browser will not sniff into HTML
    downloads = [
        (reverse("export_markdown", args=[session.id]), "text/markdown"),
        (reverse("export_jsonl", args=[session.id]), "application/x-ndjson"),
        (reverse("event_raw", args=[session.id, last]), "text/plain"),
    ]
    for url, content_type in downloads:
        download = await client.get(url)
        assert download.status_code == 200, url
        assert download["Content-Type"].startswith(content_type), url
        assert download["Content-Disposition"].startswith("attachment;"), url
        assert download["X-Content-Type-Options"] == "nosniff", url

    for communicator in (viewer, listing, stranger):
        await communicator.disconnect()


async def test_it_renders_hostile_sandbox_details_inert(oc, alice):
    """What the server says about a sandbox made elsewhere (its template) is untrusted too."""
    client = AsyncClient()
    await client.aforce_login(alice)
    async with OpenComputer(oc.api_url, oc.api_key) as elsewhere:
        foreign = await elsewhere.create_sandbox(template=SANDBOX_TEMPLATE)
        agent = await elsewhere.start_agent(foreign.sandbox_id, prompt="waiting")
        try:
            listed = await client.get(reverse("sandboxes"))
            assert foreign.sandbox_id in listed.content.decode()
            text = assert_no_active_content(listed.content.decode(), nonce=csp_nonce(listed))
            assert_visible(text, ["XSS60"], "sandboxes page")
            attached = await client.post(
                reverse("sandbox_attach", args=[foreign.sandbox_id, agent.session_id])
            )
            assert attached.status_code == 302
            form = await client.get(reverse("new_session"))
            text = assert_no_active_content(form.content.decode(), nonce=csp_nonce(form))
            assert_visible(text, ["XSS60"], "start form")
        finally:
            await elsewhere.kill_sandbox(foreign.sandbox_id)
