"""Who may do what: every route and socket × every kind of visitor, and the account pages."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pytest
from axes.utils import reset as axes_reset
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from dashboard.agents import access
from dashboard.agents.models import AgentSession, AuditEntry, Event, Sandbox, ShareLink
from dashboard.asgi import application
from tests.agents.helpers import Socket, communicator, session_cookie

PRINCIPALS = [
    "anonymous",
    "no_role",
    "viewer",
    "operator",
    "admin",
    "share_valid",
    "share_expired",
    "share_revoked",
    "share_other",
]


@dataclass
class World:
    session: AgentSession
    other: AgentSession
    foreign_sandbox: Sandbox
    own_link: ShareLink
    tokens: dict[str, str]
    users: dict[str, User | None]


def _make_world(alice, bob, dave, erin) -> World:  # type: ignore[no-untyped-def]
    own = Sandbox.objects.create(upstream_id="sb-own", created_by=alice)
    foreign = Sandbox.objects.create(upstream_id="sb-foreign")
    session = AgentSession.objects.create(sandbox=own, upstream_id="ses-1", title="one")
    other = AgentSession.objects.create(sandbox=own, upstream_id="ses-2", title="two")
    Event.objects.create(
        session=session, seq=1, source="agent", type="ready", raw='{"type":"ready"}'
    )
    AgentSession.objects.filter(id=session.id).update(next_seq=2)
    tokens = {}
    link, tokens["share_valid"] = access.create_share_link(session, alice, label="", expiry="1d")
    expired, tokens["share_expired"] = access.create_share_link(
        session, alice, label="", expiry="1h"
    )
    ShareLink.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(1))
    revoked, tokens["share_revoked"] = access.create_share_link(
        session, alice, label="", expiry="never"
    )
    ShareLink.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())
    _, tokens["share_other"] = access.create_share_link(other, alice, label="", expiry="1d")
    users = {"anonymous": None, "no_role": erin, "viewer": bob, "operator": alice, "admin": dave}
    return World(session, other, foreign, link, tokens, users)


@pytest.fixture
def world(oc, alice, bob, dave, erin) -> World:  # type: ignore[no-untyped-def]
    return _make_world(alice, bob, dave, erin)


def visitor(world: World, principal: str) -> Client:
    client = Client()
    user = world.users.get(principal)
    if user is not None:
        client.force_login(user)
    if principal.startswith("share_"):
        client.get(f"/share/{world.tokens[principal]}/")
    return client


def _routes(world: World) -> list[tuple[str, str, str, dict[str, str]]]:
    """(name, method, url, data) for every route of the product."""
    s, link = world.session, world.own_link
    return [
        ("index", "get", reverse("index"), {}),
        ("new_session", "get", reverse("new_session"), {}),
        ("session", "get", reverse("session", args=[s.id]), {}),
        ("older", "get", reverse("older_events", args=[s.id]) + "?before=2", {}),
        ("jsonl", "get", reverse("export_jsonl", args=[s.id]), {}),
        ("markdown", "get", reverse("export_markdown", args=[s.id]), {}),
        ("raw", "get", reverse("event_raw", args=[s.id, 1]), {}),
        ("sandboxes", "get", reverse("sandboxes"), {}),
        ("people", "get", reverse("people"), {}),
        ("admin", "get", "/admin/", {}),
        ("start", "post", reverse("new_session"), {"prompt": "x", "sandbox": "new"}),
        ("prompt", "post", reverse("session_prompt", args=[s.id]), {"text": "x"}),
        ("interrupt", "post", reverse("session_interrupt", args=[s.id]), {}),
        ("configure", "post", reverse("session_configure", args=[s.id]), {"model": "m"}),
        ("kill", "post", reverse("session_kill", args=[s.id]), {}),
        ("continue", "post", reverse("session_continue", args=[s.id]), {"prompt": "x"}),
        ("acknowledge", "post", reverse("session_acknowledge", args=[s.id]), {}),
        ("acknowledge_many", "post", reverse("sessions_acknowledge"), {"session": str(s.id)}),
        ("share_create", "post", reverse("share_create", args=[s.id]), {"expiry": "1h"}),
        ("share_revoke", "post", reverse("share_revoke", args=[link.pk]), {}),
        ("attach", "post", reverse("sandbox_attach", args=["sb-x", "ses-x"]), {}),
        (
            "kill_own_sandbox",
            "post",
            reverse("sandbox_kill", args=["sb-own"]),
            {"confirm": "sb-own"},
        ),
        (
            "kill_foreign_sandbox",
            "post",
            reverse("sandbox_kill", args=["sb-foreign"]),
            {"confirm": "sb-foreign"},
        ),
        ("add_person", "post", reverse("people"), {"username": "zed"}),
        (
            "change_role",
            "post",
            reverse("person_update", args=[world.users["viewer"].pk]),
            {"role": "admin", "active": "on"},
        ),
        ("share_page", "get", "/share/{token}/", {}),
        ("share_older", "get", "/share/{token}/older/?before=2", {}),
    ]


VIEWER_ROUTES = {"index", "session", "older", "jsonl", "markdown", "raw", "sandboxes"}
OPERATOR_ROUTES = VIEWER_ROUTES | {
    "new_session",
    "start",
    "prompt",
    "interrupt",
    "configure",
    "kill",
    "continue",
    "acknowledge",
    "acknowledge_many",
    "share_create",
    "share_revoke",
    "attach",
    "kill_own_sandbox",
}
ADMIN_ROUTES = OPERATOR_ROUTES | {"people", "add_person", "change_role", "kill_foreign_sandbox"}
SHARE_ROUTES = {"share_page", "share_older", "raw"}
ALLOWED = {
    "anonymous": set(),
    "no_role": set(),
    "viewer": VIEWER_ROUTES,
    "operator": OPERATOR_ROUTES,
    "admin": ADMIN_ROUTES | {"admin"},
    "share_valid": SHARE_ROUTES,
    "share_expired": set(),
    "share_revoked": set(),
    "share_other": {"share_page", "share_older"},  # its own session's page, not this one's
}


def _denied(response) -> bool:  # type: ignore[no-untyped-def]
    if response.status_code in (403, 404):
        return True
    location = response.get("Location", "") if response.status_code == 302 else ""
    return location.startswith(reverse("login")) or location.startswith("/admin/login/")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("principal", PRINCIPALS)
def test_it_allows_exactly_what_each_visitor_may_do(world, principal):
    wrong = []
    for name, method, url, data in _routes(world):
        client = visitor(world, principal)
        token = world.tokens.get(principal, "not-a-token")
        response = getattr(client, method)(url.format(token=token), data)
        response.close()  # as a server would: an unread download gives its slot back
        allowed = name in ALLOWED[principal]
        if allowed == _denied(response) or response.status_code >= 500:
            wrong.append(f"{name}: {response.status_code} {response.get('Location', '')}")
    assert not wrong, f"{principal}: " + "; ".join(wrong)


async def _socket_accepted(path: str, cookie: bytes | None) -> bool:
    socket = await communicator(path, cookie=cookie)
    connected, _ = await socket.connect()
    if connected:
        await socket.disconnect()
    return connected


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("principal", PRINCIPALS)
async def test_it_opens_exactly_the_sockets_each_visitor_may_open(world, principal):
    client = await database_sync_to_async(visitor)(world, principal)
    cookie = session_cookie(client)
    token = world.tokens.get(principal, "not-a-token")
    member = principal in ("viewer", "operator", "admin")
    expected = {
        "/ws/sessions/": member,
        f"/ws/sessions/{world.session.id}/": member,
        f"/ws/share/{token}/": principal in ("share_valid", "share_other"),
        f"/ws/share/{world.tokens['share_valid']}/": True,  # the token itself is the key
    }
    for path, allowed in expected.items():
        assert await _socket_accepted(path, cookie) == allowed, (principal, path)


# -- share links ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_shows_a_new_link_once_and_keeps_only_its_hash(oc, alice):
    session = AgentSession.objects.create(
        sandbox=Sandbox.objects.create(upstream_id="sb"), upstream_id="s", title="t"
    )
    client = Client()
    client.force_login(alice)
    response = client.post(
        reverse("share_create", args=[session.id]),
        {"label": "for the PR", "expiry": "7d"},
        headers={"HX-Request": "true"},
    )
    html = response.content.decode()
    token = html.split("/share/")[1].split("/")[0]
    link = ShareLink.objects.get()
    assert len(token) >= 40
    assert link.token_hash == access.hash_token(token) and token not in link.token_hash
    assert link.label == "for the PR" and link.created_by == alice
    assert timedelta(days=6) < link.expires_at - timezone.now() <= timedelta(days=7)
    again = client.get(session.get_absolute_url()).content.decode()
    assert token not in again and "for the PR" in again
    assert AuditEntry.objects.filter(action="share.create", actor=alice).exists()


@pytest.mark.django_db(transaction=True)
def test_it_counts_uses_and_shows_no_controls_on_a_shared_page(oc, alice):
    session = AgentSession.objects.create(
        sandbox=Sandbox.objects.create(upstream_id="sb"), upstream_id="s", title="Shared one"
    )
    link, token = access.create_share_link(session, alice, label="", expiry="never")
    for _ in range(2):
        html = Client().get(f"/share/{token}/").content.decode()
    link.refresh_from_db()
    assert link.use_count == 2 and link.last_used_at is not None
    assert "Shared one" in html and f'ws-connect="/ws/share/{token}/"' in html
    for control in ("session_prompt", "session_kill", "share_create", "export_jsonl"):
        assert reverse(control, args=[session.id]) not in html


@pytest.mark.django_db(transaction=True)
async def test_it_closes_open_link_sockets_when_the_link_is_revoked(oc, alice):
    session = await database_sync_to_async(AgentSession.objects.create)(
        sandbox=await database_sync_to_async(Sandbox.objects.create)(upstream_id="sb"),
        upstream_id="s",
    )
    link, token = await database_sync_to_async(access.create_share_link)(
        session, alice, label="", expiry="1d"
    )
    watcher = Socket(
        application,
        f"/ws/share/{token}/",
        headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")],
    )
    assert (await watcher.connect())[0]
    await watcher.send_json_to({"last_seq": 0})

    client = Client()
    await database_sync_to_async(client.force_login)(alice)
    await database_sync_to_async(client.post)(reverse("share_revoke", args=[link.pk]))

    while True:  # fragments may precede the close
        output = await watcher.receive_output(timeout=5)
        if output["type"] == "websocket.close":
            break
    assert output["code"] == 4403
    assert not await _socket_accepted(f"/ws/share/{token}/", None)


@pytest.mark.django_db(transaction=True)
async def test_it_closes_a_link_socket_when_the_link_expires(oc, alice):
    session = await database_sync_to_async(AgentSession.objects.create)(
        sandbox=await database_sync_to_async(Sandbox.objects.create)(upstream_id="sb"),
        upstream_id="s",
    )
    link, token = await database_sync_to_async(access.create_share_link)(
        session, alice, label="", expiry="1h"
    )
    await database_sync_to_async(ShareLink.objects.filter(pk=link.pk).update)(
        expires_at=timezone.now() + timedelta(seconds=0.5)
    )
    watcher = Socket(
        application,
        f"/ws/share/{token}/",
        headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")],
    )
    assert (await watcher.connect())[0]
    while True:
        output = await watcher.receive_output(timeout=5)
        if output["type"] == "websocket.close":
            break
    assert output["code"] == 4403


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("label", "said"),
    [
        ("x" * 101, "Label: Ensure this value has at most 100 characters (it has 101)."),
        ("a\x00b", "Label: Null characters are not allowed."),
    ],
)
def test_it_says_what_was_wrong_with_a_new_link(oc, alice, label, said):
    session = AgentSession.objects.create(
        sandbox=Sandbox.objects.create(upstream_id="sb"), upstream_id="s"
    )
    client = Client()
    client.force_login(alice)
    response = client.post(
        reverse("share_create", args=[session.id]),
        {"label": label, "expiry": "1h"},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200
    assert f'role="alert">{said}</p>' in response.content.decode()
    bad_expiry = client.post(
        reverse("share_create", args=[session.id]),
        {"label": "ok", "expiry": "forever"},
        headers={"HX-Request": "true"},
    ).content.decode()
    assert "Expires after: Select a valid choice." in bad_expiry
    assert not ShareLink.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_it_tells_nobody_who_may_not_share_which_links_exist(oc, alice, bob, erin):
    session = AgentSession.objects.create(
        sandbox=Sandbox.objects.create(upstream_id="sb"), upstream_id="s"
    )
    link, _ = access.create_share_link(session, alice, label="", expiry="1d")
    for person in (None, erin, bob):
        client = Client(enforce_csrf_checks=False)
        if person is not None:
            client.force_login(person)
        existing = client.post(reverse("share_revoke", args=[link.pk]))
        missing = client.post(reverse("share_revoke", args=[link.pk + 1000]))
        assert existing.status_code == missing.status_code == 403, person
    link.refresh_from_db()
    assert link.revoked_at is None


@pytest.mark.django_db(transaction=True)
def test_it_lets_only_the_creator_or_an_admin_revoke(oc, alice, charlie, dave):
    session = AgentSession.objects.create(
        sandbox=Sandbox.objects.create(upstream_id="sb"), upstream_id="s"
    )
    link, _ = access.create_share_link(session, alice, label="", expiry="1d")
    for person, status in ((charlie, 403), (dave, 302)):
        client = Client()
        client.force_login(person)
        assert client.post(reverse("share_revoke", args=[link.pk])).status_code == status
    link.refresh_from_db()
    assert link.revoked_by == dave


@pytest.mark.django_db(transaction=True)
async def test_it_says_who_is_watching(oc, alice, bob):
    session = await database_sync_to_async(AgentSession.objects.create)(
        sandbox=await database_sync_to_async(Sandbox.objects.create)(upstream_id="sb"),
        upstream_id="s",
    )
    _, token = await database_sync_to_async(access.create_share_link)(
        session, alice, label="", expiry="1d"
    )
    viewers = []
    for user in (alice, bob):
        client = Client()
        await database_sync_to_async(client.force_login)(user)
        viewers.append(
            Socket(
                application,
                f"/ws/sessions/{session.id}/",
                headers=[
                    (b"origin", b"http://localhost"),
                    (b"host", b"localhost"),
                    (b"cookie", session_cookie(client)),
                ],
            )
        )
    viewers.append(
        Socket(
            application,
            f"/ws/share/{token}/",
            headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")],
        )
    )
    for viewer in viewers:
        assert (await viewer.connect())[0]
        await viewer.send_json_to({"last_seq": 0})
    seen = ""
    while "alice, bob + 1 link viewer" not in seen:
        seen = await viewers[0].receive_from(timeout=5)
    await viewers[2].disconnect()
    while "alice, bob" not in seen or "link viewer" in seen:
        seen = await viewers[0].receive_from(timeout=5)
    for viewer in viewers[:2]:
        await viewer.disconnect()


# -- first run, sign-in, people ---------------------------------------------------------------


@pytest.mark.django_db
def test_it_offers_setup_only_with_the_printed_token_until_someone_has_an_account(
    settings, tmp_path
):
    settings.DATA_DIR = tmp_path
    token = access.setup_token(tmp_path)
    # Not even from loopback: a proxy on this machine would make everyone look local.
    assert Client(REMOTE_ADDR="127.0.0.1").get("/setup/").status_code == 404
    assert Client(REMOTE_ADDR="10.1.2.3").get("/setup/?token=wrong").status_code == 404
    client = Client(REMOTE_ADDR="10.1.2.3")
    assert client.get(f"/setup/?token={token}").status_code == 200
    password = "a long pass phrase 42"
    response = client.post(
        "/setup/",
        {
            "token": token,
            "username": "root",
            "email": "",
            "password1": password,
            "password2": password,
        },
    )
    assert response.status_code == 302
    root = User.objects.get(username="root")
    assert root.is_superuser and access.role_of(root) == "admin"
    assert client.get(f"/setup/?token={token}").status_code == 404
    assert client.get(reverse("index")).status_code == 200  # signed in as the new admin
    assert not (tmp_path / "setup-token").exists()


@pytest.mark.django_db
def test_it_rate_limits_failed_sign_ins(alice):
    axes_reset()
    client = Client()
    for attempt in range(1, 11):
        response = client.post(reverse("login"), {"username": "alice", "password": "wrong"})
        # The tenth failure is the one that locks (django-axes): it already says so.
        assert response.status_code == (429 if attempt == 10 else 200)
    response = client.post(reverse("login"), {"username": "alice", "password": "password"})
    assert response.status_code == 429
    assert "Too many failed sign-ins" in response.content.decode()
    # Django admin's sign-in is the same view, so it is no way around the limit.
    response = client.post("/admin/login/", {"username": "alice", "password": "password"})
    assert response.status_code == 429
    axes_reset()
    assert (
        client.post(reverse("login"), {"username": "alice", "password": "password"}).status_code
        == 302
    )


@pytest.mark.django_db
def test_it_clears_only_the_signed_in_persons_failures(alice, bob):
    """Axes' reset on success cleared every failure from the address: anyone with an
    account could sign in between guesses at someone else's password and never be locked."""
    axes_reset()
    client = Client()

    def sign_in(username: str, password: str) -> int:
        data = {"username": username, "password": password}
        return client.post(reverse("login"), data).status_code

    assert [sign_in("alice", "wrong") for _ in range(3)] == [200] * 3
    assert [sign_in("bob", "wrong") for _ in range(6)] == [200] * 6
    assert sign_in("alice", "password") == 302  # her three are gone, not bob's six
    client.post(reverse("logout"))
    assert [sign_in("bob", "wrong") for _ in range(3)] == [200] * 3
    assert sign_in("bob", "wrong") == 429  # the address's tenth failure
    axes_reset()


