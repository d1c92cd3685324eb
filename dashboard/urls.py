from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.urls import include, path

from dashboard.agents.people import SignInView


def healthz(request: HttpRequest) -> HttpResponse:
    """For container health checks and load balancers: the database answers."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return HttpResponse("ok", content_type="text/plain")


urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("login/", SignInView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    # Django admin's own sign-in would bypass the sign-in page's context: it goes through ours.
    path("admin/login/", SignInView.as_view(), name="admin_login"),
    path("admin/", admin.site.urls),
    path("", include("dashboard.awareness.urls")),
    path("", include("dashboard.agents.urls")),
]
