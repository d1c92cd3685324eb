"""Share links: create, list, revoke, and the read-only page that a link opens."""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django import forms
from django.core.exceptions import PermissionDenied
from django.db.models import F
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from dashboard.agents import access
from dashboard.agents.access import EXPIRIES
from dashboard.agents.models import AgentSession, ShareLink


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
        link.can_revoke = access.can_revoke(user, link)
    return {"share_links": links, "share_form": ShareLinkForm()}


def _panel(request: HttpRequest, session: AgentSession, **extra: Any) -> HttpResponse:
    context = {
        "session": session,
        "can_share": True,
        **share_panel_context(request.user, session),
        **extra,
    }
    return render(request, "agents/session.html#share-panel", context)


@require_POST
def share_create(request: HttpRequest, session_id: str) -> HttpResponse:
    access.require_share(request.user)
    session = get_object_or_404(AgentSession, id=session_id)
    form = ShareLinkForm(request.POST)
    if not form.is_valid():
        return _panel(request, session, share_error="Choose how long the link lasts.")
    link, token = access.create_share_link(
        session,
        request.user,
        label=form.cleaned_data["label"],
        expiry=form.cleaned_data["expiry"],
    )
    access.audit(
        request.user,
        "share.create",
        session.id,
        link=link.pk,
        label=link.label,
        expires_at=link.expires_at.isoformat() if link.expires_at else None,
    )
    url = request.build_absolute_uri(f"/share/{token}/")
    if not request.htmx:  # type: ignore[attr-defined]
        from django.contrib import messages

        messages.success(request, f"Share link (shown once): {url}")
        return redirect(session)
    return _panel(request, session, new_link_url=url, new_link=link)


@require_POST
def share_revoke(request: HttpRequest, link_id: int) -> HttpResponse:
    link = get_object_or_404(ShareLink.objects.select_related("session"), pk=link_id)
    if not access.can_revoke(request.user, link):
        raise PermissionDenied("You may revoke only the links you created.")
    if link.revoked_at is None:
        ShareLink.objects.filter(pk=link.pk).update(
            revoked_at=timezone.now(), revoked_by=request.user
        )
        access.audit(request.user, "share.revoke", link.session_id, link=link.pk)
        layer = get_channel_layer()
        if layer is not None:
            # Every socket opened through this link closes now, whichever worker holds it.
            async_to_sync(layer.group_send)(share_group(link.pk), {"type": "share.revoked"})
    if not request.htmx:  # type: ignore[attr-defined]
        return redirect(link.session)
    return _panel(request, link.session)


def _link_or_404(token: str) -> ShareLink:
    link = access.active_link(token)
    if link is None:
        raise Http404("This link is not valid: it may have expired or been revoked.")
    link.token = token  # type: ignore[attr-defined]  # for this request only, never stored
    return link


@require_GET
def share_page(request: HttpRequest, token: str) -> HttpResponse:
    from dashboard.agents.views import _session_context

    link = _link_or_404(token)
    ShareLink.objects.filter(pk=link.pk).update(
        last_used_at=timezone.now(), use_count=F("use_count") + 1
    )
    access.remember_share(request, link)
    context = _session_context(request, link.session, share=link)
    response = render(request, "agents/session.html", context)
    response["Referrer-Policy"] = "no-referrer"  # the token is in this page's URL
    response["Cache-Control"] = "private, no-store"
    return response


@require_GET
def share_older(request: HttpRequest, token: str) -> HttpResponse:
    from dashboard.agents.views import _older

    link = _link_or_404(token)
    return _older(request, link.session, link)