@pytest.mark.django_db
def test_it_lets_an_admin_add_people_and_change_roles(dave, bob):
    client = Client()
    client.force_login(dave)
    response = client.post(
        reverse("people"),
        {
            "username": "frank",
            "email": "",
            "password1": "another long phrase 7",
            "password2": "another long phrase 7",
            "role": "operator",
        },
    )
    assert response.status_code == 302
    assert access.role_of(User.objects.get(username="frank")) == "operator"
    client.post(reverse("person_update", args=[bob.pk]), {"role": "operator", "active": "on"})
    assert access.role_of(User.objects.get(pk=bob.pk)) == "operator"
    client.post(reverse("person_update", args=[bob.pk]), {"role": "viewer"})
    assert not User.objects.get(pk=bob.pk).is_active
    actions = set(AuditEntry.objects.values_list("action", flat=True))
    assert {"person.create", "person.update"} <= actions
    page = client.get(reverse("people")).content.decode()
    assert "frank" in page and "person.update" in page


@pytest.mark.django_db
def test_it_keeps_an_admin_from_demoting_themselves(dave):
    client = Client()
    client.force_login(dave)
    client.post(reverse("person_update", args=[dave.pk]), {"role": "viewer", "active": "on"})
    assert access.role_of(User.objects.get(pk=dave.pk)) == "admin"


