from django.urls import path

from dashboard.agents import views

urlpatterns = [
    path("", views.index, name="index"),
]
