"""The start page says how sandboxes are isolated, loudly when they are not."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from pytest_django.fixtures import Settings

from dashboard.agents.access import set_role
from dashboard.localsandbox.templatetags import localsandbox as tags


@pytest.fixture
def operator_client(db: None) -> Client:
    user = User.objects.create_user("alice", password="pw-alice-123456")
    set_role(user, "operator")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture(autouse=True)
def fresh_probe() -> None:
    tags._probe.cache_clear()


@pytest.mark.parametrize(
    ("bwrap", "unsafe", "mode", "says"),
    [
        ("bwrap", False, "bubblewrap", "bubblewrap container"),
        ("/missing/bwrap", False, "unavailable", "Agents cannot start"),
        ("/missing/bwrap", True, "unsafe-none", "LOCALSANDBOX_UNSAFE_NO_ISOLATION"),
    ],
)
def test_it_shows_which_isolation_is_in_force(
    operator_client: Client,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    bwrap: str,
    unsafe: bool,
    mode: str,
    says: str,
) -> None:
    monkeypatch.delenv("OPENCOMPUTER_API_URL", raising=False)
    settings.LOCALSANDBOX_BWRAP = bwrap
    settings.LOCALSANDBOX_UNSAFE_NO_ISOLATION = unsafe
    page = operator_client.get(reverse("new_session")).content.decode()
    assert f'data-isolation="{mode}"' in page
    assert says in page
    assert ('role="alert"' in page.split("data-isolation")[0].rsplit("<p", 1)[1]) == (
        mode != "bubblewrap"
    )


def test_it_names_the_cloud_when_porthole_uses_it(
    operator_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENCOMPUTER_API_URL", "https://app.opencomputer.dev/api")
    page = operator_client.get(reverse("new_session")).content.decode()
    assert 'data-isolation="cloud"' in page and "microVM" in page
