"""Team mode behind a real proxy: nginx (the deployed locations) in front of two plain uvicorn
web workers and a bridges worker, on PostgreSQL and Redis; a browser viewer on one worker
sees a session that another process records, live, under the production CSP."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connections
from prometheus_client.parser import text_string_to_metric_families

from dashboard.agents import actions, leases
from dashboard.agents.models import AgentSession, Event
from tests.agents.helpers import cookie_for
from tests.conftest import LocalSandbox
from tests.e2e.conftest import browser, open_browsing, require_browser  # noqa: F401
from tests.team.procs import Proc, Team, wait_until

pytestmark = [pytest.mark.team, pytest.mark.e2e, pytest.mark.timeout(300)]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "team"
PROMPT = "first words\nsleep 6\nthe last line"


@pytest.fixture(autouse=True)
def orm_beside_playwright(monkeypatch: pytest.MonkeyPatch) -> None:
    """Playwright's sync API keeps an event loop in this thread; the ORM calls here are
    plain synchronous ones all the same (Django's guard would refuse them)."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def in_thread[T](work: Callable[[], T]) -> T:
    """Run `work` on a thread of its own: Playwright's sync API owns this thread's loop."""

    def run() -> T:
        try:
            return work()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def start_session(user: User, prompt: str) -> AgentSession:
    return in_thread(lambda: asyncio.run(actions.start_session(user, prompt=prompt, options={})))


def storage_state(user: User, proxy: Proc) -> dict[str, Any]:
    """A browser already signed in as `user` (the session cookie the workers will read)."""
    name, _, value = cookie_for(user).decode().partition("=")
    cookie = {
        "name": name,
        "value": value,
        "domain": "127.0.0.1",
        "path": "/",
        "expires": -1,
        "httpOnly": True,
        "secure": False,
        "sameSite": "Lax",
    }
    return {"cookies": [cookie], "origins": []}


def viewers_here(worker: Proc) -> float:
    """The session sockets open on `worker`, from its own /metrics (loopback may scrape)."""
    with urllib.request.urlopen(f"{worker.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "porthole_viewers_here":
            return sum(sample.value for sample in family.samples)
    raise AssertionError(f"{worker.name} has no porthole_viewers_here")


def test_it_shows_a_session_live_through_nginx_from_a_worker_that_does_not_record_it(
    crew_oc: Team,
    oc: LocalSandbox,
    alice: User,
    browser: Any,  # noqa: F811
) -> None:
    require_browser()
    from playwright.sync_api import expect

    web1, web2 = crew_oc.web("web1"), crew_oc.web("web2")
    recorder = crew_oc.bridges("bridges-1")
    proxy = crew_oc.nginx([web1, web2])

    session = start_session(alice, PROMPT)
    wait_until(
        lambda: (
            AgentSession.objects.filter(id=session.id, bridge_owner="bridges-1").exists()
            and leases.held(session.id)
        ),
        30,
        "the bridges worker to hold the session",
    )

    browsing = open_browsing(browser, proxy, storage_state(alice, proxy))  # type: ignore[arg-type]
    try:
        page = browsing.new_page()
        page.goto(f"/sessions/{session.id}/")
        on_load = page.eval_on_selector_all(
            "#timeline [data-seq]", "els => els.map(e => Number(e.dataset.seq))"
        )
        # The agent's own text of the last line, as the bridges worker recorded it…
        said = wait_until(
            lambda: Event.objects.filter(
                session_id=session.id, type="assistant", raw__contains="the last line"
            ).first(),
            30,
            "the agent to say the last line",
        )
        # …arrives in the page over the socket: it was not in the page as served.
        expect(page.locator(f"#event-{said.seq}")).to_contain_text("the last line")
        assert said.seq > max(on_load or [0]), (said.seq, on_load)
        assert page.evaluate("window.__wsOpened") >= 1
        # The page's one socket went through nginx to one web worker.
        assert sorted([viewers_here(web1), viewers_here(web2)]) == [0, 1], (
            web1.problems(),
            web2.problems(),
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "through-nginx.png"), full_page=True)
    finally:
        browsing.finish()

    # The session is recorded by another process, the bridges worker, and neither web
    # worker recorded anything.
    fresh = AgentSession.objects.get(id=session.id)
    assert fresh.bridge_owner == "bridges-1"
    assert recorder.process.poll() is None, recorder.problems()
    # nginx logs a WebSocket once it has closed, a moment after the page did.
    access_log = crew_oc.data_dir / "nginx" / "access.log"
    wait_until(
        lambda: f"/ws/sessions/{session.id}/" in access_log.read_text(),
        15,
        "nginx to log the page's WebSocket",
    )
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"].endswith("RedisChannelLayer")
