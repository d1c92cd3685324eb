"""Who may do what: roles, share links, the audit log, and the first-run rules.

Roles are Django groups made by a migration (viewer, operator, admin); code asks for
permissions, never for group names, so a custom group with the same permissions works.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser, Group, Permission, User
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import Http404, HttpRequest
from django.utils import timezone

from dashboard.agents.models import AgentSession, AuditEntry, Sandbox, ShareLink

ROLES = ("viewer", "operator", "admin")
_VIEW = ["view_agentsession", "view_sandbox", "view_event"]
_OPERATE = [*_VIEW, "steer_agentsession", "share_agentsession"]
ROLE_PERMISSIONS = {
    "viewer": _VIEW,
    "operator": _OPERATE,
    "admin": [
        *_OPERATE,
        "revoke_any_sharelink",
        "kill_any_sandbox",
        "manage_people",
        "view_auditentry",
    ],
}
SHARE_SESSION_KEY = "porthole_share_links"
# Who a request or a socket is: signed in or not. Creators, actors and role holders are Users.
Person = User | AnonymousUser
EXPIRIES = {
    "1h": ("1 hour", timedelta(hours=1)),
    "1d": ("1 day", timedelta(days=1)),
    "7d": ("7 days", timedelta(days=7)),
    "never": ("never", None),
}


# -- permissions ---------------------------------------------------------------------------------


def can_view(user: Person) -> bool:
    return bool(
        user.is_authenticated and user.is_active and user.has_perm("agents.view_agentsession")
    )


def can_steer(user: Person) -> bool:
    return bool(user.is_authenticated and user.has_perm("agents.steer_agentsession"))


def can_share(user: Person) -> bool:
    return bool(user.is_authenticated and user.has_perm("agents.share_agentsession"))


def can_manage_people(user: Person) -> bool:
    return bool(user.is_authenticated and user.has_perm("agents.manage_people"))


def can_kill_sandbox(user: Person, sandbox: Sandbox | None) -> bool:
    if not can_steer(user):
        return False
    if user.has_perm("agents.kill_any_sandbox"):
        return True
    return sandbox is not None and sandbox.created_by_id == user.pk


def can_revoke(user: Person, link: ShareLink) -> bool:
    if not can_share(user):
        return False
    return bool(link.created_by_id == user.pk or user.has_perm("agents.revoke_any_sharelink"))


def require(check: Callable[[Person], bool], message: str) -> Callable[[Person], None]:
    def enforce(user: Person) -> None:
        if not check(user):
            raise PermissionDenied(message)

    return enforce


require_view = require(can_view, "You have no role here yet: ask an administrator for one.")
require_steer = require(can_steer, "You may watch sessions but not steer them.")
require_share = require(can_share, "You may not share sessions.")
require_people = require(can_manage_people, "Only administrators manage people.")


def viewer_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """login_required, then the viewer permission (a signed-in user without a role gets 403)."""
    from django.contrib.auth.decorators import login_required

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        require_view(request.user)
        return view(request, *args, **kwargs)

    return login_required(wrapper)


# -- objects with what the user may do with them (healthchecks' `_get_check_for_user`) ------------


@dataclass(frozen=True)
class SessionRights:
    """What the person looking at one session may do with it."""

    member: bool = False  # a team member; False for a share link's holder (read-only)
    steer: bool = False
    share: bool = False
    kill_sandbox: bool = False


READ_ONLY = SessionRights()


def session_for_user(user: Person, session_id: UUID | str) -> tuple[AgentSession, SessionRights]:
    """The session and what `user` may do with it.

    PermissionDenied without the viewer role; Http404 when there is no such session.
    """
    require_view(user)
    session = (
        AgentSession.objects.select_related("sandbox", "started_by", "resumed_from")
        .filter(id=session_id)
        .first()
    )
    if session is None:
        raise Http404("No such session.")
    return session, SessionRights(
        member=True,
        steer=can_steer(user),
        share=can_share(user),
        kill_sandbox=can_kill_sandbox(user, session.sandbox),
    )


def viewable_session(
    user: object, session_id: UUID | str
) -> tuple[AgentSession, SessionRights] | None:
    """`session_for_user` for sockets, which refuse rather than raise: None if not allowed.
    `user` is the socket's scope user (lazy, or missing without the auth middleware)."""
    if not isinstance(user, User | AnonymousUser):
        return None
    try:
        return session_for_user(user, session_id)
    except (PermissionDenied, Http404):
        return None


def session_for_link(token: str) -> tuple[ShareLink, AgentSession, SessionRights]:
    """The live link, its session, and what its holder may do: watch. Http404 otherwise."""
    link = active_link(token)
    if link is None:
        raise Http404("This link is not valid: it may have expired or been revoked.")
    return link, link.session, READ_ONLY


