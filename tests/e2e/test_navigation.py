"""Navigating a long session in a real browser, under the production CSP (issue 11): to its
start, to its first error and to any turn of the outline in one request each; a window away
from the live tail counts live events instead of appending them out of place, "Load newer"
brings the window to the tail, where it takes live events again.

Screenshots of the controls (light and dark, wide and narrow) land in
test-artifacts/e2e/navigation/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ARTIFACTS, Browsing, Porthole, require_browser

require_browser()

from playwright.sync_api import Page, expect  # noqa: E402

from tests.e2e.test_browser import (  # noqa: E402
    agent_text,
    assert_in_order,
    badge,
    feedback,
    seqs,
    session_path,
    start_session,
)
from tests.e2e.test_reading import load  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SCREENSHOTS = ARTIFACTS / "navigation"
TURNS = 8
PER_TURN = 150


def _turns() -> list[dict[str, Any]]:
    """A long recorded session: TURNS prompts, each answered by PER_TURN texts and a result;
    the first error is a failed Bash call in the third turn."""
    records: list[dict[str, Any]] = []

    def add(source: str, line: dict[str, Any], actor: str = "") -> None:
        record: dict[str, Any] = {"source": source, "raw": json.dumps(line)}
        if actor:
            record["actor"] = actor
        records.append(record)

    for turn in range(1, TURNS + 1):
        add("dashboard", {"type": "prompt", "text": f"Turn {turn}: carry on"}, "alice")
        for n in range(PER_TURN):
            add("agent", {"type": "assistant", "message": {"content": f"Turn {turn}, step {n}."}})
            if turn == 3 and n == 40:
                call = {"type": "tool_use", "id": "toolu_failing", "name": "Bash"}
                call["input"] = {"command": "cat /no/such/file"}
                add("agent", {"type": "assistant", "message": {"content": [call]}})
                result = {"type": "tool_result", "tool_use_id": "toolu_failing"}
                result.update(content="cat: /no/such/file: No such file", is_error=True)
                add("agent", {"type": "user", "message": {"content": [result]}})
        add("agent", {"type": "result", "subtype": "success", "total_cost_usd": 0.01 * turn})
    return records


@pytest.fixture(scope="module")
def long_recorded(porthole: Porthole, tmp_path_factory: pytest.TempPathFactory) -> str:
    transcript: Path = tmp_path_factory.mktemp("navigation") / "long.jsonl"
    transcript.write_text("".join(json.dumps(r) + "\n" for r in _turns()))
    return load(porthole, transcript, "A long recorded session")


def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)


def window(page: Page) -> str:
    return page.locator("#session-root").get_attribute("data-window") or ""


def load_newer_until_live(page: Page) -> int:
    """Press "Load newer" until the window is live; how many presses it took."""
    root = page.locator("#session-root")
    presses = 0
    while window(page) == "back":
        assert presses < 20, "the window never reached the live tail"
        through = root.get_attribute("data-through") or ""
        button = page.locator("#newer-slot button")
        if not button.is_visible():  # at the tail: live once the socket is level with it
            expect(root).to_have_attribute("data-window", "live")
            break
        button.click()
        presses += 1
        moved = f"#session-root[data-window='live'], #session-root:not([data-through='{through}'])"
        expect(page.locator(moved)).to_have_count(1)
    return presses


@pytest.mark.browser_side
def test_it_jumps_through_a_long_live_session_and_comes_back_to_the_live_tail(
    browsing: Browsing,
) -> None:
    page = browsing.new_page()
    page.set_viewport_size({"width": 1200, "height": 900})
    start_session(page, "Start of the long run.\n$ cat /no/such/file\nflood 500 80\nFlood done.")
    expect(agent_text(page, "Flood done.")).to_have_count(1, timeout=60_000)
    expect(badge(page)).to_have_text("Idle")
    path = session_path(page)

    # The start, in one request: no "Load older" on the way.
    with page.expect_navigation():
        page.locator(".jumps").get_by_role("link", name="Start").click()
    assert page.url.endswith(path + "?at=start")
    expect(agent_text(page, "Start of the long run.")).to_be_in_viewport()
    assert page.evaluate("window.__xhrDone") == 0
    assert window(page) == "back"
    expect(page.locator("#older-slot button")).to_have_count(0)
    count = page.locator("#newer-count")
    expect(count).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    # The first error, in one request: the failed call's card, opened at it.
    with page.expect_navigation():
        page.locator(".jumps").get_by_role("link", name="First error").click()
    target = page.locator(".is-target")
    expect(target).to_have_count(1)
    expect(target).to_contain_text("cat /no/such/file")
    expect(target.locator(".toolstatus").first).to_have_text("error ✗")
    expect(target).to_be_in_viewport()
    assert page.evaluate("window.__xhrDone") == 0
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    # Live events while the window is further back: counted, never appended below it.
    shown = seqs(page)
    before = int(count.get_attribute("data-count") or "0")
    box = page.locator("#id_text")
    box.fill("Said while away")
    page.locator("#controls").get_by_role("button", name="Send").click()
    expect(feedback(page)).to_have_text("Prompt sent.")
    # In sight above the controls, though the reader is far from the bottom of the page, and
    # clear of the floating "newer events" notice.
    expect(feedback(page)).to_be_in_viewport(ratio=1)
    expect(page.locator("#newer-notice")).to_be_in_viewport(ratio=1)
    said, notice = feedback(page).bounding_box(), page.locator("#newer-notice").bounding_box()
    assert said and notice and notice["y"] + notice["height"] <= said["y"], (said, notice)
    # The outline is outside the window: it grows live (the prompt, then the turn's result).
    outline = page.locator("#outline-list")
    expect(outline.locator("li.ol-prompt").filter(has_text="Said while away")).to_have_count(1)
    expect(outline.locator("li.ol-result")).to_have_count(2)
    expect(count).not_to_have_attribute("data-count", str(before))
    assert int(count.get_attribute("data-count") or "0") > before
    expect(agent_text(page, "Said while away")).to_have_count(0)
    assert seqs(page) == shown, "nothing was appended to the window"

    # "Load newer" to the tail: the window goes live, with every event once and in order.
    presses = load_newer_until_live(page)
    assert presses >= 2
    expect(agent_text(page, "Said while away")).to_have_count(1)
    expect(page.locator("#newer-notice")).to_have_count(0)
    assert_in_order(seqs(page), "timeline")
    box.fill("Said once live")
    page.locator("#controls").get_by_role("button", name="Send").click()
    expect(agent_text(page, "Said once live")).to_have_count(1)
    assert_in_order(seqs(page), "timeline")

    # Back at the start, then "Jump to latest": the live page, and a live event arrives.
    with page.expect_navigation():
        page.locator(".jumps").get_by_role("link", name="Start").click()
    with page.expect_navigation():
        page.locator("#newer-notice").click()
    assert page.url.endswith(path)
    assert window(page) == "live"
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    box.fill("Back at the latest")
    page.locator("#controls").get_by_role("button", name="Send").click()
    expect(agent_text(page, "Back at the latest")).to_have_count(1)
    expect(agent_text(page, "Back at the latest")).to_be_in_viewport()
    assert_in_order(seqs(page), "timeline")


@pytest.mark.browser_side
def test_it_jumps_to_any_turn_of_the_outline_in_one_request(
    browsing: Browsing, long_recorded: str
) -> None:
    page = browsing.new_page()
    page.goto(long_recorded)
    turns = page.locator("#outline-list li.ol-prompt a")
    expect(turns).to_have_count(TURNS)
    with page.expect_navigation():
        turns.nth(1).click()
    assert "?at=" in page.url
    target = page.locator(".is-target")
    expect(target).to_contain_text("Turn 2: carry on")
    expect(target).to_be_in_viewport()
    assert page.evaluate("window.__xhrDone") == 0
    # The outline's turns on this window are jumped to in place, without a request.
    turns.nth(1).click()
    expect(target).to_contain_text("Turn 2: carry on")
    assert "Turn 2" in page.evaluate("document.querySelector('.is-target').textContent")
    # And "Load older" still reaches back from there, leaving the reader where they were:
    # what was on the screen stays put (it was pushed thousands of pixels down, the page
    # left among the oldest of what came in).
    load_older = page.locator("#older-slot button")
    load_older.scroll_into_view_if_needed()
    reading = page.locator("#timeline > [data-seq]").first
    before = reading.bounding_box()
    load_older.click()
    older = page.locator(".older-events article .blk-text").filter(has_text="Turn 1, step 100.")
    expect(older).to_have_count(1)
    after = reading.bounding_box()
    assert before is not None and after is not None
    assert abs(after["y"] - before["y"]) < 40, (before, after)


@pytest.mark.browser_side
@pytest.mark.parametrize(
    ("scheme", "width"), [("light", 1280), ("dark", 1280), ("light", 420), ("dark", 420)]
)
def test_it_shows_the_navigation_controls(
    open_context: Any, long_recorded: str, scheme: str, width: int
) -> None:
    browsing: Browsing = open_context(color_scheme=scheme, viewport={"width": width, "height": 900})
    page = browsing.new_page()
    page.goto(long_recorded + "?at=first-error")
    target = page.locator(".is-target")
    expect(target).to_contain_text("cat /no/such/file")
    expect(page.locator("#newer-notice")).to_be_visible()
    suffix = "" if width > 600 else "-narrow"
    shoot(page, f"first-error-{scheme}{suffix}")
    page.evaluate("window.scrollTo(0, 0)")
    expect(page.locator(".jumps")).to_be_in_viewport()
    shoot(page, f"jumps-{scheme}{suffix}")
    page.locator("#newer-slot").scroll_into_view_if_needed()
    shoot(page, f"load-newer-{scheme}{suffix}")


@pytest.mark.browser_side
def test_it_keeps_only_the_latest_events_of_a_flood_it_follows(page: Page) -> None:
    """A page following live drops its oldest events past a bound (2,000 top-level ones;
    40 here) instead of growing with the session, and "Load older events" brings them back,
    in order."""
    start_session(page, "Ready for a flood.")
    expect(badge(page)).to_have_text("Idle")
    page.evaluate("document.getElementById('session-root').dataset.keep = '40'")
    timeline = page.locator("#timeline > [data-seq]")
    box = page.locator("#id_text")
    box.fill("flood 120 30\nFlood over.")
    box.press("Control+Enter")
    expect(agent_text(page, "Flood over.")).to_be_visible()
    expect(badge(page)).to_have_text("Idle")
    assert timeline.count() <= 40
    newest = seqs(page)
    assert_in_order(newest, "kept events")
    load_older = page.locator("#older-slot button")
    expect(load_older).to_be_visible()
    load_older.click()
    expect(page.locator(".older-events [data-seq]").first).to_be_attached()
    older = seqs(page, ".older-events")
    assert older and max(older) < min(newest), (older[-3:], newest[:3])
    assert_in_order(older + newest, "older and kept events")
