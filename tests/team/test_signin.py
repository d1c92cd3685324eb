"""Sign-in limits behind a proxy (django-axes): by client address and by (address, username);
a correct password of someone who did not fail is never refused; forwarded headers are
believed only from trusted proxies."""

from __future__ import annotations

import secrets

import pytest
from axes.models import AccessAttempt  # type: ignore[import-untyped]
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from dashboard.proxies import forwarded_client, parse_networks

pytestmark = pytest.mark.django_db

PROXY = "10.0.0.5"
ATTACKER = "203.0.113.66"
OFFICE = "198.51.100.7"


@pytest.fixture(autouse=True)
def behind_a_proxy(settings) -> None:  # type: ignore[no-untyped-def]
    settings.PORTHOLE_TRUSTED_PROXIES = ["10.0.0.0/24"]


def _sign_in(username: str, password: str, client_ip: str, *, path: str = "") -> int:
    """One sign-in through the trusted proxy, from `client_ip`, with a fresh browser."""
    response = Client(REMOTE_ADDR=PROXY, HTTP_X_FORWARDED_FOR=client_ip).post(
        path or reverse("login"), {"username": username, "password": password}
    )
    return response.status_code


def test_it_keeps_everyone_else_signing_in_after_ten_failures_from_one_address(
    alice: User, charlie: User
) -> None:
    for attempt in range(1, 11):  # the tenth failure locks, and says so
        expected = 429 if attempt == 10 else 200
        assert _sign_in(secrets.token_hex(6), "wrong", ATTACKER) == expected
    # The attacker's address is over the limit now, for anyone it tries…
    assert _sign_in(secrets.token_hex(6), "wrong", ATTACKER) == 429
    assert _sign_in("alice", "wrong", ATTACKER) == 429
    # …but the proxy is not the client: others sign in from elsewhere,
    assert _sign_in("alice", "password", OFFICE) == 302
    assert _sign_in("charlie", "password", OFFICE, path="/admin/login/") in (200, 302)
    # and even from that address a correct password of someone who did not fail works.
    assert _sign_in("charlie", "password", ATTACKER) == 302


def test_it_locks_a_username_from_the_address_that_failed_it_only(alice: User) -> None:
    for attempt in range(1, 11):
        assert _sign_in("alice", "wrong", ATTACKER) == (429 if attempt == 10 else 200)
    # alice did fail (from there): even her right password waits there, Django admin included.
    assert _sign_in("alice", "password", ATTACKER) == 429
    assert _sign_in("alice", "password", ATTACKER, path="/admin/login/") == 429
    # From her own address she signs in, and that clears her own count.
    assert _sign_in("alice", "password", OFFICE) == 302


def test_it_ignores_a_forged_forwarded_for_from_an_untrusted_peer(alice: User) -> None:
    forger = "192.0.2.10"  # not a trusted proxy: its X-Forwarded-For means nothing
    for attempt in range(1, 11):
        response = Client(REMOTE_ADDR=forger, HTTP_X_FORWARDED_FOR=f"198.51.100.{attempt}").post(
            reverse("login"), {"username": secrets.token_hex(6), "password": "wrong"}
        )
        assert response.status_code == (429 if attempt == 10 else 200)
    recorded = set(AccessAttempt.objects.values_list("ip_address", flat=True))
    assert recorded == {forger}
    # Rotating forged addresses did not dodge the limit: the forger's own address is locked.
    forged = Client(REMOTE_ADDR=forger, HTTP_X_FORWARDED_FOR=OFFICE).post(
        reverse("login"), {"username": "nobody", "password": "wrong"}
    )
    assert forged.status_code == 429
    # A forged X-Forwarded-Proto does not make a plain-HTTP request secure either.
    page = Client(REMOTE_ADDR=forger, HTTP_X_FORWARDED_PROTO="https").get(reverse("login"))
    assert page.status_code == 200
    assert "Strict-Transport-Security" not in page.headers


def test_it_believes_the_forwarded_scheme_from_a_trusted_proxy(db: None) -> None:
    page = Client(REMOTE_ADDR=PROXY, HTTP_X_FORWARDED_PROTO="https").get(reverse("login"))
    assert page.status_code == 200
    assert "Strict-Transport-Security" in page.headers


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        ("198.51.100.7", "198.51.100.7"),
        # A client-supplied first hop is ignored: the nearest untrusted address counts.
        ("1.2.3.4, 198.51.100.7", "198.51.100.7"),
        # Through two trusted proxies.
        ("198.51.100.7, 10.0.0.9", "198.51.100.7"),
        # Garbage stops the walk at the last believable hop.
        ("198.51.100.7, not-an-ip", PROXY),
        ("", PROXY),
    ],
)
def test_it_walks_forwarded_for_from_the_right(forwarded: str, client: str) -> None:
    assert forwarded_client(PROXY, forwarded, parse_networks(["10.0.0.0/24"], "x")) == client
