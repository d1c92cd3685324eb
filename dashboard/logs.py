"""Log lines that say which session they are about, as text or JSON (`LOG_FORMAT=json`).

A bridge (or anything else working for one session) calls `bind_session(session_id)` once
at the start of its task; every line logged from that task, and from tasks and threads it
starts afterwards (context variables are copied into them), carries `session_id`.
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import UTC, datetime
from typing import Any

_session: contextvars.ContextVar[str] = contextvars.ContextVar("porthole_session", default="")

# Attributes every LogRecord has; anything else on a record came from `extra=`. uvicorn
# adds `color_message`, its message with terminal colour codes: nothing for a log store.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


def bind_session(session_id: object) -> contextvars.Token[str]:
    """Tag every log line of the current task (and what it starts later) with this session."""
    return _session.set(str(session_id))


def current_session() -> str:
    return _session.get()


class SessionFilter(logging.Filter):
    """Puts the bound session id on each record (`session_id`, "" when none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "session_id", ""):
            record.session_id = _session.get()
        return True


# What uvicorn (and the websockets library under it) logs at INFO for every WebSocket: its
# handshake's outcome, then "connection open" and "connection closed". With hundreds of
# viewers that is most of a worker's log; like uvicorn's HTTP access lines (kept at
# WARNING below) they are left out unless LOG_LEVEL is DEBUG. `porthole_viewers_here`
# counts the sockets instead.
_SOCKET_CHATTER = frozenset(
    {
        '%s - "WebSocket %s" [accepted]',
        '%s - "WebSocket %s" 403',
        '%s - "WebSocket %s" %d',
        "connection open",
        "connection closed",
    }
)


class SocketChatterFilter(logging.Filter):
    """Drops each WebSocket's INFO lines (`_SOCKET_CHATTER`) unless the root logs DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or record.msg not in _SOCKET_CHATTER:
            return True
        return logging.getLogger().isEnabledFor(logging.DEBUG)


class RefusalFilter(logging.Filter):
    """Keeps Django's line for a refused request ("Forbidden (Permission denied): …") but
    drops the traceback it carries: a refusal is Porthole saying no on purpose, and each
    one printed a full stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        from django.core.exceptions import PermissionDenied

        if record.exc_info and isinstance(record.exc_info[1], PermissionDenied):
            record.exc_info = None
            record.exc_text = None
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        session = getattr(record, "session_id", "")
        return f"{line} [session {session}]" if session else line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, session_id, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        session = getattr(record, "session_id", "")
        if session:
            entry["session_id"] = session
        for key, value in vars(record).items():
            if key not in _STANDARD and key != "session_id" and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """settings.LOGGING for `LOG_FORMAT` (`text` or `json`) and `LOG_LEVEL`."""
    formatter = "json" if log_format == "json" else "text"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "session": {"()": "dashboard.logs.SessionFilter"},
            "socket_chatter": {"()": "dashboard.logs.SocketChatterFilter"},
            "refusals": {"()": "dashboard.logs.RefusalFilter"},
        },
        "formatters": {
            "text": {
                "()": "dashboard.logs.TextFormatter",
                "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
            },
            "json": {"()": "dashboard.logs.JsonFormatter"},
        },
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": formatter,
                "filters": ["session"],
            }
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            "daphne": {"level": "WARNING"},
            # uvicorn's command line sets up its own handlers and format first: these send
            # its records through the one handler above, in LOG_FORMAT, like everything else.
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True, "filters": ["socket_chatter"]},
            "uvicorn.access": {"handlers": [], "propagate": True, "level": "WARNING"},
            "django.channels.server": {"level": "WARNING"},
            "django.request": {"filters": ["refusals"]},
            # httpx logs every request at INFO: each /readyz probe and page that asks the
            # OpenComputer API. Porthole logs what goes wrong with those calls itself.
            "httpx": {"level": "WARNING"},
            # Axes logs every attempt at INFO; failures and lockouts stay at WARNING.
            "axes": {"level": "WARNING"},
        },
    }
