"""Reading typed fields out of JSON bodies: a wrong type is a 400 that names the field."""

from __future__ import annotations

from typing import Any

from .errors import bad_request

_MISSING = object()


def _get(body: dict[str, Any], name: str) -> Any:
    value = body.get(name, _MISSING)
    return _MISSING if value is None else value


def optional_str(body: dict[str, Any], name: str) -> str | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    if not isinstance(value, str):
        raise bad_request(f"`{name}` must be a string")
    return value


def required_str(body: dict[str, Any], name: str) -> str:
    value = optional_str(body, name)
    if value is None:
        raise bad_request(f"`{name}` is required")
    return value


def optional_int(
    body: dict[str, Any], name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    # bool is an int in Python, never in an API.
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise bad_request(f"`{name}` must be a whole number")
    if minimum is not None and value < minimum:
        raise bad_request(f"`{name}` must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise bad_request(f"`{name}` must be at most {maximum}")
    return int(value)


def optional_number(body: dict[str, Any], name: str, *, minimum: float = 0) -> float | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"`{name}` must be a number")
    if value < minimum:
        raise bad_request(f"`{name}` must be at least {minimum}")
    return float(value)


def string_list(body: dict[str, Any], name: str) -> list[str] | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise bad_request(f"`{name}` must be a list of strings")
    return value


def string_map(body: dict[str, Any], name: str) -> dict[str, str] | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise bad_request(f"`{name}` must be an object whose values are strings")
    return value


def no_nul(value: str | list[str] | None, name: str) -> None:
    """A process can be given no NUL (in its arguments, cwd or environment): refuse it now."""
    items = [value] if isinstance(value, str) else value or []
    if any("\0" in item for item in items):
        raise bad_request(f"`{name}` must not contain NUL characters")


def environment(body: dict[str, Any], name: str) -> dict[str, str] | None:
    """A string map that can be a process's environment: names without `=` or NUL."""
    value = string_map(body, name)
    for key, item in (value or {}).items():
        if not key or "=" in key or "\0" in key:
            raise bad_request(f"`{name}` names must be non-empty, without `=` or NUL: {key!r}")
        no_nul(item, name)
    return value


def json_object(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    if not isinstance(value, dict):
        raise bad_request(f"`{name}` must be an object")
    return value
