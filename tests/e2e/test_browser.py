"""Porthole in a real browser: live events over the WebSocket, steering, reconnection, the
live session list, under the production CSP. Screenshots land in test-artifacts/e2e/.

Every test fails if a page logged a console error, threw, or violated the CSP (see the
`browsing` fixture in conftest.py). Synchronisation is Playwright's auto-waiting only.

The tests named for a regression pinned a bug these tests found; an `xfail(strict=True)`
test pins one still open, and fails (XPASS) once it is fixed: then remove its marker.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.e2e.conftest import (
    ADMIN_PASSWORD,
    ADMIN_USERNAME,
    ARTIFACTS,
    LAYOUTS,
    Browsing,
    CuttableProxy,
    Porthole,
    require_browser,
)

require_browser()

from playwright.sync_api import Locator, Page, Response, expect  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

SESSION_PATH = re.compile(r"/sessions/([0-9a-f-]{36})/$")


# -- helpers ---------------------------------------------------------------------------------


def start_session(page: Page, script: str, *, reuse_sandbox: bool = True) -> Response:
    """Start a demo session from the form; returns the session page's response."""
    page.bring_to_front()  # a background tab gets no animation frames: clicks would stall
    page.goto("/sessions/new/")
    page.locator("#id_prompt").fill(script)
    sandbox = page.locator("#id_sandbox")
    existing = sandbox.locator("option:not([value='new'])")
    if reuse_sandbox and existing.count():
        sandbox.select_option(existing.first.get_attribute("value"))
    with page.expect_response(
        lambda r: r.request.method == "GET" and bool(SESSION_PATH.search(r.url))
    ) as info:
        page.get_by_role("button", name="Start session").click()
    response = info.value
    assert response.status == 200, f"session page answered {response.status}"
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    return response


def session_path(page: Page) -> str:
    match = SESSION_PATH.search(page.url)
    assert match, page.url
    return f"/sessions/{match.group(1)}/"


def agent_text(page: Page, text: str) -> Locator:
    """An assistant text block of the timeline containing `text`."""
    return page.locator("#timeline article.ev-message .blk-text").filter(has_text=text)


def entry(page: Page, kind: str, text: str) -> Locator:
    """A timeline entry of one kind (action, notice, message, result, …) containing `text`."""
    return page.locator(f"#timeline > article.ev-{kind}").filter(has_text=text)


def feedback(page: Page) -> Locator:
    """The notice a steering form's reply shows (inside or beside the controls)."""
    return page.locator("#session-root p.notice[role=status]")


def badge(page: Page) -> Locator:
    return page.locator("#session-state .badge")


def seqs(page: Page, container: str = "#timeline") -> list[int]:
    values = page.locator(f"{container} > [data-seq]").evaluate_all(
        "els => els.map(e => e.dataset.seq)"
    )
    return [int(v) for v in values]


def rendered_last_seq(page: Page) -> int:
    return int(page.locator("#session-root").get_attribute("data-last-seq") or "0")


