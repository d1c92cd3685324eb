"""Sharing: create and revoke read-only links, and the page (and older and newer events) a
link opens."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.db.models import F
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from dashboard.agents import access, sharing
from dashboard.agents.models import AgentSession, ShareLink
from dashboard.agents.sharing import ShareLinkForm, share_panel_context
from dashboard.agents.views.common import HtmxHttpRequest, newer, older, session_context


def _panel(request: HttpRequest, session: AgentSession, **extra: Any) -> HttpResponse:
    context = {
        "session": session,
        "can_share": True,
        **share_panel_context(request.user, session),
        **extra,
    }
    return render(request, "agents/session.html#share-panel", context)


@require_POST
def share_create(request: HtmxHttpRequest, session_id: str) -> HttpResponse:
    user = request.user
    access.require_share(user)
    if not isinstance(user, User):  # signed in: require_share says so; for the type checker
        raise PermissionDenied("Sign in to share.")
    session, _ = access.session_for_user(user, session_id)
    form = ShareLinkForm(request.POST)
    if not form.is_valid():
        return _panel(request, session, share_error=_form_error(form))
    link, token = access.create_share_link(
        session,
        user,
        label=form.cleaned_data["label"],
        expiry=form.cleaned_data["expiry"],
    )
    access.audit(
        user,
        "share.create",
        session.id,
        link=link.pk,
        label=link.label,
        expires_at=link.expires_at.isoformat() if link.expires_at else None,
    )
    if not request.htmx:
        sharing.hold_new_link(request, session, token)
        return redirect(session)
    url = request.build_absolute_uri(f"/share/{token}/")
    return _panel(request, session, new_link_url=url, new_link=link)


def _form_error(form: ShareLinkForm) -> str:
    """What was wrong, field by field, as the panel says it (the form's widgets alone)."""
    return " ".join(
        f"{form.fields[name].label or name.capitalize()}: {' '.join(map(str, errors))}"
        for name, errors in form.errors.items()
    )


@require_POST
def share_revoke(request: HtmxHttpRequest, link_id: int) -> HttpResponse:
    # Before the lookup: someone who may not share learns nothing, not even which ids exist.
    access.require_share(request.user)
    link, may_revoke = access.link_for_user(request.user, link_id)
    if not may_revoke:
        raise PermissionDenied("You may revoke only the links you created.")
    sharing.revoke([link], request.user)
    if not request.htmx:
        return redirect(link.session)
    return _panel(request, link.session)


@require_GET
def share_page(request: HttpRequest, token: str) -> HttpResponse:
    link, session, rights = access.session_for_link(token)
    ShareLink.objects.filter(pk=link.pk).update(
        last_used_at=timezone.now(), use_count=F("use_count") + 1
    )
    access.remember_share(request, link)
    context = session_context(request, session, rights, share_token=token)
    response = render(request, "agents/session.html", context)
    response["Referrer-Policy"] = "no-referrer"  # the token is in this page's URL
    response["Cache-Control"] = "private, no-store"
    return response


@require_GET
def share_older(request: HttpRequest, token: str) -> HttpResponse:
    _, session, _ = access.session_for_link(token)
    return older(request, session, token)


@require_GET
def share_newer(request: HttpRequest, token: str) -> HttpResponse:
    _, session, _ = access.session_for_link(token)
    return newer(request, session, token)
