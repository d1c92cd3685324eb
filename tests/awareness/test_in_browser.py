"""Awareness in real headless Chromium under the production CSP: a notification when a watched
session fails (once, with two tabs open), the attention count in the tab title, and the usage
and webhook pages drawn with no console error; their screenshots go to docs/screenshots/.

The fixtures are the end-to-end suite's (tests/e2e/conftest.py), imported so that this module
gets a Porthole of its own: the month of sessions it seeds stays out of the other browser
tests' lists.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import conftest as e2e
from tests.e2e.conftest import ROOT, Porthole, require_browser

# The end-to-end fixtures, taken into this module with a Porthole of its own (see above).
_porthole_alive = e2e._porthole_alive
browser = e2e.browser
signed_in_state = e2e.signed_in_state
open_context = e2e.open_context

require_browser()

from playwright.sync_api import Page, expect  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def porthole(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Porthole]:
    """This module's own server, stopped once its tests are done. Its webhook dispatcher gives
    up as fast as the seed's (tests/awareness/seed.py): either may claim a failing delivery,
    and with the default retries the server's took minutes to mark it failed."""
    quick_retries = {
        "PORTHOLE_WEBHOOK_MAX_ATTEMPTS": "3",
        "PORTHOLE_WEBHOOK_BACKOFF_SECONDS": "0.01",
    }
    data_dir = tmp_path_factory.mktemp("porthole-awareness")
    with e2e.run_porthole(data_dir, "awareness", quick_retries) as server:
        yield server


# The committed screenshots change only when asked (PORTHOLE_UPDATE_SCREENSHOTS=1); every run
# leaves its own in test-artifacts/.
SCREENSHOTS = (
    ROOT / "docs" / "screenshots"
    if os.environ.get("PORTHOLE_UPDATE_SCREENSHOTS")
    else e2e.ARTIFACTS / "awareness"
)
SESSION_PATH = re.compile(r"/sessions/([0-9a-f-]{36})/$")

# A spy, not a stand-in: the real Notification is still created; every construction is also
# reported to the test, from whichever tab made it.
NOTIFICATION_SPY = """
(() => {
  const Real = window.Notification;
  if (!Real) { return; }
  class Spy extends Real {
    constructor(title, options) {
      super(title, options);
      if (window.__porthole_notified) {
        const o = options || {};
        window.__porthole_notified({title, body: o.body, tag: o.tag});
      }
    }
  }
  Object.defineProperty(Spy, "permission", { get: () => Real.permission });
  Spy.requestPermission = (...args) => Real.requestPermission(...args);
  window.Notification = Spy;
})();
"""


def poll_every(ms: int) -> str:
    """An init script that sets how often notify.js polls the attention feed in a page (its
    `data-poll-ms`, read when the script runs, after the page is parsed)."""
    return f"""
new MutationObserver((records, observer) => {{
  const script = document.querySelector("script[data-feed]");
  if (script) {{ script.dataset.pollMs = "{ms}"; observer.disconnect(); }}
}}).observe(document, {{ childList: true, subtree: true }});
"""


def wait_until(page: Page, condition: Any, timeout: float = 30.0) -> None:
    """Poll a condition fed by Playwright's events (which are delivered while it waits)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        page.wait_for_timeout(100)


def start_session(page: Page, script: str) -> str:
    page.bring_to_front()
    page.goto("/sessions/new/")
    page.locator("#id_prompt").fill(script)
    with page.expect_response(
        lambda r: r.request.method == "GET" and bool(SESSION_PATH.search(r.url))
    ) as info:
        page.get_by_role("button", name="Start session").click()
    match = SESSION_PATH.search(info.value.url)
    assert match
    return match.group(1)


@pytest.mark.browser_side
def test_it_notifies_once_when_a_watched_session_fails(open_context: Any) -> None:
    tabs = open_context(permissions=["notifications"])
    shown: list[dict[str, Any]] = []
    lock = threading.Lock()

    def notified(source: Any, detail: dict[str, Any]) -> None:
        with lock:
            shown.append(detail)

    polls = [0]

    def on_response(response: Any) -> None:
        if "/awareness/attention/" in response.url:
            polls[0] += 1

    tabs.context.on("response", on_response)
    tabs.context.expose_binding("__porthole_notified", notified)
    tabs.context.add_init_script(NOTIFICATION_SPY)
    tabs.context.add_init_script(poll_every(1000))  # the polls this test counts come sooner

    first = tabs.new_page()
    first.goto("/")
    toggle = first.locator("#notify-toggle")
    expect(toggle).to_have_text("Notifications off")
    toggle.click()  # the permission is asked only now (and granted by the context)
    expect(toggle).to_have_attribute("aria-pressed", "true")

    second = tabs.new_page()  # another tab of the same browser
    second.goto("/usage/")
    expect(second.locator("#notify-toggle")).to_have_attribute("aria-pressed", "true")

    third = tabs.new_page()
    session_id = start_session(third, "Trying something risky\nexit 3")
    expect(third.locator(".badge-exited")).to_contain_text("3")

    # The tab title counts it as soon as a poll sees it.
    expect(second).to_have_title(re.compile(r"^\(\d+\) Usage"), timeout=20_000)
    wait_until(first, lambda: any(session_id in (s.get("tag") or "") for s in list(shown)))
    # Then two more polls of the feed, whichever tab makes them: a duplicate would be out by then.
    seen_polls = polls[0]
    wait_until(first, lambda: polls[0] >= seen_polls + 2)
    with lock:
        mine = [s for s in shown if session_id in (s.get("tag") or "")]
    assert len(mine) == 1, shown
    assert mine[0]["title"].endswith("failed")
    expect(first.locator("#attention-count")).to_be_visible()


@pytest.fixture(scope="module")
def seeded(porthole: Porthole) -> Porthole:
    """This module's server with a month of sessions, webhooks and deliveries."""
    e2e._manage(
        porthole.env,
        "shell",
        "-c",
        "from tests.awareness.seed import seed; seed()",
    )
    return porthole