def assert_in_order(values: list[int], what: str) -> None:
    assert len(values) == len(set(values)), f"{what}: duplicated seqs {values}"
    assert values == sorted(values), f"{what}: out of order {values}"


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_it_signs_in_starts_a_session_and_streams_its_events_live(
    open_context: Any, porthole: Porthole
) -> None:
    browsing: Browsing = open_context(signed_in=False)
    page = browsing.new_page()

    # Signed out, the form sends us to the login page and back.
    page.goto("/sessions/new/")
    expect(page).to_have_url(re.compile(r"/login/\?next=/sessions/new/$"))
    page.get_by_label("Username").fill(ADMIN_USERNAME)
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/sessions/new/$"))

    response = start_session(
        page,
        "Hello **world**\n$ echo from-the-sandbox\nsleep 3\nAll done",
        reuse_sandbox=False,
    )

    # The production CSP, with a fresh nonce that the page's scripts carry.
    csp = response.headers.get("content-security-policy", "")
    assert "default-src 'self'" in csp, csp
    match = re.search(r"script-src 'self' 'nonce-([^']+)'", csp)
    assert match, csp
    nonces = page.locator("script[src]").evaluate_all("els => els.map(e => e.nonce)")
    assert nonces and set(nonces) == {match.group(1)}, nonces
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp

    # What the server rendered: still working, the end of the script not there yet.
    html = response.text()
    assert "badge-working" in html, "the page was rendered after the turn ended"
    assert '<div id="working" class="working on"' in html
    at_load = rendered_last_seq(page)

    # The rest arrives over the socket.
    done = agent_text(page, "All done")
    expect(done).to_be_visible()
    arrived = int(done.locator("xpath=ancestor::article[1]").get_attribute("data-seq") or "0")
    assert arrived > at_load, "the last text was in the first render, not live"
    expect(badge(page)).to_have_text("Idle")
    expect(badge(page)).to_have_class(re.compile(r"\bbadge-idle\b"))
    expect(page.locator("#working")).not_to_have_class(re.compile(r"\bon\b"))
    expect(page.locator("#working")).to_have_text("")
    expect(entry(page, "result", "")).to_have_count(1)
    expect(page.locator("#empty-timeline")).to_have_count(0)

    # Markdown rendered (and nothing else), the Bash call paired with its result.
    expect(agent_text(page, "Hello").locator("strong")).to_have_text("world")
    tool = page.locator("#timeline .blk-tool").filter(has_text="echo from-the-sandbox")
    expect(tool.locator(".tool-name")).to_have_text("Bash")
    expect(tool.locator(".toolstatus")).to_have_text("done ✓")
    expect(page.locator("#timeline .blk-result pre")).to_have_text("from-the-sandbox")
    expect(page.locator("#controls button", has_text="Interrupt")).to_be_disabled()

    assert_in_order(seqs(page), "live timeline")
    browsing.check()  # no console error, page error or CSP violation so far


@pytest.mark.e2e
def test_it_sends_follow_up_prompts_and_shows_the_answers_live(
    browsing: Browsing, proxy: CuttableProxy
) -> None:
    page = browsing.new_page()
    start_session(page, "Ready for more.")
    expect(badge(page)).to_have_text("Idle")
    # Watched through the proxy, so that the form's reply can be made to land before the
    # live updates (for the other order, see the tests below).
    page.goto(f"http://127.0.0.1:{proxy.port}{session_path(page)}")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    prompts = entry(page, "action", "admin sent a prompt")
    expect(prompts).to_have_count(1)

    proxy.pause_websockets()
    box = page.locator("#id_text")
    box.fill("Follow-up answer: **42**\n$ echo second-turn")
    box.press("Control+Enter")
    expect(feedback(page)).to_have_text("Prompt sent.")
    expect(box).to_have_value("")
    expect(prompts).to_have_count(1)  # the timeline only grows from the socket
    proxy.resume_websockets()

    expect(prompts).to_have_count(2)
    expect(prompts.last).to_contain_text("Follow-up answer: **42**")  # the prompt, as typed
    expect(agent_text(page, "Follow-up answer").locator("strong")).to_have_text("42")
    expect(page.locator("#timeline .blk-result pre").last).to_have_text("second-turn")
    expect(badge(page)).to_have_text("Idle")
    expect(entry(page, "result", "")).to_have_count(2)

    # The Send button does the same, with the socket flowing freely. (Whether the box is
    # cleared then depends on which lands first: see the regression test below.)
    box.fill("Third turn here")
    page.locator("#controls").get_by_role("button", name="Send").click()
    expect(prompts).to_have_count(3)
    expect(agent_text(page, "Third turn here")).to_have_count(1)
    expect(entry(page, "result", "")).to_have_count(3)
    expect(badge(page)).to_have_text("Idle")
    expect(box).to_be_editable()
    assert_in_order(seqs(page), "timeline")


