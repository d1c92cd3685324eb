"""Porthole's settings: one file, read from the environment.

Every value comes through a strict helper: a value that does not parse is an error at
start-up, never a silent guess. Defaults give the embedded mode (SQLite, in-process
channel layer, the embedded sandbox server); `DATABASE_URL`, `REDIS_URL` and
`OPENCOMPUTER_API_URL` switch to team mode.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import tempfile
import zoneinfo
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

from dashboard.localsandbox.paths import default_workspaces_dir
from dashboard.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use true or false)")


def _env_number(
    name: str,
    default: Any,
    convert: Callable[[str], Any],
    what: str,
    minimum: Any,
    maximum: Any = None,
) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = convert(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not {what}") from None
    if minimum is not None and not value >= minimum:  # NaN is not at least anything
        raise ImproperlyConfigured(f"{name}={raw.strip()} must be at least {minimum:g}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name}={raw.strip()} must be at most {maximum:g}")
    return value


def env_int(
    name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    return int(_env_number(name, default, int, "a whole number", minimum, maximum))


def env_port(name: str, default: int) -> int:
    """A TCP port, or 0 for any free one."""
    return env_int(name, default, minimum=0, maximum=65535)


def env_float(name: str, default: float, *, minimum: float) -> float:
    return float(_env_number(name, default, float, "a number", minimum))


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_choice(name: str, default: str, choices: set[str]) -> str:
    """One of `choices` (given in lower case), whatever the case it is written in."""
    raw = os.environ.get(name)
    value = default if raw is None or raw.strip() == "" else raw.strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={raw!r} must be one of {', '.join(sorted(choices))}")
    return value


def env_networks(name: str, default: list[str]) -> list[str]:
    """Addresses or networks (`10.0.0.0/8`), each checked now: one that does not parse
    would otherwise fail every request that consults the list."""
    values = env_list(name, default)
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ImproperlyConfigured(f"{name}: {value!r} is not an address or network") from None
    return values


def env_time_zone(name: str, default: str) -> str:
    value = env_str(name, default).strip()
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a time zone (for example UTC or Europe/Paris)"
        ) from None
    return value


def env_url(name: str, schemes: set[str]) -> str:
    """A URL with one of `schemes`, or "" when unset."""
    value = env_str(name).strip()
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    if value and scheme not in schemes:
        raise ImproperlyConfigured(
            f"{name} must be a URL starting with {' or '.join(f'{s}://' for s in sorted(schemes))}"
        )
    return value


def _persistent_secret_key(data_dir: Path) -> str:
    """A key generated once and kept in the data directory, so `dev.py start` needs no set-up.

    Written whole under a name of its own, then linked into place: of several processes
    starting at once on a new data directory (web workers, bridges), one wins and the others
    read its complete key (creating the file in place let one of them fail, or read it empty).
    """
    path = data_dir / "secret_key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, draft = tempfile.mkstemp(dir=data_dir, prefix=".secret_key.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(50))
            with contextlib.suppress(FileExistsError):
                os.link(draft, path)
        finally:
            os.unlink(draft)
    return path.read_text().strip()


DATA_DIR = Path(env_str("PORTHOLE_DATA_DIR", str(BASE_DIR / "var"))).resolve()
DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY") or _persistent_secret_key(DATA_DIR)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
SITE_NAME = env_str("SITE_NAME", "Porthole")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "axes",
    "dashboard.agents",
    "dashboard.localsandbox",
    "dashboard.awareness",
    "dashboard.search",
]

MIDDLEWARE = [
    # Before anything reads the client's address or scheme (dashboard/proxies.py).
    "dashboard.proxies.TrustedProxyMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "dashboard.urls"
ASGI_APPLICATION = "dashboard.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.csp",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "dashboard.agents.context_processors.site",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_url("DATABASE_URL", {"sqlite", "postgres", "postgresql"})
        or f"sqlite:///{DATA_DIR / 'porthole.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0, minimum=0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL and a busy timeout let the bridge write while pages read. A flood grows the log
    # (80 MB for 40,000 events) and SQLite reuses the file at that size for as long as any
    # connection is open (a server's whole life): once the log starts over it is cut back.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": (
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
            f"PRAGMA journal_size_limit={32 * 1024 * 1024};"
        ),
    }
    # Tests use a file too: in-memory SQLite shares one cache with table locks that fail at
    # once instead of waiting, and bridges write from threads of their own.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env_bool(
    "DATABASE_POOL", True
):
    # Under ASGI each database call of a view or socket would otherwise open a connection
    # (Django advises against persistent ones there): psycopg's pool lends them instead.
    # Bridges hand theirs back after each call (`bridge.on_bridge_thread`).
    if DATABASES["default"]["CONN_MAX_AGE"]:
        raise ImproperlyConfigured(
            "DATABASE_CONN_MAX_AGE and the connection pool exclude each other: "
            "unset DATABASE_CONN_MAX_AGE, or set DATABASE_POOL=false"
        )
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 2,
        "max_size": env_int("DATABASE_POOL_SIZE", 20, minimum=2),
        "timeout": 30,  # seconds a call waits for a free connection before it fails
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# A bridge whose reader falls this many bytes behind (at most half its socket's receive
# buffer) drops the upstream connection and reconnects, so that the sandbox replays its
# scrollback instead of dropping live output unannounced; 0 (the default) turns it off, since
# a single large output fills the socket too and then gets a "possible gap" it did not need.
# docs/reliability.md, "A reader that falls behind".
BRIDGE_LAG_RECONNECT_BYTES = env_int("BRIDGE_LAG_RECONNECT_BYTES", 0, minimum=0)

REDIS_URL = env_url("REDIS_URL", {"redis", "rediss", "unix"})
# Keys of this installation in a Redis shared with others (channel layer and cache). Empty:
# channels-redis's own "asgi" and no cache prefix, as before the setting existed.
REDIS_PREFIX = env_str("REDIS_PREFIX")
if REDIS_URL:
    # channels-redis with a read timeout longer than its blocking pop and a pool that waits
    # rather than failing at its limit (redis-py 8 broke both; see dashboard/redis_layer.py).
    from dashboard.redis_layer import host_options, live_host_options, live_prefix

    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "dashboard.redis_layer.RedisChannelLayer",
            "CONFIG": {
                "hosts": [
                    host_options(
                        REDIS_URL,
                        max_connections=env_int("REDIS_MAX_CONNECTIONS", 200, minimum=10),
                    )
                ],
                "capacity": 1000,
                "expiry": 30,
                "prefix": REDIS_PREFIX or "asgi",
            },
        },
        # Sessions' live streams (`recording.LIVE_LAYER`): Redis pub/sub, one PUBLISH per
        # message where the default layer takes four round trips and a blocking pop. At
        # most once: what a worker misses, its feed finds in the database (`fanout.Feed`).
        "live": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [live_host_options(REDIS_URL)],
                "prefix": live_prefix(REDIS_URL, REDIS_PREFIX or "asgi"),
            },
        },
    }
else:
    in_memory = {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": 1000}}
    CHANNEL_LAYERS = {"default": in_memory, "live": in_memory}

# The cache holds sign-in failure counts: shared by every worker when Redis is there.
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_PREFIX,
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# The OpenComputer API. Unset means: the embedded sandbox server that `manage.py serve`
# starts beside Porthole.
OPENCOMPUTER_API_URL = env_url("OPENCOMPUTER_API_URL", {"http", "https"})
OPENCOMPUTER_API_KEY = env_str("OPENCOMPUTER_API_KEY")
LOCALSANDBOX_PORT = env_port("LOCALSANDBOX_PORT", 8787)
LOCALSANDBOX_AGENT = env_choice("LOCALSANDBOX_AGENT", "auto", {"auto", "claude", "demo"})
# Where `manage.py serve` listens unless told otherwise (--host, --port).
PORTHOLE_HOST = env_str("PORTHOLE_HOST", "127.0.0.1")
PORTHOLE_PORT = env_port("PORTHOLE_PORT", 8000)
# Its isolation (docs/localsandbox.md): bubblewrap per sandbox; unisolated only by this opt-in.
LOCALSANDBOX_BWRAP = env_str("LOCALSANDBOX_BWRAP", "bwrap")
LOCALSANDBOX_UNSAFE_NO_ISOLATION = env_bool("LOCALSANDBOX_UNSAFE_NO_ISOLATION", False)
# $LOCALSANDBOX_WORKSPACES_DIR, else $XDG_STATE_HOME/porthole/workspaces: never the data dir.
LOCALSANDBOX_WORKSPACES_DIR = default_workspaces_dir()
# Whether this process runs bridges (the workers of a team deployment all may; leases decide).
PORTHOLE_RUN_BRIDGES = env_bool("PORTHOLE_RUN_BRIDGES", True)
# Team awareness (docs/awareness.md): webhooks added at start-up, and how long a session may sit
# idle after a turn before it needs attention.
PORTHOLE_WEBHOOK_URLS = env_list("PORTHOLE_WEBHOOK_URLS", [])
PORTHOLE_WEBHOOK_SECRET = env_str("PORTHOLE_WEBHOOK_SECRET")
# A failed delivery is retried after BACKOFF × 2^(n-1) seconds (capped at an hour), until
# MAX_ATTEMPTS attempts in all.
PORTHOLE_WEBHOOK_MAX_ATTEMPTS = env_int("PORTHOLE_WEBHOOK_MAX_ATTEMPTS", 8, minimum=1)
PORTHOLE_WEBHOOK_BACKOFF_SECONDS = env_float("PORTHOLE_WEBHOOK_BACKOFF_SECONDS", 5.0, minimum=0.01)
# Where people reach Porthole (https://porthole.example.org): links in webhooks' messages.
PORTHOLE_PUBLIC_URL = env_url("PORTHOLE_PUBLIC_URL", {"http", "https"})
PORTHOLE_ATTENTION_IDLE_MINUTES = env_int("PORTHOLE_ATTENTION_IDLE_MINUTES", 10, minimum=1)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Sign-in limits (django-axes, in the database so every worker counts the same failures):
# 10 failures per client address, or per (address, username), lock that for 15 minutes.
# A correct password of someone with no failures of their own still signs in
# (people.correct_password_of_someone_who_did_not_fail), and success clears their count.
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 10, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("AXES_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = ["ip_address", ["username", "ip_address"]]
# A correct sign-in clears only that person's failures from that address (people.py).
AXES_RESET_ON_SUCCESS = False
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_CLIENT_IP_CALLABLE = "dashboard.proxies.client_ip"
AXES_WHITELIST_CALLABLE = "dashboard.agents.people.correct_password_of_someone_who_did_not_fail"
AXES_LOCKOUT_CALLABLE = "dashboard.agents.people.locked_out"
AXES_VERBOSE = False
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "index"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_time_zone("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(DATA_DIR / "static")))
# WhiteNoise serves what `collectstatic` wrote: content-hashed names cached for a year,
# gzip and brotli beside each file. Before any collectstatic, plain names from the app
# directories with a short cache (dashboard/staticfiles.py).
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "dashboard.staticfiles.Storage"},
}
WHITENOISE_USE_FINDERS = True

# Security: cookies, headers and a nonce-based CSP that htmx and its ws extension work under.
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", SESSION_COOKIE_SECURE)
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# Sent only on HTTPS responses (Django checks request.is_secure()); 0 turns it off.
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000, minimum=0)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
# Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or networks, e.g.
# 127.0.0.1,10.0.0.0/8); from any other peer those headers are dropped (dashboard/proxies.py).
PORTHOLE_TRUSTED_PROXIES = env_networks("PORTHOLE_TRUSTED_PROXIES", [])
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
X_FRAME_OPTIONS = "DENY"
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF, CSP.NONCE],
    "style-src": [CSP.SELF, CSP.NONCE],
    "img-src": [CSP.SELF, "data:"],
    "connect-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.NONE],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}

# Operations (dashboard/ops.py): who may read /metrics (addresses or networks), or a bearer
# token; the port a bridges-only worker serves its own metrics on (loopback; 0: none).
PORTHOLE_METRICS_ALLOW = env_networks("PORTHOLE_METRICS_ALLOW", ["127.0.0.1", "::1"])
PORTHOLE_METRICS_TOKEN = env_str("PORTHOLE_METRICS_TOKEN")
PORTHOLE_METRICS_PORT = env_int("PORTHOLE_METRICS_PORT", 0, minimum=0)

# Logs: `text` (default) or `json`, one object a line; lines about one session carry its id.
LOG_FORMAT = env_choice("LOG_FORMAT", "text", {"text", "json"})
LOG_LEVEL = env_choice("LOG_LEVEL", "info", {"debug", "info", "warning", "error", "critical"})
LOGGING = logging_config(LOG_FORMAT, LOG_LEVEL.upper())
