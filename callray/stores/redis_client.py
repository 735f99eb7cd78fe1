"""One way to open Redis: pooled, with timeouts, and a start-up check that names the setting."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError


class RedisConfigError(RuntimeError):
    """The configured Redis URL is malformed or unreachable at start."""


def redis_client(url: str, *, timeout_s: float = 1.0, max_connections: int = 128) -> aioredis.Redis:
    """A pooled asyncio client. Short socket timeouts: a turn must never hang on Redis. The pool
    blocks (up to ``timeout_s``) when all connections are busy instead of failing at once, so a
    burst of calls queues for a connection rather than losing writes."""
    try:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=max_connections,
            timeout=timeout_s,
            health_check_interval=15,
            decode_responses=False,
        )
        return aioredis.Redis(connection_pool=pool)
    except ValueError as exc:
        raise RedisConfigError(f"REDIS_URL {url!r} is not a valid Redis URL: {exc}") from exc


async def check_redis(client: aioredis.Redis, url: str, setting: str = "REDIS_URL") -> None:
    """Fail at start, naming the setting and the URL, when Redis does not answer PING."""
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise RedisConfigError(f"{setting}={url!r}: Redis does not answer ({exc.__class__.__name__}: {exc})") from exc


async def connect_redis(url: str, setting: str = "REDIS_URL") -> aioredis.Redis:
    """A client that answered PING; otherwise closed again and a RedisConfigError naming ``setting``."""
    client = redis_client(url)
    try:
        await check_redis(client, url, setting)
    except BaseException:
        await client.aclose()
        raise
    return client