def steer_with_a_late_reply(page: Page, action: str) -> None:
    """Prompt or interrupt, with the reply held back until every live update it causes
    has landed: the usual order, since the server announces before it answers."""
    if action == "prompt":
        expect(badge(page)).to_have_text("Idle")
    else:
        expect(agent_text(page, "Working for 30 s")).to_be_visible()
    turns = entry(page, "divider", "turn complete").count()

    def settled() -> None:
        if action == "prompt":
            expect(entry(page, "divider", "turn complete")).to_have_count(turns + 1)
        else:
            # Through the bridge to the agent's stdin and back as an event: on a loaded
            # machine (a CI-like run on PostgreSQL + Redis beside the SQLite one) over 15 s.
            expect(entry(page, "notice", "interrupted")).to_have_count(1, timeout=45_000)
        expect(badge(page)).to_have_text("Idle")

    def reply_late(route: Any) -> None:
        response = route.fetch()  # the server has acted and announced it
        settled()  # every live update has landed
        route.fulfill(response=response)

    page.route(f"**{session_path(page)}{action}/", reply_late)
    if action == "prompt":
        page.locator("#id_text").fill("Second")
        page.locator("#id_text").press("Control+Enter")
    else:
        page.locator("#controls").get_by_role("button", name="Interrupt").click()
    settled()
    page.wait_for_function("() => window.__xhrDone >= 1")  # the late reply was handled


@pytest.mark.e2e
@pytest.mark.parametrize("action", ["prompt", "interrupt"])
@pytest.mark.browser_side
def test_it_keeps_the_prompt_box_when_live_updates_overtake_the_reply(
    page: Page, action: str
) -> None:
    """Regression: a reply swapped into the #controls a live update had replaced took the
    (hx-preserve) prompt box with it into the detached element."""
    start_session(page, "Ready." if action == "prompt" else "sleep 30")
    steer_with_a_late_reply(page, action)
    expect(feedback(page)).to_have_text("Prompt sent." if action == "prompt" else "Interrupt sent.")
    expect(page.locator("#id_text")).to_be_attached(timeout=2_000)
    expect(page.locator("#id_text")).to_be_editable()


@pytest.mark.e2e
@pytest.mark.browser_side
def test_it_clears_the_prompt_box_when_live_updates_overtake_the_reply(page: Page) -> None:
    start_session(page, "Ready.")
    steer_with_a_late_reply(page, "prompt")
    expect(page.locator("#id_text")).to_have_value("", timeout=2_000)


@pytest.mark.e2e
@pytest.mark.browser_side
def test_it_shows_why_a_steering_action_was_refused(
    browsing: Browsing, proxy: CuttableProxy
) -> None:
    """A 409 reply is shown (htmx 2 leaves 4xx/5xx unswapped unless told otherwise)."""
    # A refusal is an error reply: Chromium and htmx both log it, as they should.
    browsing.problems.allow(r"status of 409 \(Conflict\)")
    browsing.problems.allow(r"Response Status Error Code 409 from /sessions/")
    killer = browsing.new_page()
    start_session(killer, "Ready.")
    expect(badge(killer)).to_have_text("Idle")
    stale = browsing.new_page()
    stale.goto(f"http://127.0.0.1:{proxy.port}{session_path(killer)}")
    expect(stale.locator("#connection")).to_have_attribute("data-state", "live")
    proxy.pause_websockets()  # this page does not hear of the kill

    killer.bring_to_front()
    killer.on("dialog", lambda dialog: dialog.accept())
    killer.locator("#controls").get_by_role("button", name="Kill", exact=True).click()
    expect(badge(killer)).to_have_text("Killed")

    stale.bring_to_front()
    expect(badge(stale)).to_have_text("Idle")
    stale.locator("#id_text").fill("Too late")
    stale.locator("#id_text").press("Control+Enter")
    alert = stale.locator("#session-root p.error[role=alert]")
    expect(alert).to_contain_text("The session has ended")
    expect(stale.locator("#id_text")).to_have_value("Too late")  # kept, to reuse
    proxy.resume_websockets()
    expect(badge(stale)).to_have_text("Killed")
    expect(stale.get_by_role("button", name="Continue in a new session")).to_be_visible()


