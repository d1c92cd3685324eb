"""Reading a session in a real browser, under the production CSP: one card per tool call
with its result swapped in live, folded noise, the outline, follow-live, jumping to an
event from search, highlighted code. Screenshots (light and dark, wide and narrow) of a
recorded Claude Code session land in docs/screenshots/ with PORTHOLE_UPDATE_SCREENSHOTS=1.

Two sessions are shown: one produced here by the real Claude Code CLI (our wrapper and the
Agent SDK) against the scripted Messages API stand-in, and the longer recorded transcript
tests/fixtures/transcript.jsonl (subagents, server tools, noise); both are loaded into the
running server's database. The live tests drive the demo agent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ROOT, Browsing, Porthole, require_browser

require_browser()

from playwright.sync_api import Page, expect  # noqa: E402

from tests.e2e.test_browser import start_session  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# The committed screenshots change only when asked (PORTHOLE_UPDATE_SCREENSHOTS=1); every
# other run writes them beside the other browser-test artifacts.
SCREENSHOTS = (
    ROOT / "docs" / "screenshots"
    if os.environ.get("PORTHOLE_UPDATE_SCREENSHOTS")
    else ROOT / "test-artifacts" / "e2e" / "reading"
)
FIXTURE = ROOT / "tests" / "fixtures" / "transcript.jsonl"

LOADER = """
import json, sys, django
django.setup()
from django.contrib.auth.models import User
from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.search.index import reindex
# Gone: the recording outlived its sandbox (and no form offers it for a new session).
sandbox, _ = Sandbox.objects.get_or_create(upstream_id="sb-recorded", status="gone")
session = AgentSession.objects.create(
    sandbox=sandbox, upstream_id="agent-" + sys.argv[2][:20], title=sys.argv[2],
    status="exited", exit_code=0)
from datetime import timedelta
from django.utils import timezone
start = timezone.now() - timedelta(hours=1)
# The fixture keeps no times: a plausible pace (results take a moment after their calls).
for seq, line in enumerate(open(sys.argv[1]), start=1):
    record = json.loads(line)
    raw = record["raw"]
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    data = data if isinstance(data, dict) else {}
    actor = None
    if record.get("actor"):
        actor, _ = User.objects.get_or_create(username=record["actor"])
    kind = data.get("type") if isinstance(data.get("type"), str) else ""
    Event.objects.create(
        session=session, seq=seq, source=record["source"], raw=raw, actor=actor,
        created_at=start + timedelta(seconds=record.get("t", seq * 1.7 + (seq % 5) * 0.35)),
        type="stderr" if record["source"] == "stderr" else kind[:64],
        subtype=(data.get("subtype") or "")[:64] if isinstance(data.get("subtype"), str) else "")
session.next_seq = seq + 1
session.save()
reindex([session])
print(session.id)
"""


def load(porthole: Porthole, transcript: Path, title: str) -> str:
    """Store a transcript (JSON lines of {source, raw, actor?, t?}) as an exited session in
    the running server's database; its page's path."""
    env = dict(porthole.env, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", LOADER, str(transcript), title],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return f"/sessions/{done.stdout.strip().splitlines()[-1]}/"


@pytest.fixture(scope="module")
def recorded(porthole: Porthole) -> str:
    """The recorded Claude Code session, stored in the running server's database."""
    return load(porthole, FIXTURE, "Add signup validation")


FORMS = """from django import forms


class SignupForm(forms.Form):
    email = forms.EmailField()
    password = forms.CharField(widget=forms.PasswordInput)
"""