def link_for_user(user: Person, link_id: int) -> tuple[ShareLink, bool]:
    """The share link and whether `user` may revoke it. Http404 when there is none."""
    link = ShareLink.objects.select_related("session").filter(pk=link_id).first()
    if link is None:
        raise Http404("No such link.")
    return link, can_revoke(user, link)


def may_see_session(request: HttpRequest, session_id: UUID | str) -> bool:
    """A team member, or a browser that opened a live share link of this very session."""
    return can_view(request.user) or shares_session(request, session_id)


def sandbox_for_user(user: Person, upstream_id: str) -> tuple[Sandbox | None, bool]:
    """The sandbox Porthole knows by this upstream id (None if it never recorded it), and
    whether `user` may kill it. PermissionDenied without the operator role."""
    require_steer(user)
    sandbox = Sandbox.objects.filter(upstream_id=upstream_id).first()
    return sandbox, can_kill_sandbox(user, sandbox)


# -- roles ---------------------------------------------------------------------------------------


def role_of(user: User) -> str:
    if user.is_superuser:
        return "admin"
    names = {g.name for g in user.groups.all()}
    for role in reversed(ROLES):
        if role in names:
            return role
    return ""


def role_group(role: str) -> Group:
    """The role's group; made again if someone deleted it (the migration made it first)."""
    group, created = Group.objects.get_or_create(name=role)
    if created:
        group.permissions.set(
            Permission.objects.filter(
                content_type__app_label="agents", codename__in=ROLE_PERMISSIONS[role]
            )
        )
    return group


def set_role(user: User, role: str) -> None:
    if role and role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    with transaction.atomic():
        user.groups.remove(*Group.objects.filter(name__in=ROLES))
        if role:
            user.groups.add(role_group(role))
        # Administrators may also use Django's admin pages.
        is_staff = role == "admin" or user.is_superuser
        if user.is_staff != is_staff:
            user.is_staff = is_staff
            user.save(update_fields=["is_staff"])


# -- share links ---------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_share_link(
    session: AgentSession, user: User, *, label: str, expiry: str
) -> tuple[ShareLink, str]:
    """A new link and its token; the token is shown once and never stored."""
    token = secrets.token_urlsafe(32)
    lifetime = EXPIRIES[expiry][1]
    link = ShareLink.objects.create(
        session=session,
        token_hash=hash_token(token),
        label=label,
        created_by=user,
        expires_at=timezone.now() + lifetime if lifetime else None,
    )
    return link, token


def link_is_live(link: ShareLink) -> bool:
    """Neither revoked nor expired, and its creator may still share: a link dies with its
    creator's right to share (checked here, on every use, whatever took the right away)."""
    return link.is_active and link.created_by is not None and can_share(link.created_by)


TOKEN_MAX_LENGTH = 200  # ours are 43 characters; anything much longer is not worth hashing


def plausible_token(token: str) -> bool:
    """Whether `token` could be a share link's at all (checked before any hashing or query)."""
    return 0 < len(token) <= TOKEN_MAX_LENGTH


def active_link(token: str) -> ShareLink | None:
    if not plausible_token(token):
        return None
    link = (
        ShareLink.objects.select_related(
            "session", "session__sandbox", "session__started_by", "created_by"
        )
        .filter(token_hash=hash_token(token))
        .first()
    )
    return link if link is not None and link_is_live(link) else None


def remember_share(request: HttpRequest, link: ShareLink) -> None:
    """Let this browser fetch the shared session's full payloads (the `event_raw` links)."""
    held = set(request.session.get(SHARE_SESSION_KEY, []))
    held.add(link.pk)
    request.session[SHARE_SESSION_KEY] = sorted(held)


def shares_session(request: HttpRequest, session_id: UUID | str) -> bool:
    held = request.session.get(SHARE_SESSION_KEY, [])
    if not held:
        return False
    links = ShareLink.objects.filter(pk__in=held, session_id=UUID(str(session_id))).select_related(
        "created_by"
    )
    return any(link_is_live(link) for link in links)


# -- first run -----------------------------------------------------------------------------------


def needs_setup() -> bool:
    return not get_user_model().objects.exists()


# -- audit ---------------------------------------------------------------------------------------


def audit(actor: Person | None, action: str, target: object = "", **details: Any) -> None:
    AuditEntry.objects.create(
        actor=actor if isinstance(actor, User) else None,
        action=action,
        target=str(target)[:200],
        details=details,
    )


def setup_token(data_dir: str | os.PathLike[str]) -> str:
    """The one-time token that opens /setup/ from elsewhere than this machine."""
    from pathlib import Path

    path = Path(data_dir) / "setup-token"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    path.write_text(token)
    path.chmod(0o600)
    return token


def forget_setup_token(data_dir: str | os.PathLike[str]) -> None:
    from pathlib import Path

    (Path(data_dir) / "setup-token").unlink(missing_ok=True)