@pytest.mark.e2e
def test_it_interrupts_a_long_step(page: Page) -> None:
    start_session(page, "sleep 30\nNever said")
    expect(agent_text(page, "Working for 30 s")).to_be_visible()
    expect(badge(page)).to_have_text("Working")

    interrupt = page.locator("#controls").get_by_role("button", name="Interrupt")
    expect(interrupt).to_be_enabled()
    interrupt.click()
    expect(entry(page, "action", "admin interrupted")).to_have_count(1)
    expect(entry(page, "notice", "interrupted")).to_have_count(1)
    expect(badge(page)).to_have_text("Idle")
    expect(page.locator("#working")).not_to_have_class(re.compile(r"\bon\b"))
    expect(page.locator("#controls").get_by_role("button", name="Interrupt")).to_be_disabled()
    expect(agent_text(page, "Never said")).to_have_count(0)
    expect(page.locator("#controls").get_by_role("button", name="Kill", exact=True)).to_be_enabled()
    expect(page.locator("#id_text")).to_be_editable()  # still live: it takes prompts


@pytest.mark.e2e
def test_it_kills_a_session_and_offers_to_continue(page: Page) -> None:
    start_session(page, "sleep 30")
    expect(agent_text(page, "Working for 30 s")).to_be_visible()

    dialogs: list[str] = []

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    page.locator("#controls").get_by_role("button", name="Kill", exact=True).click()
    expect(badge(page)).to_have_text("Killed")
    assert dialogs and dialogs[0].startswith("Kill this agent session?"), dialogs
    expect(entry(page, "action", "admin killed the session")).to_have_count(1)
    expect(page.locator("#working")).not_to_have_class(re.compile(r"\bon\b"))
    expect(page.locator("#id_text")).to_have_count(0)
    expect(page.locator("#controls").get_by_role("button", name="Interrupt")).to_have_count(0)
    expect(page.locator("#controls")).to_contain_text(re.compile("killed", re.I))
    continue_button = page.get_by_role("button", name="Continue in a new session")
    expect(continue_button).to_be_visible()

    # Continuing opens the new session, which links back.
    old = session_path(page)
    page.locator("#id_prompt").fill("Picked up again")
    continue_button.click()
    expect(page).not_to_have_url(re.compile(re.escape(old) + "$"))
    expect(page).to_have_url(SESSION_PATH)
    expect(page.locator("#session-state")).to_contain_text("Continues")
    expect(agent_text(page, "Picked up again")).to_be_visible()
    expect(badge(page)).to_have_text("Idle")


@pytest.mark.e2e
def test_it_reconnects_and_shows_every_event_exactly_once(
    browsing: Browsing, proxy: CuttableProxy, porthole: Porthole
) -> None:
    # The page's socket is cut on purpose: the browser and htmx report it as an error.
    browsing.problems.allow(r"htmx:wsError")
    browsing.problems.allow(r"WebSocket connection to '.*' failed")

    witness = browsing.new_page()  # straight to the server, never cut
    start_session(witness, "sleep 7\nAll done")
    path = session_path(witness)

    viewer = browsing.new_page()  # through the proxy
    viewer.goto(f"http://127.0.0.1:{proxy.port}{path}")
    expect(viewer.locator("#connection")).to_have_attribute("data-state", "live")
    expect(agent_text(viewer, "Still working: 1 s")).to_be_visible()

    # The network fails; new connections hang until it is back.
    proxy.hold()
    proxy.cut()
    expect(viewer.locator("#connection")).to_have_attribute("data-state", "offline")
    assert 1006 in viewer.evaluate("window.__wsClosed"), viewer.evaluate("window.__wsClosed")
    held = max(seqs(viewer))
    # The agent keeps going meanwhile: the witness sees events the viewer does not.
    expect(witness.locator(f'#session-root [data-seq="{held + 2}"]')).to_be_attached()
    expect(viewer.locator(f'#session-root [data-seq="{held + 1}"]')).to_have_count(0)

    proxy.release()
    expect(viewer.locator("#connection")).to_have_attribute("data-state", "live")
    expect(agent_text(viewer, "All done")).to_be_visible()
    expect(badge(viewer)).to_have_text("Idle")
    expect(badge(witness)).to_have_text("Idle")
    assert viewer.evaluate("window.__wsOpened") >= 2

    live_timeline = seqs(viewer)
    live_stderr = seqs(viewer, "#stderr-log")
    assert_in_order(live_timeline, "viewer's timeline after the reconnect")
    assert_in_order(live_stderr, "viewer's agent log after the reconnect")
    assert seqs(witness) == live_timeline, "the witness and the reconnected viewer differ"

    # A full render of the page has exactly the same events, nothing missing.
    viewer.reload()
    expect(viewer.locator("#connection")).to_have_attribute("data-state", "live")
    assert seqs(viewer) == live_timeline
    assert seqs(viewer, "#stderr-log") == live_stderr
    every = sorted(live_timeline + live_stderr)
    assert every == list(range(1, every[-1] + 1)), f"gaps in the stored seqs: {every}"


