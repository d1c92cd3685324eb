"""A session page keeps up after any close of its socket, except an explicit "go away".

Between the browser and Porthole sits a proxy that knows where WebSocket frames end, so it
can end a page's socket the way a server, a restarting worker or a proxy does: a clean
close frame with a chosen code, at a frame boundary, then the end of the connection.
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import ARTIFACTS, Browsing, CuttableProxy, Porthole, require_browser

require_browser()

from playwright.sync_api import expect  # noqa: E402

from tests.e2e.test_browser import agent_text, badge, seqs, session_path, start_session  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


class ClosingProxy(CuttableProxy):
    """`close_websockets(code)` sends every page's socket a close frame with `code`."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._browsers: dict[asyncio.StreamWriter, asyncio.StreamWriter] = {}

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        kind: dict[str, bool],
        *,
        upstream: bool,
    ) -> None:
        if upstream:
            await super()._pipe(reader, writer, kind, upstream=upstream)
            return
        # The server answers only once the request went up, so `kind` is known by then.
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            writer.transport.abort()
            return
        writer.write(head)
        if kind.get("websocket") and head.startswith(b"HTTP/1.1 101"):
            await self._frames(reader, writer)
        else:
            await super()._pipe(reader, writer, kind, upstream=upstream)

    async def _frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Server to browser on a WebSocket: whole frames only, so that a close frame can be
        slipped in between two of them."""
        self._browsers[writer] = writer
        try:
            while True:
                frame = await reader.readexactly(2)
                length = frame[1] & 0x7F
                if length == 126:
                    extra = await reader.readexactly(2)
                    length = struct.unpack("!H", extra)[0]
                    frame += extra
                elif length == 127:
                    extra = await reader.readexactly(8)
                    length = struct.unpack("!Q", extra)[0]
                    frame += extra
                frame += await reader.readexactly(length)
                if writer not in self._browsers:
                    return  # closed by the proxy: nothing more reaches the browser
                writer.write(frame)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            if self._browsers.pop(writer, None) is not None:
                writer.transport.abort()

    def _close_all(self, code: int) -> None:
        for browser in list(self._browsers):
            self._browsers.pop(browser)
            # 1005 means "no code": it is never sent, the close frame is empty instead.
            payload = b"" if code == 1005 else struct.pack("!H", code)
            browser.write(bytes([0x88, len(payload)]) + payload)
            browser.close()  # the close frame, then the end of the connection
        for writer in list(self._writers):  # and the server's side of every connection
            if writer.transport.get_extra_info("peername", ("", 0))[1] == self.target_port:
                writer.transport.abort()

    def close_websockets(self, code: int) -> None:
        self._call(lambda: self._close_all(code))


@pytest.fixture
def closing_proxy(porthole: Porthole, browsing: Browsing) -> Iterator[ClosingProxy]:
    port = int(porthole.url.rsplit(":", 1)[1])
    proxy = ClosingProxy(port).start()
    try:
        yield proxy
        browsing.finish()
    finally:
        proxy.close()


def _watch_through(browsing: Browsing, proxy: ClosingProxy, path: str) -> Any:
    viewer = browsing.new_page()
    viewer.goto(f"http://127.0.0.1:{proxy.port}{path}")
    expect(viewer.locator("#connection")).to_have_attribute("data-state", "live")
    return viewer


# The close codes the page handles alike (going away, none given) are checked one after
# the other on one page, and only in the SQLite run.
@pytest.mark.parametrize(
    "codes", [(1000,), pytest.param((1001, 1005), marks=pytest.mark.browser_side)], ids=str
)
def test_it_reconnects_after_a_normal_close_and_catches_up(
    browsing: Browsing, closing_proxy: ClosingProxy, codes: tuple[int, ...]
) -> None:
    witness = browsing.new_page()  # straight to the server
    start_session(witness, "sleep 8\nAll done")
    path = session_path(witness)
    viewer = _watch_through(browsing, closing_proxy, path)
    expect(agent_text(viewer, "Still working: 1 s")).to_be_visible()

    for opened, code in enumerate(codes, start=2):
        closing_proxy.close_websockets(code)
        viewer.wait_for_function(f"() => window.__wsClosed.includes({code})")
        viewer.wait_for_function(f"() => window.__wsOpened >= {opened}")
        expect(viewer.locator("#connection")).to_have_attribute("data-state", "live")

    # Later events still arrive: the page opened a new socket and caught up by seq.
    expect(agent_text(viewer, "All done")).to_be_visible()
    expect(badge(viewer)).to_have_text("Idle")
    expect(viewer.locator("#connection")).to_have_attribute("data-state", "live")
    assert viewer.evaluate("window.__wsOpened") >= len(codes) + 1
    expect(badge(witness)).to_have_text("Idle")
    timeline = seqs(viewer)
    assert len(timeline) == len(set(timeline)) and timeline == sorted(timeline), timeline
    assert timeline == seqs(witness)


def test_it_stays_away_when_told_to_go_away(
    browsing: Browsing, closing_proxy: ClosingProxy
) -> None:
    witness = browsing.new_page()
    start_session(witness, "sleep 4\nAll done")
    viewer = _watch_through(browsing, closing_proxy, session_path(witness))
    opened = viewer.evaluate("window.__wsOpened")

    closing_proxy.close_websockets(4403)  # a revoked link, a removed role
    viewer.wait_for_function("() => window.__wsClosed.includes(4403)")
    expect(viewer.locator("#connection")).to_have_attribute("data-state", "closed")
    # The agent finishes meanwhile; the page that was told to go away does not come back.
    expect(agent_text(witness, "All done")).to_be_visible()
    expect(badge(witness)).to_have_text("Idle")
    assert viewer.evaluate("window.__wsOpened") == opened
    expect(agent_text(viewer, "All done")).to_have_count(0)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    viewer.evaluate("window.scrollTo(0, 0)")
    viewer.screenshot(path=ARTIFACTS / "session-go-away-light-wide.png")
    viewer.emulate_media(color_scheme="dark")
    viewer.set_viewport_size({"width": 390, "height": 844})
    viewer.evaluate("window.scrollTo(0, 0)")
    viewer.screenshot(path=ARTIFACTS / "session-go-away-dark-narrow.png")


def test_it_keeps_a_flood_flowing_past_the_window_by_acknowledging(browsing: Browsing) -> None:
    """More events than the consumer's window (1,000 unacknowledged): they all arrive only
    if the page acknowledges what it swapped in."""
    page = browsing.new_page()
    start_session(page, "sleep 2\nflood 2500 40\nAll flooded")  # the page is live first
    # Every event is to stay on the page, to be counted: past 2,000 it would drop the oldest.
    page.evaluate("document.getElementById('session-root').dataset.keep = '1000000'")
    expect(agent_text(page, "All flooded")).to_be_visible(timeout=60_000)
    timeline = seqs(page)
    assert timeline == sorted(set(timeline)), "duplicated or out of order"
    every = sorted(timeline + seqs(page, "#stderr-log"))
    assert every == list(range(every[0], every[-1] + 1)), "a gap in what the page shows"
    assert len(timeline) > 2_500


def test_it_says_how_far_behind_the_page_is_while_a_flood_is_drawn(browsing: Browsing) -> None:
    """A flood is recorded faster than it is drawn: while the page catches up, it says how
    many recorded events are still to come, and stops saying so once it has them all."""
    page = browsing.new_page()
    start_session(page, "sleep 2\nflood 6000 60\nAll flooded")  # the page is live first
    behind = page.locator("#working .behind")
    expect(behind).to_contain_text(re.compile(r"\d+ more events recorded"), timeout=60_000)
    # No picture of the note: the element's screenshot waits for it to hold still, and it
    # moves down with every event drawn above it; the page's, taken now, is blank (headless
    # Chromium's software raster falls behind a page following thousands of new events,
    # while the DOM holds them all: `elementFromPoint` finds them).
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    expect(agent_text(page, "All flooded")).to_be_visible(timeout=90_000)
    expect(behind).to_have_count(0)
    page.screenshot(path=ARTIFACTS / "session-drawn.png")


def test_it_draws_a_call_and_its_result_once_when_one_catch_up_brings_both(
    browsing: Browsing,
) -> None:
    """The page's socket opens only after the agent ran a tool, so the catch-up frame holds
    the call's card (its result drawn in) and the result's own swaps into that card. The
    card is created by that same frame: nothing may be drawn twice or out of place."""
    witness = browsing.new_page()
    start_session(witness, "sleep 2\n$ echo caught-up\nAll done")
    path = session_path(witness)

    # Until the agent is done, every socket the page opens is closed at once (the page
    # retries); then the next one goes through to the server.
    done = False
    opened: list[bool] = []

    def route(socket: Any) -> None:
        opened.append(done)
        if done:
            socket.connect_to_server()
        else:
            socket.close(code=1000)

    viewer = browsing.new_page()
    viewer.route_web_socket(re.compile(r"/ws/sessions/"), route)
    viewer.goto(path)
    expect(viewer.locator("#timeline .blk-tool")).to_have_count(0)  # rendered before the call
    expect(badge(witness)).to_have_text("Idle")
    done = True

    expect(agent_text(viewer, "All done")).to_be_visible()
    expect(badge(viewer)).to_have_text("Idle")
    card = viewer.locator("#timeline .blk-tool").filter(has_text="echo caught-up")
    expect(card.locator(".toolstatus")).to_have_text("done ✓")
    expect(card.locator(".blk-result pre")).to_have_text("caught-up")
    expect(viewer.locator("#timeline .blk-result")).to_have_count(1)
    expect(viewer.locator("#timeline .orphan")).to_have_count(0)
    ids = viewer.locator("#timeline [id]").evaluate_all("els => els.map(e => e.id)")
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert seqs(viewer) == seqs(witness)
    assert opened[0] is False and opened[-1] is True, opened
