"""Accounts: first-run setup, sign-in (limited by django-axes), the people page."""

from __future__ import annotations

import secrets
from typing import Any

from axes.models import AccessAttempt
from axes.utils import reset as reset_attempts
from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model, login, user_logged_in
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.forms import AuthenticationForm, UserCreationForm
from django.contrib.auth.views import LoginView
from django.dispatch import receiver
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST

from dashboard.agents import access
from dashboard.agents.models import AuditEntry
from dashboard.proxies import client_ip

User = get_user_model()


# -- sign in -------------------------------------------------------------------------------------
# django-axes counts failures (settings.AXES_*): per client address, and per (address, username),
# with the client address from dashboard.proxies (X-Forwarded-For only from trusted proxies).


class SignInView(LoginView):
    """Django's login; /admin/login/ is routed here too, so Django's admin is limited the same."""

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context["needs_setup"] = access.needs_setup()
        # Django's LoginView names the site after the request's host; Porthole's is SITE_NAME.
        context["site_name"] = settings.SITE_NAME
        return context


def locked_out(
    request: HttpRequest,
    original_response: HttpResponse | None = None,
    credentials: dict[str, Any] | None = None,
) -> HttpResponse:
    """What axes answers a refused sign-in with (AXES_LOCKOUT_CALLABLE): the form, and why."""
    form = AuthenticationForm(request)
    context = {"form": form, "locked_out": True, "needs_setup": False, "next": ""}
    return render(request, "registration/login.html", context, status=429)


def correct_password_of_someone_who_did_not_fail(
    request: HttpRequest, credentials: dict[str, Any] | None = None
) -> bool:
    """AXES_WHITELIST_CALLABLE: a person with no recent failed sign-in of their own signs in
    with their correct password even while their address is over the limit (an office behind
    one NAT, or someone spraying usernames from it). A wrong password is never let through
    and is counted as usual, so this gives nobody extra guesses."""
    credentials = credentials or {}
    username = credentials.get("username")
    password = credentials.get("password")
    if not username or not password:
        return False
    cool_off = settings.AXES_COOLOFF_TIME
    failed = AccessAttempt.objects.filter(username=username, failures_since_start__gt=0)
    if cool_off is not None:
        failed = failed.filter(attempt_time__gte=timezone.now() - cool_off)
    if failed.exists():
        return False
    user = ModelBackend().authenticate(request, username=username, password=password)
    return user is not None


@receiver(user_logged_in)
def clear_own_failures(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    """A correct sign-in clears that person's failures from that address, and nobody else's.
    Axes' own reset on success (AXES_RESET_ON_SUCCESS, off) deleted every failure from the
    address, so anyone with an account could clear the limit between guesses at someone
    else's password."""
    address = client_ip(request) if request is not None else None
    if address is not None:  # without one, `reset` would clear the person's every address
        reset_attempts(ip=address, username=user.get_username())


# -- first run -------------------------------------------------------------------------------------


class SetupForm(UserCreationForm):  # type: ignore[type-arg]
    email = forms.EmailField(required=False)

    class Meta(UserCreationForm.Meta):
        model = User
        fields = ("username", "email")


@require_http_methods(["GET", "POST"])
def setup(request: HttpRequest) -> HttpResponse:
    """While nobody has an account: create the administrator. Gone (404) afterwards."""
    if not access.needs_setup():
        raise Http404("Porthole is set up.")
    # The token, always: "from this machine" cannot be told from "through a proxy on this
    # machine", which would hand the first account to whoever comes first.
    token = request.GET.get("token") or request.POST.get("token") or ""
    expected = access.setup_token(settings.DATA_DIR)
    if not (token and secrets.compare_digest(token, expected)):
        raise Http404("Open the /setup/?token=… link that Porthole printed when it started.")
    form = SetupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save(commit=False)
        user.is_staff = user.is_superuser = True
        user.save()
        access.set_role(user, "admin")
        access.forget_setup_token(settings.DATA_DIR)
        access.audit(user, "setup", user.get_username())
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, "Welcome. Start a session, or invite people on the People page.")
        return redirect("index")
    return render(request, "agents/setup.html", {"form": form, "token": token})


# -- people ----------------------------------------------------------------------------------------


class NewPersonForm(UserCreationForm):  # type: ignore[type-arg]
    role = forms.ChoiceField(choices=[(r, r.title()) for r in access.ROLES], initial="viewer")

    class Meta(UserCreationForm.Meta):
        model = User
        fields = ("username", "email")


def _people_context(request: HttpRequest, form: NewPersonForm | None = None) -> dict[str, Any]:
    people = User.objects.prefetch_related("groups").order_by("username")
    return {
        "people": [(person, access.role_of(person)) for person in people],
        "roles": access.ROLES,
        "form": form or NewPersonForm(),
        "audit": AuditEntry.objects.select_related("actor")[:50],
    }


@require_http_methods(["GET", "POST"])
def people(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        from django.contrib.auth.views import redirect_to_login

        return redirect_to_login(request.get_full_path())
    access.require_people(request.user)
    form = NewPersonForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        person = form.save()
        access.set_role(person, form.cleaned_data["role"])
        access.audit(
            request.user, "person.create", person.get_username(), role=form.cleaned_data["role"]
        )
        messages.success(request, f"{person.get_username()} can now sign in.")
        return redirect("people")
    status = 400 if request.method == "POST" else 200
    return render(request, "agents/people.html", _people_context(request, form), status=status)


@require_POST
def person_update(request: HttpRequest, user_id: int) -> HttpResponse:
    if not request.user.is_authenticated:
        raise Http404
    access.require_people(request.user)
    person = get_object_or_404(User, pk=user_id)
    role = request.POST.get("role", "")
    active = request.POST.get("active") == "on"
    if person.pk == request.user.pk and (role != "admin" or not active):
        messages.error(request, "You cannot take away your own administrator role or account.")
        return redirect("people")
    if role not in ("", *access.ROLES):
        messages.error(request, "Unknown role.")
        return redirect("people")
    before = {"role": access.role_of(person), "active": person.is_active}
    if person.is_superuser and role != "admin":
        person.is_superuser = False
    person.is_active = active
    person.save(update_fields=["is_superuser", "is_active"])
    access.set_role(person, role)
    access.audit(
        request.user,
        "person.update",
        person.get_username(),
        before=before,
        after={"role": role, "active": active},
    )
    # Sockets authorised for the old role close in `revocation.rights_changed`, hooked on the
    # models (the same path as Django admin and a shell).
    messages.success(request, f"{person.get_username()} updated.")
    return redirect("people")