@pytest.fixture(scope="module")
def real_cli(porthole: Porthole, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A session produced by the real Claude Code CLI (through our wrapper and the Agent
    SDK) against the scripted Messages API stand-in: it really reads, edits, writes and
    runs in a throwaway workspace. Stored as an exited session; its page's path."""
    if importlib.util.find_spec("claude_agent_sdk") is None:
        pytest.skip("claude-agent-sdk is not installed (it carries the CLI)")
    from tests.fakes.messages_api import MessagesAPI, Text, ToolUse
    from tests.localsandbox.test_claude_wrapper import Wrapper

    base = tmp_path_factory.mktemp("real-cli")
    app = base / "workspace" / "app"
    app.mkdir(parents=True)
    (app / "forms.py").write_text(FORMS)
    (base / "home").mkdir()
    forms_py, test_py = str(app / "forms.py"), str(app / "test_forms.py")
    prompt = "Limit the signup email's length and add a test."
    with MessagesAPI() as api:
        api.script(
            ToolUse("Read", {"file_path": forms_py}, text="I'll read the form first."),
            ToolUse(
                "Edit",
                {
                    "file_path": forms_py,
                    "old_string": "    email = forms.EmailField()\n",
                    "new_string": "    email = forms.EmailField(max_length=254)  # RFC 5321\n",
                },
                text="The email field has no length limit. Adding one:",
            ),
            ToolUse(
                "Write",
                {
                    "file_path": test_py,
                    "content": "from forms import SignupForm\n\n\n"
                    "def test_it_rejects_long_emails():\n"
                    "    form = SignupForm({'email': 'a' * 250 + '@x.io', 'password': 'p'})\n"
                    "    assert not form.is_valid()\n",
                },
            ),
            ToolUse(
                "Bash",
                {"command": "grep -n EmailField forms.py && ls", "description": "Check the edit"},
            ),
            ToolUse("Read", {"file_path": str(app / "missing.py")}),
            Text(
                "Done. `SignupForm.email` now has `max_length=254`:\n\n"
                "```python\nemail = forms.EmailField(max_length=254)\n```\n\n"
                "and **test_forms.py** checks that longer addresses are rejected."
            ),
        )
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ANTHROPIC_", "CLAUDE")) and k != "PYTHONPATH"
        }
        env.update(
            HOME=str(base / "home"),
            ANTHROPIC_BASE_URL=api.base_url,
            ANTHROPIC_API_KEY="sk-ant-test-not-a-real-key",
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            **MessagesAPI.cli_env(),
        )
        wrapper = Wrapper(env, app)
        try:
            wrapper.read_until("ready", timeout=60)
            wrapper.send(type="configure", cwd=str(app))
            wrapper.read_until("configured", timeout=60)
            wrapper.turn(prompt)
        finally:
            wrapper.stop()
    prompt_raw = json.dumps({"type": "prompt", "text": prompt})
    records = [{"source": "dashboard", "actor": "alice", "t": 0.0, "raw": prompt_raw}]
    for offset, message in enumerate(wrapper.seen, start=1):
        records.append({"source": "agent", "t": offset * 1.3, "raw": json.dumps(message)})
    exit_raw = json.dumps({"type": "exit", "code": 0})
    records.append({"source": "bridge", "t": len(records) * 1.3, "raw": exit_raw})
    transcript = base / "transcript.jsonl"
    transcript.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load(porthole, transcript, "Real Claude CLI: limit the email length")


def shoot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path


@pytest.mark.browser_side
@pytest.mark.parametrize(
    ("scheme", "width"), [("light", 1280), ("dark", 1280), ("light", 420), ("dark", 420)]
)
def test_it_shows_a_recorded_claude_session_readably(
    open_context: Any, recorded: str, scheme: str, width: int
) -> None:
    browsing: Browsing = open_context(
        color_scheme=scheme, viewport={"width": width, "height": 1100}
    )
    page = browsing.new_page()
    # The Edit call is older than the first page: the page loads older events to reach it.
    page.goto(recorded + "#event-27")
    target = page.locator("#event-27.is-target")
    expect(target).to_be_visible()
    # Cards: one per call, each with its result inside; noise folded into one line.
    cards = page.locator("#timeline details.tool-card")
    expect(page.locator("#timeline details.fold").first).to_contain_text("system event")
    expect(page.locator("#outline-list li").first).to_be_attached()
    # The Edit card, opened: a highlighted unified diff with line numbers.
    edit = target.locator("details.tool-card").first
    expect(edit.locator(".tool-name")).to_have_text("Edit")
    edit.locator("summary").click()
    expect(edit.locator("table.diff tr.diff-add").first).to_be_visible()
    assert edit.locator("table.diff span[class]").count() > 0, "highlighted"
    assert cards.count() > 20
    page.locator("#event-23").scroll_into_view_if_needed()
    page.evaluate("window.scrollBy(0, -120)")
    suffix = "" if width > 600 else "-narrow"
    shoot(page, f"session-{scheme}{suffix}")
    # A Task card holds its subagent's work.
    task = page.locator("details.tool-card.is-task").first
    expect(task.locator(".tool-children > article").first).to_be_attached()
    if width > 600:
        task.scroll_into_view_if_needed()
        shoot(page, f"session-task-{scheme}")
    # The Changes panel: what the calls wrote, stale (and saying so) with the sandbox gone.
    page.locator("details.changes-panel > summary").click()
    changes = page.locator(".changes-body")
    expect(changes).to_contain_text("The sandbox is gone")
    expect(changes.locator(".changed-path").first).to_contain_text("/workspace/app/")


