"""One way to open Redis: pooled, with timeouts, no command retries, and a start-up check that
names the setting (never the URL's password)."""

from __future__ import annotations

from typing import Any, Self

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisError

from callray.logs import mask_secrets

#: The setting that holds the URL, as errors name it.
REDIS_SETTING = "redis.url (REDIS_URL)"
#: How a background loop (event flusher, command channel) waits between attempts while Redis
#: is down: ``compute(failures)`` doubles from 50 ms up to 2 s.
RECONNECT_BACKOFF = ExponentialBackoff(cap=2.0, base=0.05)


class RedisConfigError(RuntimeError):
    """The configured Redis URL is malformed or unreachable at start."""


def redis_client(url: str, *, timeout_s: float = 1.0, max_connections: int = 128,
                 setting: str = REDIS_SETTING) -> aioredis.Redis:
    """A pooled asyncio client. Short socket timeouts and no retries (redis-py's default retries
    three times with backoff): a turn must never hang on Redis; what must survive an outage is
    retried in the background by its owner. The pool blocks (up to ``timeout_s``) when all
    connections are busy instead of failing at once, so a burst of calls queues for a
    connection rather than losing writes."""
    try:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=max_connections,
            timeout=timeout_s,
            health_check_interval=15,
            decode_responses=False,
            retry=Retry(NoBackoff(), 0),
        )
        return aioredis.Redis(connection_pool=pool)
    except ValueError as exc:
        raise RedisConfigError(f"{setting}={mask_secrets(url)!r} is not a valid Redis URL: {exc}") from None


async def check_redis(client: aioredis.Redis, url: str, setting: str = REDIS_SETTING) -> None:
    """Fail at start, naming the setting and the URL (password masked), when Redis does not answer PING."""
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise RedisConfigError(f"{setting}={mask_secrets(url)!r}: Redis does not answer "
                               f"({exc.__class__.__name__}: {mask_secrets(str(exc))})") from exc


async def connect_redis(url: str, setting: str = REDIS_SETTING, **options: float) -> aioredis.Redis:
    """A client (``options``: those of :func:`redis_client`) that answered PING; otherwise closed
    again and a RedisConfigError naming ``setting``."""
    client = redis_client(url, setting=setting, **options)
    try:
        await check_redis(client, url, setting)
    except BaseException:
        await client.aclose()
        raise
    return client


class RedisBacked:
    """Something kept in Redis: built on a client its caller owns, or by :meth:`connect` on a
    client of its own, which :meth:`close` then closes."""

    client: aioredis.Redis
    _owns_client = False

    @classmethod
    async def connect(cls, url: str, *, setting: str = REDIS_SETTING, **options: Any) -> Self:
        """Open a pooled client for ``url`` (``options``: the constructor's) and PING it: a wrong
        URL fails here, naming ``setting``."""
        backed = cls(await connect_redis(url, setting), **options)
        backed._owns_client = True
        return backed

    async def close(self) -> None:
        """Close the client if ``connect`` opened it; a client passed in belongs to the caller."""
        if self._owns_client:
            await self.client.aclose()
