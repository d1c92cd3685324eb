"""A read-only share link as its holder sees it, in a browser that is not signed in: the
session live under the production CSP, nobody's name, no controls; cut off when the link is
revoked, and then a page that says so."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.e2e.conftest import ARTIFACTS, require_browser

require_browser()

from playwright.sync_api import Page, expect  # noqa: E402

from tests.e2e.test_browser import agent_text, badge, start_session  # noqa: E402


@pytest.mark.e2e
def test_it_shows_a_shared_session_live_to_a_link_holder_until_revoked(
    open_context: Any, page: Page
) -> None:
    start_session(page, "Shown to a guest.")
    expect(badge(page)).to_have_text("Idle")
    page.locator("#share-panel summary").click()
    page.locator("#share-panel input[name=label]").fill("for the review")
    page.get_by_role("button", name="Create read-only link").click()
    link = page.locator("#share-panel input.share-url")
    expect(link).to_have_value(re.compile("/share/"))
    shared_path = "/share/" + link.input_value().split("/share/", 1)[1]

    guest_context = open_context(signed_in=False)
    # The revoke closes the guest's socket on purpose, and the reload is a 404.
    guest_context.problems.allow(r"WebSocket|status of 404")
    guest = guest_context.new_page()
    guest.goto(shared_path)
    expect(guest.locator("#connection")).to_have_attribute("data-state", "live")
    expect(agent_text(guest, "Shown to a guest.")).to_be_visible()
    expect(guest.locator("#id_text")).to_have_count(0)  # no steering
    expect(guest.locator("#timeline")).not_to_contain_text("admin")  # "a teammate" instead

    # A follow-up the operator sends reaches the guest over the socket.
    page.locator("#id_text").fill("Arrived live for the guest.")
    page.locator("#controls").get_by_role("button", name="Send").click()
    expect(agent_text(guest, "Arrived live for the guest.")).to_be_visible()
    expect(guest.locator("#timeline")).to_contain_text("a teammate sent a prompt")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    guest.screenshot(path=str(ARTIFACTS / "share-guest.png"), caret="initial")

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#share-panel").get_by_role("button", name="Revoke").click()
    expect(page.locator("#share-panel tr.link-revoked")).to_have_count(1)
    expect(guest.locator("#connection")).not_to_have_attribute("data-state", "live")
    guest.reload()
    expect(guest.locator("h1")).to_have_text("Not found")
    expect(guest.locator("p.error")).to_contain_text("revoked or it expired")
    guest.screenshot(path=str(ARTIFACTS / "share-revoked.png"), caret="initial")
