"""Share links: the form, the panel's list, revoking, and closing what a link opened.

The pages (create, revoke, the read-only page a link opens) are in `views.share`; this
module imports no view.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django import forms
from django.http import HttpRequest
from django.utils import timezone

from dashboard.agents import access
from dashboard.agents.access import EXPIRIES
from dashboard.agents.models import AgentSession, ShareLink

NEW_LINK_KEY = "porthole_new_share_link"


def share_group(link_id: object) -> str:
    return f"share.{link_id}"


class ShareLinkForm(forms.Form):
    label = forms.CharField(max_length=100, required=False)
    expiry = forms.ChoiceField(
        choices=[(key, label) for key, (label, _) in EXPIRIES.items()], initial="1d"
    )


def share_panel_context(user: Any, session: AgentSession) -> dict[str, Any]:
    links = list(session.share_links.select_related("created_by").order_by("-created_at"))
    for link in links:
        link.can_revoke = access.can_revoke(user, link)  # type: ignore[attr-defined]  # for the template
    return {"share_links": links, "share_form": ShareLinkForm()}


def hold_new_link(request: HttpRequest, session: AgentSession, url: str) -> None:
    """Keep a new link's URL on the server until the session page shows it, once.

    Not in a flash message: the messages cookie is signed, not encrypted, so anyone who
    sees the cookie (a proxy's log, a shared machine) would read the token.
    """
    request.session[NEW_LINK_KEY] = {"session": str(session.id), "url": url}


def take_new_link(request: HttpRequest, session: AgentSession) -> dict[str, Any]:
    """The new link made for this session by this browser, if any: shown once."""
    held = request.session.get(NEW_LINK_KEY)
    if not isinstance(held, dict) or held.get("session") != str(session.id):
        return {}
    del request.session[NEW_LINK_KEY]
    return {"new_link_url": held.get("url", "")}


def revoke(links: list[ShareLink], by: Any, *, reason: str = "") -> None:
    """Revoke these links (those not revoked yet), audit it, and close their sockets."""
    live = [link for link in links if link.revoked_at is None]
    if not live:
        return
    ShareLink.objects.filter(pk__in=[link.pk for link in live], revoked_at__isnull=True).update(
        revoked_at=timezone.now(), revoked_by=by if getattr(by, "pk", None) else None
    )
    for link in live:
        details = {"link": link.pk, **({"reason": reason} if reason else {})}
        access.audit(by, "share.revoke", link.session_id, **details)
    close_sockets(link.pk for link in live)


def close_sockets(link_ids: Any) -> None:
    """Every socket opened through these links closes now, whichever worker holds it."""
    layer = get_channel_layer()
    if layer is None:
        return
    for link_id in link_ids:
        async_to_sync(layer.group_send)(share_group(link_id), {"type": "share.revoked"})
