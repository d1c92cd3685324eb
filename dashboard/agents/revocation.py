"""When someone's rights shrink, what they opened closes at once, whoever changed them.

Hooked on the models, not on the People page: Django admin, a shell or a script that
deactivates a user or takes a role away has the same effect.

- Deactivated: every Django session of theirs is deleted (signed out in every browser, and
  still signed out if they are made active again).
- No longer allowed to view (deactivated, role or group taken away, the group deleted) or
  to steer: every socket of theirs closes (`user.revoked`); the page was authorised for
  what they could do before. This is the only place that sends it: the People page, Django
  admin and a shell all end up here.
- No longer allowed to share: the links they created die (revoked, audited) and every
  socket open through them closes. Links are also checked on every use
  (`access.link_is_live`), which catches what no hook sees, such as a group's
  permissions edited in Django admin.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from importlib import import_module
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.contrib.sessions.models import Session
from django.db import transaction
from django.db.models.signals import m2m_changed, post_save, pre_delete
from django.dispatch import receiver
from django.utils import timezone

from dashboard.agents import access, sharing
from dashboard.agents.models import ShareLink
from dashboard.agents.recording import user_group

log = logging.getLogger(__name__)

# Saving only these fields cannot change what anyone may do (a sign-in saves last_login).
_HARMLESS_FIELDS = {"last_login", "password", "email", "first_name", "last_name"}
_DB_SESSION_ENGINES = {
    "django.contrib.sessions.backends.db",
    "django.contrib.sessions.backends.cached_db",
}


def rights_changed(user_ids: Iterable[Any]) -> None:
    """Close what these people may no longer hold; run after the change is committed."""
    ids = {pk for pk in user_ids if pk is not None}
    if not ids:
        return
    for user in User.objects.filter(pk__in=ids):
        if not user.is_active:
            sign_out_everywhere(user)
        if not access.can_view(user) or not access.can_steer(user):
            _group_send(user_group(user.pk), {"type": "user.revoked"})
        if not access.can_share(user):
            end_links_of(user)


def sign_out_everywhere(user: User) -> None:
    """Delete the person's Django sessions (their sockets close in `rights_changed`)."""
    if settings.SESSION_ENGINE in _DB_SESSION_ENGINES:
        key = str(user.pk)
        # Session data is encoded, so it cannot be filtered in SQL; teams are small.
        stale = [
            session.session_key
            for session in Session.objects.filter(expire_date__gt=timezone.now()).iterator()
            if session.get_decoded().get("_auth_user_id") == key
        ]
        store = import_module(settings.SESSION_ENGINE).SessionStore
        for session_key in stale:
            store(session_key=session_key).delete()  # cached_db: from the cache too
    else:
        log.warning(
            "Sessions in %s cannot be listed: %s stays signed in until the session expires "
            "(an inactive account is refused on every request meanwhile).",
            settings.SESSION_ENGINE,
            user.get_username(),
        )


def end_links_of(user: User) -> None:
    """The person may no longer share: the links they made die, and their sockets close."""
    links = list(ShareLink.objects.filter(created_by=user, revoked_at__isnull=True))
    sharing.revoke(links, None, reason="its creator may no longer share")


def _group_send(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is not None:
        async_to_sync(layer.group_send)(group, message)


def _after_commit(user_ids: Iterable[Any]) -> None:
    ids = list(user_ids)
    transaction.on_commit(lambda: rights_changed(ids))


@receiver(post_save, sender=User)
def _user_saved(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    fields = kwargs.get("update_fields")
    if created or kwargs.get("raw") or (fields is not None and set(fields) <= _HARMLESS_FIELDS):
        return
    _after_commit([instance.pk])


@receiver(pre_delete, sender=User)
def _user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    """Deleted: their links die first (they would lose their creator), their sockets close."""
    end_links_of(instance)
    user_id = instance.pk
    transaction.on_commit(lambda: _group_send(user_group(user_id), {"type": "user.revoked"}))


@receiver(m2m_changed, sender=User.groups.through)
@receiver(m2m_changed, sender=User.user_permissions.through)
def _user_groups_changed(
    sender: Any, instance: Any, action: str, reverse: bool, pk_set: Any, **kwargs: Any
) -> None:
    """Roles are groups: a role taken away (from the user's side or the group's)."""
    if reverse and action == "pre_clear":
        # A group (or permission) emptied: its members are gone by post_clear, note them now.
        _after_commit(list(instance.user_set.values_list("pk", flat=True)))
    elif not reverse and action in ("post_remove", "post_clear"):
        _after_commit([instance.pk])
    elif reverse and action == "post_remove":
        _after_commit(pk_set or [])


@receiver(m2m_changed, sender=Group.permissions.through)
def _group_permissions_changed(
    sender: Any, instance: Any, action: str, reverse: bool, **kwargs: Any
) -> None:
    """A role's permissions edited: everyone in it may have lost something."""
    if action not in ("post_remove", "post_clear") or reverse:
        return
    _after_commit(instance.user_set.values_list("pk", flat=True))


@receiver(pre_delete, sender=Group)
def _group_deleted(sender: Any, instance: Group, **kwargs: Any) -> None:
    """Deleting a group removes its members with no m2m signal: note them while they are."""
    _after_commit(list(instance.user_set.values_list("pk", flat=True)))
