"""Share links as an outsider holds them: they die with their creator's right to share, they
show no teammate's name, and a new link's token never travels in a readable cookie."""

from __future__ import annotations

from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Group, User
from django.contrib.messages.storage.cookie import MessageSerializer
from django.core import signing
from django.test import Client
from django.urls import reverse

from dashboard.agents import access
from dashboard.agents.models import AgentSession, AuditEntry, Sandbox, ShareLink
from tests.agents.helpers import communicator

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


def _session(starter: User | None = None) -> AgentSession:
    sandbox = Sandbox.objects.create(upstream_id="sb-shared")
    return AgentSession.objects.create(
        sandbox=sandbox, upstream_id="ses-shared", title="Shared work", started_by=starter
    )


def _signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _change(admin: User, person: User, *, role: str, active: bool) -> None:
    """What an administrator does on the People page."""
    data = {"role": role, **({"active": "on"} if active else {})}
    response = _signed_in(admin).post(reverse("person_update", args=[person.pk]), data)
    assert response.status_code == 302


def _admin_change_form(admin: Client, person: User, **changes: Any) -> dict[str, Any]:
    """Django admin's change form for a user as the page fills it, with `changes` applied."""
    person.refresh_from_db()
    data: dict[str, Any] = {
        "username": person.username,
        "first_name": person.first_name,
        "last_name": person.last_name,
        "email": person.email,
        "is_staff": "on" if person.is_staff else "",
        "is_superuser": "on" if person.is_superuser else "",
        "groups": [str(g.pk) for g in person.groups.all()],
        "user_permissions": [],
        "last_login_0": "",
        "last_login_1": "",
        "date_joined_0": person.date_joined.strftime("%Y-%m-%d"),
        "date_joined_1": person.date_joined.strftime("%H:%M:%S"),
        "is_active": "on" if person.is_active else "",
    }
    data.update(changes)
    # A browser leaves unticked boxes out; empty text fields may go too.
    return {k: v for k, v in data.items() if v != ""}


def _readable(value: str) -> str:
    """A cookie as anyone holding it can read it: the messages cookie is signed, not sealed."""
    signer = signing.get_cookie_signer(salt="django.contrib.messages")
    try:
        return repr(signer.unsign_object(value, serializer=MessageSerializer))
    except signing.BadSignature:
        return value


async def _closed(socket: WebsocketCommunicator) -> int:
    """Read until the socket closes (fragments may come first); its close code."""
    while (output := await socket.receive_output(timeout=10))["type"] != "websocket.close":
        pass
    return int(output.get("code", 1000))


# -- links die with their creator's right to share -------------------------------------------------


@pytest.mark.parametrize(
    "change", [{"role": "operator", "active": False}, {"role": "viewer", "active": True}]
)
def test_it_stops_a_never_expiring_link_when_its_creator_may_no_longer_share(
    oc, alice, dave, change
):
    session = _session(alice)
    link, token = access.create_share_link(session, alice, label="", expiry="never")
    holder = Client()
    assert holder.get(f"/share/{token}/").status_code == 200
    assert holder.get(reverse("event_raw", args=[session.id, 1])).status_code == 404  # no event

    _change(dave, alice, **change)

    assert holder.get(f"/share/{token}/").status_code == 404
    assert holder.get(f"/share/{token}/older/?before=5").status_code == 404
    # The link stays dead when the creator gets the role back: it died, it did not pause.
    _change(dave, alice, role="operator", active=True)
    assert Client().get(f"/share/{token}/").status_code == 404
    link.refresh_from_db()
    assert link.revoked_at is not None
    assert AuditEntry.objects.filter(action="share.revoke", target=str(session.id)).exists()


def test_it_stops_a_link_whose_creator_lost_the_right_where_no_hook_sees_it(oc, alice):
    """A role's permission deleted in bulk (no signal fires): the check on use still holds."""
    session = _session(alice)
    link, token = access.create_share_link(session, alice, label="", expiry="never")
    operator = access.role_group("operator")
    share = operator.permissions.get(codename="share_agentsession")
    granted = Group.permissions.through.objects.filter(group=operator, permission=share)
    granted.delete()
    try:
        assert Client().get(f"/share/{token}/").status_code == 404
        link.refresh_from_db()
        assert link.revoked_at is None  # nothing saw it happen: refused on use all the same
    finally:
        operator.permissions.add(share)
    assert Client().get(f"/share/{token}/").status_code == 200


