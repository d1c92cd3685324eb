"""Named people for the dashboard's tests, and Porthole pointed at the embedded server."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User

from dashboard.agents.access import set_role


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
