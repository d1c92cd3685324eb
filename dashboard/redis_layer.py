"""The Redis channel layer, configured to hold under redis-py 8 and under bursts.

Two things break channels-redis 4.3 on redis-py 8.x with its defaults:

- redis-py 8 gives every socket a 5 s read timeout. The layer's receive loop blocks in
  `BZPOPMIN` for up to 5 s (`brpop_timeout`), so an idle consumer's read times out
  (`TimeoutError: Timeout reading from …`) and the consumer dies with 1011
  (django/channels_redis#422, redis/redis-py#4091). The read timeout must exceed the
  blocking timeout; `SOCKET_TIMEOUT` does, and still notices a dead Redis.
- redis-py's asyncio `ConnectionPool` stops at 100 connections and raises
  `MaxConnectionsError` instead of waiting. Every `group_add`/`group_discard` borrows a
  connection, so hundreds of viewers opening or closing at once fail (HTTP 500 on the
  handshake, stale group members after a failed discard). A `BlockingConnectionPool` makes
  the burst wait its turn for a connection instead.

`create_pool` is the layer's own hook for building a host's pool; everything else is the
stock `RedisChannelLayer`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from channels.exceptions import ChannelFull
from channels_redis.core import (
    RedisChannelLayer as StockRedisChannelLayer,
)
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import RedisError

from dashboard.metrics import LAYER_DROPS

# Longer than the layer's 5 s BZPOPMIN, short enough to notice a Redis that went away.
SOCKET_TIMEOUT = 15.0
# How many connections one worker process may hold per Redis host, and how long a burst
# waits for one before the operation fails.
MAX_CONNECTIONS = 200
POOL_TIMEOUT = 30.0


def host_options(url: str, *, max_connections: int = MAX_CONNECTIONS) -> dict[str, Any]:
    """The keyword arguments for one Redis host, as `CHANNEL_LAYERS[...]["CONFIG"]["hosts"]`."""
    return {
        "address": url,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        # A connection idle for longer is PINGed before use, so a half-open one is replaced
        # before a real command is lost on it.
        "health_check_interval": 10,
        "max_connections": max_connections,
        "timeout": POOL_TIMEOUT,
    }


def live_host_options(url: str) -> dict[str, Any]:
    """The host of the live streams' pub/sub layer: one connection subscribed, one that
    publishes (the layer takes turns on it), so the stock pool; no blocking pop, so the
    read timeout only notices a dead Redis."""
    options = host_options(url)
    for pool_only in ("max_connections", "timeout"):
        del options[pool_only]
    return options


def live_prefix(url: str, prefix: str) -> str:
    """The live layer's prefix: pub/sub channels belong to the whole Redis server, not to a
    database, so the database's number is part of it (installations kept apart by
    database stay apart)."""
    database = urlsplit(url).path.strip("/") or "0"
    return f"{prefix}.live.{database}."


class RedisChannelLayer(StockRedisChannelLayer):  # type: ignore[misc]
    """channels-redis' layer with a pool that waits for a free connection; messages it
    cannot deliver to a channel are counted (`porthole_channel_layer_drops_total`)."""

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        try:
            await super().send(channel, message)
        except ChannelFull:
            LAYER_DROPS.labels("full").inc()
            raise
        except RedisError:
            LAYER_DROPS.labels("error").inc()
            raise

    def create_pool(self, index: int) -> BlockingConnectionPool:
        host = dict(self.hosts[index])
        address = host.pop("address", None)
        if address is None:
            # Host given as keyword arguments (or Sentinel): the stock pool, as configured.
            return super().create_pool(index)  # type: ignore[no-any-return]
        return BlockingConnectionPool.from_url(address, **host)