def test_it_ends_the_links_of_everyone_whose_role_loses_the_right(oc, alice, charlie):
    """A role's permissions edited in Django admin: its members' links die, sockets close."""
    session = _session(alice)
    links = [
        access.create_share_link(session, person, label="", expiry="never")
        for person in (alice, charlie)
    ]
    operator = access.role_group("operator")
    share = operator.permissions.get(codename="share_agentsession")
    operator.permissions.remove(share)
    try:
        for link, token in links:
            assert Client().get(f"/share/{token}/").status_code == 404
            link.refresh_from_db()
            assert link.revoked_at is not None
    finally:
        operator.permissions.add(share)


def test_it_keeps_a_link_alive_when_an_admin_revokes_nothing(oc, alice, bob, dave):
    """Changing somebody else's role leaves alice's links alone."""
    session = _session(alice)
    _, token = access.create_share_link(session, alice, label="", expiry="never")
    _change(dave, bob, role="operator", active=True)
    _change(dave, alice, role="admin", active=True)
    assert Client().get(f"/share/{token}/").status_code == 200


@pytest.mark.parametrize("how", ["people", "admin"])
async def test_it_closes_open_link_sockets_when_the_creator_loses_the_right(oc, alice, dave, how):
    session = await database_sync_to_async(_session)(alice)
    _, token = await database_sync_to_async(access.create_share_link)(
        session, alice, label="", expiry="never"
    )
    watcher = await communicator(f"/ws/share/{token}/")
    assert (await watcher.connect())[0]
    await watcher.send_json_to({"last_seq": 0})

    def take_it_away() -> None:
        if how == "people":
            _change(dave, alice, role="viewer", active=True)
        else:  # Django admin's own user page, by a superuser: deactivated there
            root = User.objects.create_superuser("root", "root@example.org", "password")
            admin = _signed_in(root)
            url = f"/admin/auth/user/{alice.pk}/change/"
            response = admin.post(url, _admin_change_form(admin, alice, is_active=""))
            assert response.status_code == 302, response.content.decode()[:3000]
            assert not User.objects.get(pk=alice.pk).is_active

    await database_sync_to_async(take_it_away)()
    assert await _closed(watcher) == 4403
    again = await communicator(f"/ws/share/{token}/")
    assert not (await again.connect())[0]


async def test_it_closes_link_sockets_when_the_creator_is_deleted(oc, alice):
    session = await database_sync_to_async(_session)(alice)
    link, token = await database_sync_to_async(access.create_share_link)(
        session, alice, label="", expiry="never"
    )
    watcher = await communicator(f"/ws/share/{token}/")
    assert (await watcher.connect())[0]
    await watcher.send_json_to({"last_seq": 0})
    await User.objects.filter(pk=alice.pk).adelete()
    assert await _closed(watcher) == 4403
    assert (await ShareLink.objects.aget(pk=link.pk)).revoked_at is not None


# -- no names for outsiders ------------------------------------------------------------------------


def test_it_shows_a_link_holder_no_starters_name(oc, alice):
    session = _session(alice)
    _, token = access.create_share_link(session, alice, label="", expiry="1d")
    shared = Client().get(f"/share/{token}/").content.decode()
    assert "Shared work" in shared
    assert "alice" not in shared
    assert "a teammate" in shared
    member = _signed_in(alice).get(session.get_absolute_url()).content.decode()
    assert "alice" in member


async def test_it_tells_a_link_holder_how_many_teammates_watch_not_who(oc, alice, bob):
    session = await database_sync_to_async(_session)(alice)
    _, token = await database_sync_to_async(access.create_share_link)(
        session, alice, label="", expiry="1d"
    )
    sockets = [
        await communicator(f"/ws/sessions/{session.id}/", alice),
        await communicator(f"/ws/sessions/{session.id}/", bob),
        await communicator(f"/ws/share/{token}/"),
    ]
    for socket in sockets:
        assert (await socket.connect())[0]
        await socket.send_json_to({"last_seq": 0})
    member, outsider = "", ""
    while "alice, bob + 1 link viewer" not in member:
        member = await sockets[0].receive_from(timeout=5)
    received = []
    while "2 teammates + 1 link viewer" not in outsider:
        outsider = await sockets[2].receive_from(timeout=5)
        received.append(outsider)
    everything = "".join(received)
    assert "alice" not in everything and "bob" not in everything
    for socket in sockets:
        await socket.disconnect()