# -- hardening -------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_sends_a_nonce_csp_and_security_headers_on_every_html_page(world):
    pages = [reverse("login"), f"/share/{world.tokens['share_valid']}/"]
    admin = visitor(world, "admin")
    member_pages = [
        reverse("index"),
        reverse("new_session"),
        world.session.get_absolute_url(),
        reverse("sandboxes"),
        reverse("people"),
    ]
    responses = [Client().get(p) for p in pages] + [admin.get(p) for p in member_pages]
    responses.append(Client().get("/no-such-page/"))
    for response in responses:
        if "text/html" not in response.get("Content-Type", ""):
            continue
        csp = response["Content-Security-Policy"]
        html = response.content.decode()
        if "<script" in html:
            assert "script-src 'self' 'nonce-" in csp
        assert "unsafe-eval" not in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert response["X-Content-Type-Options"] == "nosniff"
        assert response["Referrer-Policy"] in ("same-origin", "no-referrer")
        for tag in html.split("<script")[1:]:
            assert "nonce=" in tag.split(">")[0], "a script without the nonce"


@pytest.mark.django_db(transaction=True)
def test_it_refuses_every_mutation_without_a_csrf_token(world):
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.users["admin"])
    for name, method, url, data in _routes(world):
        if method != "post":
            continue
        response = client.post(url, data)
        assert response.status_code == 403, name
        assert b"CSRF" in response.content, name


