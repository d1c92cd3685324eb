"""nginx for the tests: Debian's binary, a generated config around the deployed locations
(deploy/nginx/porthole-locations.conf), on a free loopback port, in the foreground."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCATIONS = ROOT / "deploy" / "nginx" / "porthole-locations.conf"
CANDIDATES = ("/usr/sbin/nginx", "/usr/bin/nginx")


def nginx_binary() -> str:
    """Debian's nginx (dev.py installs it); skip without it, except under CI."""
    found = next((path for path in CANDIDATES if os.access(path, os.X_OK)), None)
    if found:
        return found
    message = "no nginx binary (install Debian's `nginx` package; dev.py test does)"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{message}: required under CI=true", pytrace=False)
    pytest.skip(message)


def write_config(directory: Path, port: int, upstream_ports: list[int], static: Path) -> Path:
    """nginx.conf for a non-daemon nginx in `directory`, proxying to `upstream_ports`."""
    directory.mkdir(parents=True, exist_ok=True)
    for temp in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / temp).mkdir(exist_ok=True)
    servers = "\n".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in upstream_ports
    )
    # As root, nginx would hand its workers to `nobody`, who cannot enter pytest's tmp dirs.
    user = "user root root;" if os.geteuid() == 0 else ""
    config = f"""
daemon off;
master_process on;
worker_processes 1;
{user}
pid {directory}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 2048; }}
http {{
    log_format upstreams '$remote_addr "$request" $status $upstream_addr';
    access_log {directory}/access.log upstreams;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    upstream porthole_web {{
{servers}
        keepalive 16;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        include {LOCATIONS};
    }}
}}
"""
    path = directory / "nginx.conf"
    path.write_text(config)
    return path