@pytest.mark.e2e
def test_it_updates_the_session_list_live(browsing: Browsing) -> None:
    actor = browsing.new_page()
    start_session(actor, "sleep 30")
    expect(agent_text(actor, "Working for 30 s")).to_be_visible()
    session_id = session_path(actor).split("/")[2]

    listing = browsing.new_page()
    listing.goto("/")
    row = listing.locator(f"#row-{session_id}")
    expect(row.locator(".badge")).to_have_text("Working")
    listing.wait_for_function("() => window.__wsOpened > 0")
    listing.evaluate("window.__notReloaded = true")

    actor.bring_to_front()
    actor.locator("#controls").get_by_role("button", name="Interrupt").click()
    expect(row.locator(".badge")).to_have_text("Idle")

    actor.on("dialog", lambda dialog: dialog.accept())
    actor.locator("#controls").get_by_role("button", name="Kill", exact=True).click()
    expect(row.locator(".badge")).to_have_text("Killed")
    expect(row).to_have_class(re.compile(r"\bstatus-killed\b"))
    expect(row.locator("td").nth(6)).not_to_have_text("—")  # ended

    # A session started elsewhere is announced, not inserted.
    rows = listing.locator("table.sessions tbody tr").count()
    start_session(actor, "Another one")
    expect(listing.locator("#new-sessions a")).to_have_text(re.compile("New sessions started"))
    expect(listing.locator("table.sessions tbody tr")).to_have_count(rows)
    assert listing.evaluate("window.__notReloaded") is True


@pytest.mark.e2e
def test_it_brings_the_session_list_up_to_date_after_a_reconnect(
    browsing: Browsing, proxy: CuttableProxy
) -> None:
    browsing.problems.allow(r"htmx:wsError")  # the socket is cut on purpose
    browsing.problems.allow(r"WebSocket connection to '.*' failed")
    actor = browsing.new_page()
    start_session(actor, "sleep 30")
    expect(agent_text(actor, "Working for 30 s")).to_be_visible()
    session_id = session_path(actor).split("/")[2]

    listing = browsing.new_page()
    listing.goto(f"http://127.0.0.1:{proxy.port}/")
    row = listing.locator(f"#row-{session_id}")
    expect(row.locator(".badge")).to_have_text("Working")
    listing.wait_for_function("() => window.__wsOpened > 0")
    proxy.hold()
    proxy.cut()
    listing.wait_for_function("() => window.__wsClosed.includes(1006)")

    actor.bring_to_front()
    actor.locator("#controls").get_by_role("button", name="Interrupt").click()
    expect(badge(actor)).to_have_text("Idle")

    proxy.release()
    listing.wait_for_function("() => window.__wsOpened >= 2")
    expect(row.locator(".badge")).to_have_text("Idle", timeout=3_000)


@pytest.mark.e2e
@pytest.mark.browser_side
def test_it_ignores_updates_for_sessions_not_listed(browsing: Browsing) -> None:
    """Regression: every session's row went to every list viewer, and htmx logged
    `htmx:oobErrorNoTarget` for each row the page does not show."""
    listed = browsing.new_page()
    start_session(listed, "sleep 30")
    expect(agent_text(listed, "Working for 30 s")).to_be_visible()
    listed_id = session_path(listed).split("/")[2]

    listing = browsing.new_page()
    listing.goto("/")
    expect(listing.locator(f"#row-{listed_id} .badge")).to_have_text("Working")
    listing.wait_for_function("() => window.__wsOpened > 0")

    unlisted = browsing.new_page()
    start_session(unlisted, "Not on the list page")
    expect(badge(unlisted)).to_have_text("Idle")
    # The list's socket is ordered: once this later update shows, the unlisted session's
    # updates have all been received and handled.
    listed.bring_to_front()
    listed.locator("#controls").get_by_role("button", name="Interrupt").click()
    expect(listing.locator(f"#row-{listed_id} .badge")).to_have_text("Idle")
    errors = [text for text in browsing.problems.seen if "oobErrorNoTarget" in text]
    assert not errors, errors


