"""Named people for the dashboard's tests, and Porthole pointed at the embedded server."""

from __future__ import annotations

import pytest
from channels.layers import get_channel_layer
from django.contrib.auth.models import User

from dashboard.agents.access import set_role
from dashboard.agents.recording import live_layer


def _user(username: str, role: str) -> User:
    user = User.objects.create_user(username, f"{username}@example.org", "password")
    set_role(user, role)
    return user


@pytest.fixture
def alice(db: None) -> User:
    """An operator: watches, starts, steers and shares."""
    return _user("alice", "operator")


@pytest.fixture
def bob(db: None) -> User:
    """A viewer: watches only."""
    return _user("bob", "viewer")


@pytest.fixture
def charlie(db: None) -> User:
    """Another operator, to tell who did what."""
    return _user("charlie", "operator")


@pytest.fixture
def dave(db: None) -> User:
    """An administrator."""
    return _user("dave", "admin")


@pytest.fixture
def erin(db: None) -> User:
    """Signed in, but nobody gave her a role yet."""
    return _user("erin", "")


@pytest.fixture
def oc(localsandbox, settings):  # type: ignore[no-untyped-def]
    """Porthole configured against the embedded sandbox server started for this run."""
    settings.OPENCOMPUTER_API_URL = localsandbox.api_url
    settings.OPENCOMPUTER_API_KEY = localsandbox.api_key
    return localsandbox


@pytest.fixture
def members(monkeypatch):  # type: ignore[no-untyped-def]
    """The channel layers' group members (the default layer's and the live streams'), as
    this process added and discarded them."""
    groups: dict[str, set[str]] = {}
    for layer in (get_channel_layer(), live_layer()):
        add, discard = layer.group_add, layer.group_discard

        async def group_add(group: str, channel: str, add=add) -> None:  # type: ignore[no-untyped-def]
            groups.setdefault(group, set()).add(channel)
            await add(group, channel)

        async def group_discard(group: str, channel: str, discard=discard) -> None:  # type: ignore[no-untyped-def]
            groups.get(group, set()).discard(channel)
            await discard(group, channel)

        monkeypatch.setattr(layer, "group_add", group_add)
        monkeypatch.setattr(layer, "group_discard", group_discard)
    return groups