@pytest.mark.django_db
def test_it_sends_hsts_over_https_only(alice):
    assert "Strict-Transport-Security" not in Client().get(reverse("login"))
    secure = Client().get(reverse("login"), secure=True)
    assert secure["Strict-Transport-Security"].startswith("max-age=31536000")


@pytest.mark.django_db(transaction=True)
async def test_it_closes_the_sockets_of_someone_whose_role_is_taken_away(oc, bob, dave):
    session = await database_sync_to_async(AgentSession.objects.create)(
        sandbox=await database_sync_to_async(Sandbox.objects.create)(upstream_id="sb"),
        upstream_id="s",
    )
    page = await communicator(f"/ws/sessions/{session.id}/", bob)
    listing = await communicator("/ws/sessions/", bob)
    for socket in (page, listing):
        assert (await socket.connect())[0]
    await page.send_json_to({"last_seq": 0})

    admin = Client()
    await database_sync_to_async(admin.force_login)(dave)
    await database_sync_to_async(admin.post)(
        reverse("person_update", args=[bob.pk]), {"role": "", "active": "on"}
    )
    for socket in (page, listing):
        while (output := await socket.receive_output(timeout=5))["type"] != "websocket.close":
            pass
        assert output["code"] == 4403
    assert not await _socket_accepted(f"/ws/sessions/{session.id}/", None)


