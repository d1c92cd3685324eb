"""Static files through WhiteNoise: content-hashed names cached for a year, compressed on
request, the security headers kept, and nothing outside the collected files reachable."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import brotli  # type: ignore[import-untyped]
import pytest
from django.core.management import call_command
from django.test import Client, override_settings

from dashboard.settings import BASE_DIR

pytestmark = pytest.mark.django_db

HASHED_CSS = re.compile(r'href="(/static/porthole/app\.[0-9a-f]{12}\.css)"')
A_YEAR_OR_MORE = re.compile(r"max-age=(\d+)")


@pytest.fixture(scope="module")
def collected_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`collectstatic` for real (compressing every file takes a while: once per module)."""
    root = tmp_path_factory.mktemp("static")
    with override_settings(STATIC_ROOT=root):
        call_command("collectstatic", interactive=False, verbosity=0)
    return root


@pytest.fixture
def collected(settings, collected_once: Path) -> Path:  # type: ignore[no-untyped-def]
    settings.STATIC_ROOT = collected_once
    return collected_once


def _body(response) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join(response.streaming_content) if response.streaming else response.content


def test_it_serves_hashed_files_compressed_with_far_future_caching(collected: Path) -> None:
    page = Client().get("/login/")
    assert page.status_code == 200
    match = HASHED_CSS.search(page.content.decode())
    assert match, "the page links app.css by its content hash"
    url = match.group(1)
    original = (BASE_DIR / "static" / "porthole" / "app.css").read_bytes()

    for encoding, decode in (("br", brotli.decompress), ("gzip", gzip.decompress)):
        response = Client().get(url, HTTP_ACCEPT_ENCODING=encoding)
        assert response.status_code == 200
        assert response["Content-Encoding"] == encoding
        assert "Accept-Encoding" in response["Vary"]
        cache_control = response["Cache-Control"]
        max_age = A_YEAR_OR_MORE.search(cache_control)
        assert max_age and int(max_age.group(1)) >= 365 * 24 * 3600, cache_control
        assert "immutable" in cache_control
        assert decode(_body(response)) == original
        assert response["X-Content-Type-Options"] == "nosniff"
        assert response["Content-Type"].startswith("text/css")

    plain = Client().get(url)
    assert plain.status_code == 200 and "Content-Encoding" not in plain
    assert _body(plain) == original


def test_it_keeps_the_pages_security_headers(collected: Path) -> None:
    page = Client().get("/login/")
    csp = page["Content-Security-Policy"]
    assert "script-src 'self' 'nonce-" in csp and "frame-ancestors 'none'" in csp
    assert page["X-Frame-Options"] == "DENY"
    assert page["X-Content-Type-Options"] == "nosniff"
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce and f'nonce="{nonce.group(1)}"' in page.content.decode()


@pytest.mark.parametrize(
    "path",
    [
        "/static/%2e%2e/dashboard/settings.py",
        "/static/../dashboard/settings.py",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/porthole/%2e%2e/%2e%2e/manage.py",
    ],
)
def test_it_answers_paths_outside_the_static_files_with_a_404(collected: Path, path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 404
    assert b"SECRET_KEY" not in _body(response)


def test_it_works_before_collectstatic_too(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings.STATIC_ROOT = tmp_path / "never-collected"
    page = Client().get("/login/")
    assert page.status_code == 200
    assert 'href="/static/porthole/app.css"' in page.content.decode()
    assert Client().get("/static/porthole/app.css").status_code == 200