@pytest.mark.e2e
@pytest.mark.browser_side
def test_it_keeps_the_prompt_boxs_hint_true_to_the_agents_state(page: Page) -> None:
    """Regression: the box (kept across live swaps, for what is typed in it) kept the hint
    it was drawn with, "Queue a follow-up", after the agent went idle."""
    start_session(page, "sleep 3\nDone waiting.")
    box = page.locator("#id_text")
    expect(box).to_have_attribute("placeholder", re.compile("^Queue a follow-up"))
    expect(agent_text(page, "Done waiting.")).to_be_visible()
    expect(badge(page)).to_have_text("Idle")
    expect(box).to_have_attribute("placeholder", re.compile("^Send a follow-up"))


@pytest.mark.e2e
@pytest.mark.browser_side
def test_it_hides_the_jump_button_while_following(page: Page) -> None:
    """Regression: `.button { display: inline-flex }` beat the `hidden` attribute."""
    start_session(page, "Short and sweet.")
    expect(badge(page)).to_have_text("Idle")
    assert page.locator("#jump-latest").get_attribute("hidden") is not None
    expect(page.locator("#jump-latest")).to_be_hidden(timeout=2_000)


@pytest.mark.e2e
@pytest.mark.browser_side
def test_it_fits_the_session_page_on_a_390px_screen(open_context: Any, page: Page) -> None:
    """Regression: the turn divider's label did not wrap (`white-space: nowrap`)."""
    start_session(page, "Short and sweet.")
    expect(badge(page)).to_have_text("Idle")
    narrow = open_context(viewport={"width": 390, "height": 844}).new_page()
    narrow.goto(session_path(page))
    expect(narrow.locator("#connection")).to_have_attribute("data-state", "live")
    expect(entry(narrow, "divider", "turn complete")).to_have_count(1)
    widths = _widths(narrow)
    assert widths["page"] <= widths["view"], widths


def _widths(page: Page) -> dict[str, Any]:
    """The page's width against the window's, and the first elements that stick out of
    it (a page can keep its width while a table or a link runs past the screen's edge)."""
    return dict(
        page.evaluate(
            """() => ({
            page: Math.max(document.documentElement.scrollWidth, innerWidth),
            view: screen.width,
            wider: [...document.querySelectorAll('main *')]
                .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth)
                // what its parent cuts off (an ellipsis, a scrolling block) is not in the way
                .filter(e => getComputedStyle(e.parentElement).overflowX === 'visible')
                .map(e => `${e.tagName.toLowerCase()}.${e.className}`).slice(0, 5),
        })"""
        )
    )


@pytest.mark.e2e
@pytest.mark.browser_side
def test_it_fits_the_list_and_a_long_first_line_on_a_375px_screen(
    open_context: Any, page: Page
) -> None:
    """Regressions: the session list's title kept 180 px, and with a "needs attention"
    badge the table came out 430 px wide; an outline entry (a prompt's first line, cut at
    about 100 characters) did not wrap, and a long URL at the start of a prompt made the
    page 695 px wide."""
    # A first line that cannot break; a non-zero exit: the list marks it for attention.
    start_session(page, "https://example.org/" + "abcdefghij" * 30 + "\nexit 3")
    expect(badge(page)).to_have_text("Exited · 3")
    phone = {"width": 375, "height": 812}
    narrow = open_context(viewport=phone, is_mobile=True, has_touch=True).new_page()
    narrow.goto(session_path(page))
    expect(narrow.locator("#connection")).to_have_attribute("data-state", "live")
    expect(narrow.locator("#outline-list .ol-label").first).to_contain_text("example.org")
    session_page = _widths(narrow)
    assert session_page["page"] <= session_page["view"], session_page
    assert session_page["wider"] == [], session_page
    narrow.goto("/")
    expect(narrow.locator("table.sessions tr").nth(1)).to_contain_text("needs attention")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shoot(narrow, "list-phone", full_page=False)
    session_list = _widths(narrow)
    assert session_list["page"] <= session_list["view"], session_list
    assert session_list["wider"] == [], session_list