@pytest.mark.django_db(transaction=True)
async def test_it_keeps_neighbouring_sessions_out_of_live_updates_for_link_holders(oc, alice):
    sandbox = await database_sync_to_async(Sandbox.objects.create)(upstream_id="sb")
    earlier = await database_sync_to_async(AgentSession.objects.create)(
        sandbox=sandbox, upstream_id="s1", title="The secret earlier task"
    )
    session = await database_sync_to_async(AgentSession.objects.create)(
        sandbox=sandbox, upstream_id="s2", title="Shared", resumed_from=earlier
    )
    _, token = await database_sync_to_async(access.create_share_link)(
        session, alice, label="", expiry="1d"
    )
    member = await communicator(f"/ws/sessions/{session.id}/", alice)
    stranger = await communicator(f"/ws/share/{token}/")
    for socket in (member, stranger):
        assert (await socket.connect())[0]
        await socket.send_json_to({"last_seq": 0})
    seen = {"member": "", "stranger": ""}
    for name, socket in (("member", member), ("stranger", stranger)):
        while 'id="session-state"' not in seen[name]:
            seen[name] += await socket.receive_from(timeout=5)
    assert "The secret earlier task" in seen["member"]
    assert "The secret earlier task" not in seen["stranger"]
    for socket in (member, stranger):
        await socket.disconnect()