# The charts' figures come from the database, in aggregates that differ between engines:
# tests/awareness/test_pages.py checks them on PostgreSQL too; here only the drawing.
@pytest.mark.browser_side
@pytest.mark.parametrize("layout", ["light", "dark", "narrow"])
def test_it_draws_the_usage_charts_and_takes_screenshots(
    seeded: Porthole, open_context: Any, layout: str
) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    e2e.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = open_context(**e2e.LAYOUTS[layout]).new_page()
    page.goto("/usage/")
    charts = page.locator("svg.chart-svg")
    expect(charts).to_have_count(5)
    expect(page.locator("svg.chart-svg rect.s-cost").first).to_be_visible()
    assert page.locator("#total-cost").inner_text().startswith("$")
    fits(page)
    shoot(page, SCREENSHOTS / f"usage-{layout}.png")
    page.goto("/settings/hooks/")
    expect(page.locator("table.delivery-log")).to_be_visible()
    expect(page.locator(".delivery-failed").first).to_be_visible()
    fits(page)
    shoot(page, SCREENSHOTS / f"settings-{layout}.png")
    page.goto("/")
    expect(page.locator(".rel-cost").first).to_be_visible()
    shoot(page, e2e.ARTIFACTS / f"awareness-all-{layout}.png")
    page.goto("/?status=attention")
    expect(page.locator(".badge-attention").first).to_be_visible()
    fits(page)
    shoot(page, e2e.ARTIFACTS / f"awareness-list-{layout}.png")


def fits(page: Page) -> None:
    """No sideways scrolling of the whole page (a chart may scroll inside its own box)."""
    widths = page.evaluate(
        "() => ({page: document.documentElement.scrollWidth, view: window.innerWidth})"
    )
    assert widths["page"] <= widths["view"], (page.url, widths)


def shoot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True, caret="initial")


def test_it_marks_a_failed_session_as_handled_on_every_page_watching_it(
    open_context: Any,
) -> None:
    tabs = open_context()
    mine = tabs.new_page()
    session_id = start_session(mine, "Deploying the thing\nexit 4")
    note = mine.locator(".attention-note")
    # The exit redraws the header live, with the reason.
    expect(note).to_contain_text("Needs attention: the agent exited with an error code.")
    theirs = tabs.new_page()
    theirs.goto(f"/sessions/{session_id}/")
    expect(theirs.locator(".attention-note")).to_be_visible()
    expect(theirs.locator("#connection")).to_have_attribute("data-state", "live")
    e2e.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shoot(mine, e2e.ARTIFACTS / "attention-note.png")

    mine.bring_to_front()
    mine.get_by_role("button", name="Mark as handled").click()
    expect(mine.locator("#control-feedback")).to_contain_text("Marked as handled.")
    for page in (mine, theirs):
        expect(page.locator(".attention-note")).to_have_count(0)
        mark = page.locator("#timeline .action-text").last
        expect(page.locator("#timeline")).to_contain_text("marked the session as handled")
        expect(mark).to_have_text("the agent exited with an error code")  # why it was marked
    theirs.goto("/?status=attention")
    expect(theirs.locator(f"a[href='/sessions/{session_id}/']")).to_have_count(0)


