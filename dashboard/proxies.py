"""Who the client is behind a reverse proxy, believed only from proxies we were told to trust.

`X-Forwarded-For` and `X-Forwarded-Proto` are headers anyone can send. They say something
only when the peer that sent them is one of `PORTHOLE_TRUSTED_PROXIES` (addresses or
networks). From such a peer, `REMOTE_ADDR` becomes the nearest address in `X-Forwarded-For`
that is not itself a trusted proxy, and `X-Forwarded-Proto` stays for Django's
`SECURE_PROXY_SSL_HEADER`; from any other peer both headers are removed, so nothing later
(sign-in limits, metrics access, CSRF, HTTPS redirects) can be fooled by them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest
from django.utils.deprecation import MiddlewareMixin

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: Iterable[str], setting: str) -> list[Network]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ImproperlyConfigured(
                f"{setting}: {value!r} is not an address or network"
            ) from None
    return networks


def _address(value: str) -> Address | None:
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        return None


def is_in(value: str, networks: list[Network]) -> bool:
    address = _address(value)
    return address is not None and any(address in network for network in networks)


def trusted_proxies() -> list[Network]:
    return parse_networks(
        getattr(settings, "PORTHOLE_TRUSTED_PROXIES", []), "PORTHOLE_TRUSTED_PROXIES"
    )


def forwarded_client(peer: str, forwarded_for: str, trusted: list[Network]) -> str:
    """The client address: walk X-Forwarded-For from the right past trusted proxies."""
    client = peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if _address(hop) is None:
            break  # garbage in the chain: stop at the last address we could believe
        client = hop
        if not is_in(hop, trusted):
            break
    return client


class TrustedProxyMiddleware(MiddlewareMixin):
    """First in MIDDLEWARE: fixes REMOTE_ADDR and the scheme before anyone reads them."""

    def process_request(self, request: HttpRequest) -> None:
        meta = request.META
        peer = str(meta.get("REMOTE_ADDR") or "")
        trusted = trusted_proxies()
        if trusted and is_in(peer, trusted):
            meta["PORTHOLE_PROXY_PEER"] = peer
            meta["REMOTE_ADDR"] = forwarded_client(
                peer, str(meta.get("HTTP_X_FORWARDED_FOR", "")), trusted
            )
        else:
            forwarded = meta.pop("HTTP_X_FORWARDED_FOR", None)
            forwarded = meta.pop("HTTP_X_FORWARDED_PROTO", None) or forwarded
            if forwarded:
                # Remembered for address-based checks (/metrics): a proxy we don't trust
                # forwarded this, so the peer's address is not the client's.
                meta["PORTHOLE_UNTRUSTED_FORWARDED"] = "1"


def client_ip(request: HttpRequest) -> str | None:
    """The client's address for django-axes (AXES_CLIENT_IP_CALLABLE), after the middleware;
    None when there is none (a login not made by a request, e.g. Client.force_login), since
    the column is an address type on PostgreSQL."""
    address = str(request.META.get("REMOTE_ADDR") or "")
    return address if _address(address) is not None else None
