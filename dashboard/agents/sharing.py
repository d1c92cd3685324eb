"""Share links: the form, the panel's list, revoking, and closing what a link opened.

The pages (create, revoke, the read-only page a link opens) are in `views.share`; this
module imports no view.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django import forms
from django.contrib.auth.models import User
from django.http import HttpRequest
from django.utils import timezone

from dashboard.agents import access
from dashboard.agents.access import EXPIRIES, Person
from dashboard.agents.models import AgentSession, ShareLink

NEW_LINK_KEY = "porthole_new_share_link"


def share_group(link_id: object) -> str:
    return f"share.{link_id}"


class ShareLinkForm(forms.Form):
    label = forms.CharField(label="Label", max_length=100, required=False)
    expiry = forms.ChoiceField(
        label="Expires after",
        choices=[(key, label) for key, (label, _) in EXPIRIES.items()],
        initial="1d",
    )


def share_panel_context(user: Person, session: AgentSession) -> dict[str, Any]:
    links = list(session.share_links.select_related("created_by").order_by("-created_at"))
    revocable = {link.pk for link in links if access.can_revoke(user, link)}
    return {"share_links": links, "revocable": revocable, "share_form": ShareLinkForm()}


def hold_new_link(request: HttpRequest, session: AgentSession, token: str) -> None:
    """Keep a new link's token on the server until the session page shows it, once.

    Not in a flash message: the messages cookie is signed, not encrypted, so anyone who
    sees the cookie (a proxy's log, a shared machine) would read the token. Only the token
    and its session are kept (the URL is rebuilt when shown), in the server-side session,
    for one request: the page the browser is redirected to takes it out, and any session
    page this browser opens next drops it, shown or not.
    """
    request.session[NEW_LINK_KEY] = {"session": str(session.id), "token": token}


def take_new_link(request: HttpRequest, session: AgentSession) -> dict[str, Any]:
    """The new link made for this session by this browser, if any: shown once."""
    held = request.session.pop(NEW_LINK_KEY, None)
    if not isinstance(held, dict) or held.get("session") != str(session.id):
        return {}
    token = str(held.get("token", ""))
    return {"new_link_url": request.build_absolute_uri(f"/share/{token}/")} if token else {}


def revoke(links: list[ShareLink], by: Person | None, *, reason: str = "") -> None:
    """Revoke these links (those not revoked yet), audit it, and close their sockets."""
    live = [link for link in links if link.revoked_at is None]
    if not live:
        return
    ShareLink.objects.filter(pk__in=[link.pk for link in live], revoked_at__isnull=True).update(
        revoked_at=timezone.now(), revoked_by=by if isinstance(by, User) else None
    )
    for link in live:
        details = {"link": link.pk, **({"reason": reason} if reason else {})}
        access.audit(by, "share.revoke", link.session_id, **details)
    close_sockets(link.pk for link in live)


def close_sockets(link_ids: Iterable[int]) -> None:
    """Every socket opened through these links closes now, whichever worker holds it."""
    layer = get_channel_layer()
    if layer is None:
        return
    for link_id in link_ids:
        async_to_sync(layer.group_send)(share_group(link_id), {"type": "share.revoked"})
