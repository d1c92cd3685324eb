"""Named people for the dashboard's tests, and Porthole pointed at the embedded server."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User


def _user(username: str, *perms: str) -> User:
    user = User.objects.create_user(username, f"{username}@example.org", "password")
    if perms:
        user.user_permissions.add(*Permission.objects.filter(codename__in=perms))
    return user


@pytest.fixture
def alice(db: None) -> User:
    """An operator: watches, starts and steers."""
    return _user("alice", "steer_agentsession", "share_agentsession")


@pytest.fixture
def bob(db: None) -> User:
    """A viewer: watches only."""
    return _user("bob")


@pytest.fixture
def charlie(db: None) -> User:
    """Another operator, to tell who did what."""
    return _user("charlie", "steer_agentsession")


@pytest.fixture
def oc(localsandbox, settings):  # type: ignore[no-untyped-def]
    """Porthole configured against the embedded sandbox server started for this run."""
    settings.OPENCOMPUTER_API_URL = localsandbox.api_url
    settings.OPENCOMPUTER_API_KEY = localsandbox.api_key
    return localsandbox
