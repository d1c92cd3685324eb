from django.urls import path

from dashboard.awareness import views

urlpatterns = [
    path("usage/", views.usage_page, name="usage"),
    path("usage/usage.csv", views.usage_csv, name="usage_csv"),
    path("settings/hooks/", views.hooks, name="hooks"),
    path("settings/hooks/<int:hook_id>/delete/", views.hook_delete, name="hook_delete"),
    path("settings/hooks/<int:hook_id>/rotate/", views.hook_rotate, name="hook_rotate"),
    path("settings/hooks/<int:hook_id>/toggle/", views.hook_toggle, name="hook_toggle"),
    path("awareness/attention/", views.attention_feed, name="attention_feed"),
]