@pytest.mark.browser_side
def test_it_shows_a_phone_what_marking_from_the_header_did(open_context: Any) -> None:
    """On a phone the dock scrolls with the page, a long timeline below the header's button:
    the reply is brought into view instead of landing out of sight."""
    phone = open_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = phone.new_page()
    start_session(page, "A long read\nflood 40 400\nexit 4")
    expect(page.locator(".attention-note")).to_be_visible()
    # The header's state can come before a lagging page has drawn the flood: a page still
    # short when scrolled to the top follows the flood down to the dock as it is drawn.
    last = page.locator("#timeline article.ev-message .blk-text").filter(has_text="flood 40/40")
    expect(last).to_be_attached()
    expect(page.get_by_role("button", name="Continue in a new session")).to_be_attached()
    button = page.get_by_role("button", name="Mark as handled")
    page.evaluate("() => window.scrollTo(0, 0)")
    expect(button).to_be_in_viewport()
    expect(page.locator("#controls")).not_to_be_in_viewport()  # the dock, far below
    feedback = page.locator("#control-feedback")
    button.click()
    expect(feedback).to_contain_text("Marked as handled.")
    expect(feedback).to_be_in_viewport()
    e2e.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(e2e.ARTIFACTS / "attention-marked-phone.png"))


@pytest.mark.browser_side
def test_it_marks_sessions_as_handled_from_the_list(open_context: Any) -> None:
    """Triage: the "Needs attention" list marks a row without opening its session; the row
    changes in place, and on every other list watching; the bulk button and the top bar's
    count follow at once."""
    tabs = open_context()
    # The regular poll slowed to ten minutes: a count that changes within the test's waits
    # was changed by something else (the mark's HX-Trigger).
    tabs.context.add_init_script(poll_every(600_000))
    mine = tabs.new_page()
    first = start_session(mine, "Listmark one\nexit 4")
    expect(mine.locator(".attention-note")).to_be_visible()
    second = start_session(mine, "Listmark two\nexit 5")
    expect(mine.locator(".attention-note")).to_be_visible()
    theirs = tabs.new_page()
    for page in (mine, theirs):
        page.goto("/?status=attention&q=Listmark")  # the seed has its own "Triage" sessions
        page.wait_for_function("() => window.__wsOpened > 0")
    rows = {
        sid: (mine.locator(f"#row-{sid}"), theirs.locator(f"#row-{sid}")) for sid in (first, second)
    }
    for row, _ in rows.values():
        expect(row.locator(".badge-attention")).to_be_visible()
        expect(row.get_by_role("button", name="Mark handled")).to_be_visible()
    counts = [page.locator("#attention-count strong") for page in (mine, theirs)]
    for count in counts:
        expect(count).to_have_text(re.compile(r"^\d+$"))  # started by this person: both, at least
    needing = int(counts[0].inner_text())
    assert needing >= 2
    e2e.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shoot(mine, e2e.ARTIFACTS / "attention-list.png")

    mine.bring_to_front()
    mine_row, their_row = rows[first]
    mine_row.get_by_role("button", name="Mark handled").click()
    for row in (mine_row, their_row):  # the reply on this page; the live update on the other
        expect(row.locator(".badge-attention")).to_have_count(0)
        expect(row.locator(".ack-form")).to_have_count(0)
        expect(row).to_contain_text("Listmark one")
    for row in rows[second]:
        expect(row.get_by_role("button", name="Mark handled")).to_be_visible()
    for page, count in zip((mine, theirs), counts, strict=True):
        expect(page.get_by_role("button", name="Mark all 1 shown as handled")).to_be_visible()
        expect(count).to_have_text(str(needing - 1))  # not at the next poll: right away
    mine.set_viewport_size({"width": 390, "height": 800})
    fits(mine)
    shoot(mine, e2e.ARTIFACTS / "attention-list-marked-390.png")
    mine.set_viewport_size({"width": 1280, "height": 800})

    # The rest at once: what the page shows and still needs attention (the confirmation
    # accepted), then the list again, with what was done.
    asked: list[str] = []

    def confirm(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept()

    mine.once("dialog", confirm)
    mine.get_by_role("button", name="Mark all 1 shown as handled").click()
    expect(mine.locator(".flash-success")).to_have_text("Marked 1 session as handled.")
    assert asked and asked[0].startswith("Mark the 1 session shown here as handled"), asked
    expect(mine.locator("#results")).to_contain_text("No session matches these filters.")
    shoot(mine, e2e.ARTIFACTS / "attention-list-all-marked.png")
    for row in rows[second][1:]:  # the other list, live
        expect(row.locator(".badge-attention")).to_have_count(0)
    expect(theirs.locator("form.bulk-ack")).to_be_hidden()  # nothing left there to mark
    mine.goto(f"/sessions/{first}/")
    expect(mine.locator("#timeline")).to_contain_text("marked the session as handled")
    expect(mine.locator(".attention-note")).to_have_count(0)