@pytest.mark.django_db
def test_it_names_the_site_by_site_name_on_the_sign_in_page(settings):
    """Django's sign-in view names the site after the request's host ("Sign in to
    127.0.0.1:8000"), in the heading and the header's brand alike."""
    settings.SITE_NAME = "Acme agents"
    page = Client().get(reverse("login")).content.decode()
    assert "Sign in to Acme agents" in page
    assert "testserver" not in page


@pytest.mark.django_db
def test_it_refuses_and_misses_in_the_sites_own_layout(bob):
    """A refusal says why and a missing page says what to do, with the site's header and a
    way on; Django's bare pages left a share link's holder at a dead end after a revoke.
    The element an htmx request came from gets the message alone, not a whole page."""
    viewer = Client()
    viewer.force_login(bob)
    refused = viewer.get(reverse("new_session"))
    assert refused.status_code == 403
    page = refused.content.decode()
    assert 'class="brand"' in page and "Back to the sessions" in page
    assert "Not allowed" in page

    missing = viewer.get("/sessions/00000000-0000-4000-8000-000000000000/")
    assert missing.status_code == 404
    assert "nothing you may see" in missing.content.decode()
    assert "AgentSession" not in missing.content.decode()  # no model or query named

    gone = Client().get("/share/no-such-token/")
    assert gone.status_code == 404
    assert "revoked or it expired" in gone.content.decode()
    assert "Sign in" in gone.content.decode()

    session = AgentSession.objects.create(
        sandbox=Sandbox.objects.create(upstream_id="sb"), upstream_id="s", title="t"
    )
    fragment = viewer.post(reverse("session_kill", args=[session.id]), HTTP_HX_REQUEST="true")
    assert fragment.status_code == 403
    body = fragment.content.decode()
    assert body.startswith('<p class="error" role="alert">') and "<html" not in body


@pytest.mark.django_db
def test_it_logs_a_refusal_in_one_line_without_a_traceback(bob, caplog):
    viewer = Client()
    viewer.force_login(bob)
    assert viewer.get(reverse("new_session")).status_code == 403
    (line,) = [r for r in caplog.records if r.name == "django.request"]
    assert line.getMessage() == "Forbidden (Permission denied): /sessions/new/"
    assert line.exc_info is None