def shoot(page: Page, name: str, *, full_page: bool) -> None:
    # caret="initial": Playwright's caret hiding leaves style="" on inputs, which htmx's
    # attribute settling then copies on the next live update, and the CSP rightly refuses.
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page, caret="initial")


@pytest.mark.e2e
@pytest.mark.browser_side
def test_it_takes_screenshots_in_light_dark_and_narrow_layouts(
    open_context: Any, browsing: Browsing
) -> None:
    setup = browsing.new_page()
    start_session(
        setup,
        "\n".join(
            [
                "# A heading",
                "Some *markdown* with `inline code`, a [link](https://example.org) and a list:",
                "- one",
                "- two",
                "$ printf 'line %s\\n' 1 2 3",
                "$ ls /definitely-not-here",
                "$ echo " + "a-very-long-unbroken-token-" * 8,
                "sleep 1",
                "All done, " + "with a long sentence that has to wrap somewhere " * 4,
            ]
        ),
    )
    expect(badge(setup)).to_have_text("Idle")
    path = session_path(setup)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    overflow: dict[str, dict[str, int]] = {}
    for name, options in LAYOUTS.items():
        context = open_context(**options)
        page = context.new_page()
        for label, url in [("session", path), ("list", "/"), ("new", "/sessions/new/")]:
            page.goto(url)
            if label == "session":
                expect(page.locator("#connection")).to_have_attribute("data-state", "live")
                expect(agent_text(page, "All done")).to_be_visible()
                # The page follows the latest event, with sticky controls and a floating
                # button: a full-page capture would pin those mid-page. Shoot what a person
                # sees instead, at the bottom (where it opens) and at the top.
                page.evaluate("() => window.scrollTo(0, 0)")
                expect(page.locator("#session-state")).to_be_in_viewport()
                shoot(page, f"session-top-{name}", full_page=False)
                page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
                expect(page.locator(".stderr-panel")).to_be_in_viewport()
                shoot(page, f"session-bottom-{name}", full_page=False)
            else:
                shoot(page, f"{label}-{name}", full_page=True)
            overflow[f"{label}-{name}"] = page.evaluate(
                "() => ({page: document.documentElement.scrollWidth, view: window.innerWidth})"
            )
    (ARTIFACTS / "overflow.json").write_text(json.dumps(overflow, indent=2))


HOSTILE = [
    '<img src=x onerror="alert(1)">',
    "<svg onload=alert(2)><circle r=9></svg>",
    "<script>alert(3)</script>",
    "[click me](javascript:alert(4))",
    '<a href="javascript:alert(5)">link</a>',
    '"><iframe src="javascript:alert(6)"></iframe>',
    "<details open ontoggle=alert(7)>x</details>",
]


@pytest.mark.e2e
@pytest.mark.browser_side
def test_it_keeps_hostile_agent_output_inert_in_the_browser(page: Page) -> None:
    """Payloads in assistant text and tool output reach a real browser as text: no dialog
    opens, no handler runs (the CSP would report it as a violation: the page fixture fails
    on any), and the timeline holds no active element."""
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    printed = [f"$ printf '%s\\n' '{payload}'" for payload in HOSTILE if "'" not in payload]
    start_session(page, "\n".join([*HOSTILE, *printed, "All rendered."]))
    expect(agent_text(page, "All rendered.")).to_have_count(1)
    timeline = page.locator("#timeline")
    expect(timeline).to_contain_text('<img src=x onerror="alert(1)">')
    active = "script, iframe, svg, [onerror], [onload], [ontoggle], a[href^='javascript']"
    assert timeline.locator(active).count() == 0
    for link in timeline.locator("a:text('click me')").all():
        link.click()  # a sanitised link has no href: clicking it does nothing
    assert not dialogs