# -- the token stays on the server -----------------------------------------------------------------


def test_it_shows_a_link_made_without_htmx_once_and_keeps_it_out_of_cookies(oc, alice):
    session = _session(alice)
    client = _signed_in(alice)
    response = client.post(reverse("share_create", args=[session.id]), {"expiry": "7d"})
    assert response.status_code == 302
    for morsel in response.cookies.values():
        assert "/share/" not in _readable(morsel.value), morsel.key
    page = client.get(response.url).content.decode()
    token = page.split("/share/")[1].split("/")[0]
    assert ShareLink.objects.get().token_hash == access.hash_token(token)
    assert "shown only once" in page
    assert token not in client.get(response.url).content.decode()


def test_it_keeps_a_new_links_token_on_the_server_for_one_page_only(oc, alice):
    from django.contrib.sessions.models import Session

    session = _session(alice)
    other = AgentSession.objects.create(sandbox=session.sandbox, upstream_id="ses-other")
    client = _signed_in(alice)
    response = client.post(reverse("share_create", args=[session.id]), {"expiry": "7d"})
    assert response.status_code == 302

    def stored() -> str:
        return "".join(str(s.get_decoded()) for s in Session.objects.all())

    assert "/share/" not in stored(), "the token alone is kept, not a ready-made URL"
    # The browser goes elsewhere instead of following the redirect: the token is dropped.
    assert client.get(other.get_absolute_url()).status_code == 200
    assert "porthole_new_share_link" not in stored()
    assert "shown only once" not in client.get(response.url).content.decode()


# -- sockets close whoever takes the right away ----------------------------------------------------


@pytest.mark.parametrize("how", ["shell", "admin", "group deleted"])
async def test_it_closes_the_sockets_of_someone_who_may_no_longer_view(oc, bob, how):
    session = await database_sync_to_async(_session)()
    page = await communicator(f"/ws/sessions/{session.id}/", bob)
    listing = await communicator("/ws/sessions/", bob)
    for socket in (page, listing):
        assert (await socket.connect())[0]
    await page.send_json_to({"last_seq": 0})

    def take_it_away() -> None:
        if how == "shell":
            User.objects.get(pk=bob.pk).groups.clear()
        elif how == "admin":  # a superuser empties the person's groups on Django admin's page
            root = User.objects.create_superuser("root", "root@example.org", "password")
            admin = _signed_in(root)
            url = f"/admin/auth/user/{bob.pk}/change/"
            response = admin.post(url, {**_admin_change_form(admin, bob), "groups": []})
            assert response.status_code == 302, response.content.decode()[:3000]
        else:  # deleting a group removes its members without any m2m signal
            Group.objects.get(name="viewer").delete()
        assert not access.can_view(User.objects.get(pk=bob.pk))

    await database_sync_to_async(take_it_away)()
    assert await _closed(page) == 4403
    assert await _closed(listing) == 4403


async def test_it_closes_link_sockets_when_the_creators_group_is_deleted(oc, alice, charlie):
    session = await database_sync_to_async(_session)(alice)
    link, token = await database_sync_to_async(access.create_share_link)(
        session, alice, label="", expiry="never"
    )
    watcher = await communicator(f"/ws/share/{token}/")
    assert (await watcher.connect())[0]
    await watcher.send_json_to({"last_seq": 0})

    await Group.objects.filter(name="operator").adelete()

    assert await _closed(watcher) == 4403
    assert (await ShareLink.objects.aget(pk=link.pk)).revoked_at is not None


async def test_it_closes_the_sockets_of_an_operator_made_a_viewer(oc, alice, dave):
    """The page was authorised to steer: it closes, and a reload shows what a viewer sees."""
    session = await database_sync_to_async(_session)()
    page = await communicator(f"/ws/sessions/{session.id}/", alice)
    assert (await page.connect())[0]
    await page.send_json_to({"last_seq": 0})
    await database_sync_to_async(_change)(dave, alice, role="viewer", active=True)
    assert await _closed(page) == 4403