@pytest.mark.browser_side
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_it_shows_a_session_of_the_real_claude_cli(
    open_context: Any, real_cli: str, scheme: str
) -> None:
    browsing: Browsing = open_context(color_scheme=scheme, viewport={"width": 1280, "height": 1000})
    page = browsing.new_page()
    page.goto(real_cli)
    cards = page.locator("#timeline details.tool-card")
    expect(cards).to_have_count(5)
    names = cards.locator(".tool-name").all_inner_texts()
    assert names == ["Read", "Edit", "Write", "Bash", "Read"]
    expect(cards.nth(0).locator(".toolstatus")).to_have_text("done ✓")
    expect(cards.nth(4).locator(".toolstatus")).to_have_text("error ✗")
    for index in (1, 2, 3):
        cards.nth(index).locator("summary").click()
    expect(cards.nth(1).locator("table.diff tr.diff-add")).to_have_count(1)
    expect(cards.nth(1).locator("table.diff tr.diff-del")).to_have_count(1)
    expect(cards.nth(3).locator(".blk-result pre")).to_contain_text("max_length=254")
    expect(page.locator("#timeline .md pre span.mi").first).to_be_attached()  # 254
    expect(page.locator("#outline-list li.ol-result")).to_have_count(1)
    page.evaluate("window.scrollTo(0, 0)")
    page.locator("#timeline").scroll_into_view_if_needed()
    shoot(page, f"real-cli-{scheme}")


def test_it_swaps_a_live_result_into_its_call_card(browsing: Browsing) -> None:
    page = browsing.new_page()
    start_session(page, "Checking.\n$ echo card-live\nsleep 2\n$ echo second-call\nAll done")
    card = page.locator("#timeline details.tool-card").filter(has_text="echo card-live")
    expect(card.locator(".toolstatus")).to_have_text("done ✓")
    expect(card.locator(".blk-result pre")).to_have_text("card-live")
    second = page.locator("#timeline details.tool-card").filter(has_text="echo second-call")
    expect(second.locator(".blk-result pre")).to_have_text("second-call")
    # No card of its own for any result; the page's seq bookkeeping still holds them.
    expect(page.locator("#timeline details.blk-result")).to_have_count(0)
    marks = page.locator("#timeline > .seq-mark")
    assert marks.count() >= 2
    expect(page.locator("#outline-list li.ol-result")).to_have_count(1)
    seqs = page.locator("#timeline > [data-seq]").evaluate_all(
        "els => els.map(e => +e.dataset.seq)"
    )
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))


@pytest.mark.browser_side
def test_it_shows_a_live_result_whose_card_is_not_on_the_page(browsing: Browsing) -> None:
    page = browsing.new_page()
    start_session(page, "Slow one.\n$ sleep 4; echo arrived-late\nAll done")
    card = page.locator("#timeline details.tool-card").filter(has_text="arrived-late")
    expect(card.locator(".toolstatus")).to_have_text("running…")
    # As if the call lay before the loaded page (older than its first 200 events).
    card.evaluate("element => element.closest('article').remove()")
    # Its slot, made at the end of the timeline, received it.
    orphan = page.locator("#timeline > .tool-result-slot")
    expect(orphan.locator(".blk-result pre")).to_have_text("arrived-late")
    expect(page.locator("#timeline")).to_contain_text("All done")
    # (No console error either: the browsing fixture fails the test on any.)


@pytest.mark.browser_side
def test_it_stops_following_when_the_reader_scrolls_up(browsing: Browsing) -> None:
    page = browsing.new_page()
    page.set_viewport_size({"width": 1000, "height": 500})
    lines = "\n".join(f"Line {n} of a long answer." for n in range(40))
    start_session(page, f"{lines}\nsleep 3\n$ echo later\nAll done")
    follow = page.locator("#follow-live")
    expect(follow).to_be_checked()
    expect(page.locator("#timeline")).to_contain_text("Line 39")
    page.mouse.wheel(0, -2000)
    expect(follow).not_to_be_checked()
    at = page.evaluate("window.scrollY")
    expect(page.locator("#timeline")).to_contain_text("All done")
    assert page.evaluate("window.scrollY") == at, "live events did not move the page"
    follow.check()
    at_end = "window.innerHeight + window.scrollY >= document.body.scrollHeight - 130"
    assert page.evaluate(at_end), "turning it back on goes to the latest event"


def test_it_opens_a_search_hit_at_its_event(browsing: Browsing, recorded: str) -> None:
    page = browsing.new_page()
    page.goto("/search/?q=validators")
    hits = page.locator(".hit")
    expect(hits.first).to_be_visible()
    expect(hits.first.locator("mark").first).to_be_visible()
    shoot(page, "search-light")
    href = hits.first.locator("a.hit-link").get_attribute("href") or ""
    seq = int(href.rsplit("-", 1)[1])
    hits.first.locator("a.hit-link").click()
    target = page.locator(".is-target")
    expect(target).to_have_count(1)
    expect(target).to_be_in_viewport()
    holder = page.evaluate(
        """seq => { const e = document.getElementById('event-' + seq);
                     return e && (e.dataset.at || e.id); }""",
        seq,
    )
    assert holder, f"event {seq} is on the page (loaded older events as needed)"
