"""The start page says how sandboxes are isolated, loudly when they are not."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from pytest_django.fixtures import Settings

from dashboard.agents.access import set_role
from dashboard.localsandbox.templatetags import localsandbox as tags
from tests.conftest import LocalSandbox, start_localsandbox, stop_localsandbox


@pytest.fixture
def operator_client(db: None) -> Client:
    user = User.objects.create_user("alice", password="pw-alice-123456")
    set_role(user, "operator")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture(autouse=True)
def fresh_answers() -> None:
    tags.forget()


def show_page(client: Client, settings: Settings, server: LocalSandbox | None) -> str:
    settings.OPENCOMPUTER_API_URL = server.api_url if server else ""
    settings.OPENCOMPUTER_API_KEY = server.api_key if server else ""
    return client.get(reverse("new_session")).content.decode()


def assert_shown(page: str, mode: str, says: str) -> None:
    assert f'data-isolation="{mode}"' in page
    assert says in page
    assert ('role="alert"' in page.split("data-isolation")[0].rsplit("<p", 1)[1]) == (
        mode in ("unsafe-none", "unavailable")
    )


def test_it_shows_the_isolation_the_sandbox_server_itself_reports(
    operator_client: Client, settings: Settings, localsandbox: LocalSandbox, tmp_path: Path
) -> None:
    # The web process's own settings say nothing about the server it talks to.
    settings.LOCALSANDBOX_BWRAP = "/missing/bwrap"
    assert_shown(
        show_page(operator_client, settings, localsandbox), "bubblewrap", "bubblewrap container"
    )
    missing = str(tmp_path / "missing" / "bwrap")
    for unsafe, mode, says in (
        ("false", "unavailable", "Agents cannot start"),
        ("true", "unsafe-none", "LOCALSANDBOX_UNSAFE_NO_ISOLATION"),
    ):
        server = start_localsandbox(
            tmp_path / f"ws-{unsafe}",
            env={"LOCALSANDBOX_BWRAP": missing, "LOCALSANDBOX_UNSAFE_NO_ISOLATION": unsafe},
        )
        settings.LOCALSANDBOX_BWRAP = "bwrap"
        try:
            assert_shown(show_page(operator_client, settings, server), mode, says)
        finally:
            stop_localsandbox(server)


def test_it_says_unknown_when_the_sandbox_server_does_not_answer(
    operator_client: Client, settings: Settings, tmp_path: Path
) -> None:
    server = start_localsandbox(tmp_path / "ws")
    stop_localsandbox(server)  # its port is now closed
    assert_shown(show_page(operator_client, settings, server), "unknown", "unknown")
    tags.forget()
    assert_shown(show_page(operator_client, settings, None), "unknown", "unknown")


def test_it_asks_the_server_once_in_a_while_not_on_every_page(
    operator_client: Client, settings: Settings, localsandbox: LocalSandbox
) -> None:
    assert_shown(
        show_page(operator_client, settings, localsandbox), "bubblewrap", "bubblewrap container"
    )
    settings.OPENCOMPUTER_API_KEY = "wrong"  # a new question would be refused now
    page = operator_client.get(reverse("new_session")).content.decode()
    assert 'data-isolation="bubblewrap"' in page


def test_it_names_the_cloud_when_the_server_is_not_the_embedded_one(
    operator_client: Client, settings: Settings, tmp_path: Path
) -> None:
    # A server without the embedded one's own endpoint (404 there), as OpenComputer's cloud.
    server = start_localsandbox(tmp_path / "ws")
    try:
        server.api_url += "/sandboxes/none"
        page = show_page(operator_client, settings, server)
        assert 'data-isolation="cloud"' in page and "microVM" in page
    finally:
        stop_localsandbox(server)
