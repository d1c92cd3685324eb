from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from dashboard import ops
from dashboard.agents.people import SignInView

urlpatterns = [
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics, name="metrics"),
    path("login/", SignInView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    # Django admin's own sign-in would bypass the sign-in page's context: it goes through ours.
    path("admin/login/", SignInView.as_view(), name="admin_login"),
    path("admin/", admin.site.urls),
    path("", include("dashboard.awareness.urls")),
    path("", include("dashboard.search.urls")),
    path("", include("dashboard.agents.urls")),
]

handler403 = "dashboard.agents.views.errors.forbidden"
handler404 = "dashboard.agents.views.errors.not_found"
