"""Where a live call is activated, and how a command reaches it there.

With ``local`` placement a call lives in the gateway replica that holds its socket, but a
command for it (an escalation's transfer, a webhook's "the call ended", a newer activation's
"you lost this call") can start anywhere. The directory applies it here when the call is live
here; otherwise it reads the owner recorded with the call in the state store and publishes the
command on that owner's Redis channel (one channel per process), then waits briefly for the
owner's answer. Nothing polls: owners block on their channel. Without Redis (the single
architecture) only this process is asked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from callray.commands import CallCommand, Release, Superseded, parse_command
from callray.host import Host
from callray.stores.base import StateStore, StoreUnavailableError
from callray.stores.redis_client import RECONNECT_BACKOFF

log = logging.getLogger("callray.directory")

_DOWN = (OSError, asyncio.TimeoutError, ConnectionError)


class CallDirectory:
    """Delivers commands to the activation that owns a call (see the module docstring)."""

    def __init__(self, name: str, host: Host | None = None, *, store: StateStore | None = None,
                 redis: aioredis.Redis | None = None, reply_timeout_s: float = 2.0, handover_timeout_s: float = 1.0):
        self.name, self.host, self.store, self.redis = name, host, store, redis
        self.reply_timeout_s, self.handover_timeout_s = reply_timeout_s, handover_timeout_s
        self.counts = {"local": 0, "remote": 0, "unreachable": 0, "served": 0}
        self._notifying: set[asyncio.Task] = set()

    @staticmethod
    def channel(owner: str) -> str:
        return f"callray:owner:{owner}"

    async def send(self, call_id: str, command: CallCommand, *, timeout_s: float | None = None) -> bool:
        """Apply ``command`` where the call lives; True when that activation took it (within
        ``timeout_s``, by default ``reply_timeout_s``)."""
        if self.host is not None and call_id in self.host.calls:
            self.counts["local"] += 1
            return await self.host.command(call_id, command)
        if self.redis is None or self.store is None:
            return False
        try:
            owner = await self.store.owner(call_id)
        except StoreUnavailableError as exc:
            log.warning("call %s: owner lookup failed: %s", call_id, exc, extra={"call_id": call_id})
            return False
        if owner is None or owner[0] == self.name:
            return False  # never activated, or it was ours and is not live any more
        return await self._publish(owner[0], call_id, command, wait=True, timeout_s=timeout_s)

    async def release(self, call_id: str, owner: str) -> bool:
        """Ask ``owner``, the process the store says holds ``call_id``, to save it and let it go
        (before this one claims it); True when it did. A process that is gone, or holds nothing,
        answers at once."""
        if self.redis is None or owner == self.name:
            return False
        return await self._publish(owner, call_id, Release(), wait=True, timeout_s=self.handover_timeout_s)

    def notify_superseded(self, call_id: str, previous_owner: str, epoch: int) -> None:
        """Tell the previous owner at once that a newer activation holds the call (its next
        checkpoint would be refused anyway; this closes its socket without waiting for one)."""
        if self.redis is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._publish(previous_owner, call_id, Superseded(epoch=epoch), wait=False))
        self._notifying.add(task)
        task.add_done_callback(self._notifying.discard)

    async def _publish(self, owner: str, call_id: str, command: CallCommand, *, wait: bool,
                       timeout_s: float | None = None) -> bool:
        reply_to = f"callray:reply:{uuid.uuid4().hex}" if wait else None
        message = json.dumps({"call_id": call_id, "command": command.model_dump(mode="json"), "reply_to": reply_to})
        try:
            receivers = await self.redis.publish(self.channel(owner), message)
            if not receivers:
                self.counts["unreachable"] += 1
                return False  # that process is gone; the call reconnects elsewhere
            self.counts["remote"] += 1
            if reply_to is None:
                return True
            return await self._reply(reply_to, self.reply_timeout_s if timeout_s is None else timeout_s)
        except (*_DOWN, aioredis.RedisError) as exc:
            log.warning("call %s: command %s to %s failed: %r", call_id, command.kind, owner, exc,
                        extra={"call_id": call_id})
            return False

    async def _reply(self, key: str, timeout_s: float) -> bool:
        """The owner's answer. BLPOP in slices shorter than the client's socket timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            answer = await self.redis.blpop([key], timeout=min(0.5, max(left, 0.01)))
            if answer is not None:
                return answer[1] == b"1"
        return False

    async def serve(self) -> None:
        """Apply the commands published for this process until cancelled (reconnects after a
        Redis restart)."""
        if self.redis is None or self.host is None:
            return
        failures = 0
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel(self.name))
                failures = 0
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        await self._apply(message["data"])
            except (*_DOWN, aioredis.RedisError) as exc:
                log.warning("%s: command channel lost (%r); resubscribing", self.name, exc)
                await asyncio.sleep(RECONNECT_BACKOFF.compute(failures))
                failures += 1
            finally:
                await pubsub.aclose()

    async def _apply(self, raw: bytes | str) -> None:
        try:
            data: dict[str, Any] = json.loads(raw)
            call_id, command, reply_to = str(data["call_id"]), parse_command(data["command"]), \
                data.get("reply_to")
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            log.warning("%s: ignored a malformed command: %r", self.name, exc)
            return
        self.counts["served"] += 1
        try:
            done = await self.host.command(call_id, command)
        except Exception:  # one bad command must not stop the channel
            log.exception("%s: command %s for call %s failed", self.name, command.kind, call_id)
            done = False
        if reply_to:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.lpush(reply_to, b"1" if done else b"0")
                pipe.pexpire(reply_to, 10_000)
                await pipe.execute()

    async def close(self) -> None:
        for task in list(self._notifying):
            task.cancel()
        await asyncio.gather(*self._notifying, return_exceptions=True)
