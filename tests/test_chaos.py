"""Chaos: calls keep talking while gateway replicas are killed and Redis restarts under them.

The Ray test drives the session's distributed deployment (``durable_app``) with the Retell
simulator, kills gateway replicas and restarts Redis on a schedule (``harness/chaos.py``), and asserts
behaviour: every turn answered, no call dropped for good. The other two tests check the
simulator features the chaos run relies on against a tiny local server, without Ray.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import pytest
from contextlib import asynccontextmanager
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from harness.chaos import RETELL_DROP_RECONNECTS, ChaosTarget, FaultPlan, pending_entries, run_chaos
from callray.sim.simulator import SimConfig, run_simulation


@asynccontextmanager
async def dropping_server(drop_first_request: bool) -> AsyncIterator[str]:
    """Greets, echoes pings, answers requests; with ``drop_first_request`` the first request of
    each call's first socket is answered by cutting the TCP connection (no close frame)."""
    dropped: set[str] = set()

    async def handler(ws: ServerConnection) -> None:
        call_id = ws.request.path.rsplit("/", 1)[-1]
        await ws.send(json.dumps({"response_type": "config", "config": {"auto_reconnect": True}}))
        await ws.send(json.dumps({"response_type": "response", "response_id": 0, "content": "",
                                  "content_complete": True}))
        try:
            async for raw in ws:
                msg = json.loads(raw)
                if msg["interaction_type"] == "ping_pong":
                    await ws.send(json.dumps({"response_type": "ping_pong", "timestamp": msg["timestamp"]}))
                elif msg["interaction_type"] == "response_required":
                    if drop_first_request and call_id not in dropped:
                        dropped.add(call_id)
                        ws.transport.abort()
                        return
                    await ws.send(json.dumps({"response_type": "response", "response_id": msg["response_id"],
                                              "content": "Sure.", "content_complete": True}))
        except ConnectionClosed:
            pass

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/llm-websocket"


def _sim(url: str, **overrides: Any) -> SimConfig:
    values: dict[str, Any] = dict(url=url, calls=3, turns=3, think_s=0.01, ping_interval_s=0, turn_timeout_s=2,
                                  seed=3, connect_attempts=2, connect_retry_s=0.1)
    values.update(overrides)
    return SimConfig(**values)


async def test_simulator_reconnects_after_a_drop_it_did_not_cause() -> None:
    async with dropping_server(drop_first_request=True) as url:
        retell = await run_simulation(_sim(url, drop_reconnects=RETELL_DROP_RECONNECTS))
        strict = await run_simulation(_sim(url, drop_reconnects=0, run_id="strict"))
    assert retell.dropped == {} and retell.violations == {}
    assert retell.counts["turns_answered"] == 9  # the dropped request was asked again on the new socket
    assert retell.counts["drop_reconnects"] == 3 and [c.reconnects for c in retell.calls] == [1, 1, 1]
    assert strict.dropped == {"connection_lost": 3}  # the default: a server drop ends the call


async def test_simulator_stops_turns_and_calls_after_duration() -> None:
    async with dropping_server(drop_first_request=False) as url:
        result = await run_simulation(_sim(url, calls=20, concurrency=2, turns=10_000, think_s=0.05, duration_s=1.0))
    assert result.dropped == {} and result.violations == {}
    assert 0 < result.counts["calls"] < 20 and result.counts["calls"] == len(result.calls)
    assert all(c.ended == "completed" for c in result.calls)
    assert result.counts["turns_answered"] == result.counts["turns_sent"] < 2 * 10_000


@pytest.mark.ray
@pytest.mark.slow
async def test_calls_survive_gateway_kills_and_a_redis_restart(durable_app: str, redis_server: Any,
                                                               ray_cluster: Any) -> None:
    from tests.test_serve_durable import replicas_running

    await replicas_running("durable", 2)
    target = ChaosTarget(url=durable_app, app="durable", namespace="callray-test-durable", redis=redis_server)
    plan = FaultPlan(schedule=[(4.0, "gateway"), (12.0, "redis"), (24.0, "gateway")], seed=5)
    sim = SimConfig(url=durable_app, calls=10, turns=8, think_s=3.0, ramp_s=2.0, supersede_rate=0.1,
                    drop_reconnects=RETELL_DROP_RECONNECTS, turn_timeout_s=30.0, seed=5, call_id_prefix="chaos")
    report = await run_chaos(target, sim, plan)
    summary = report["summary"]
    assert [f["error"] for f in report["faults"]] == [None] * 3, report["faults"]
    assert summary["faults"] == {"gateway": 2, "redis": 1}
    assert any(f["affected_calls"] for f in report["faults"] if f["kind"] == "gateway")  # the kills hit live calls
    assert summary["turns_sent"] == summary["turns_answered"] == 80, summary
    assert summary["turns_lost"] == 0
    assert summary["calls_dropped_for_good"] == 0, summary["dropped_by_reason"]
    assert all(not f["not_recovered"] for f in report["faults"]), report["faults"]
    assert summary["violations"] == {}, summary["examples"]


def test_the_report_names_what_a_group_left_pending(redis_url: str) -> None:
    """A run that ends with entries unacked says which events they are and how often they were tried."""
    import uuid

    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = f"chaos-test-{uuid.uuid4().hex}"
    try:
        client.xadd(stream, {"type": "call.turn", "event": "{}"})
        client.xgroup_create(stream, "escalation", id="0")
        client.xreadgroup("escalation", "worker-1", {stream: ">"}, count=10)
        [entry] = pending_entries(client, stream, "escalation")
        assert (entry["type"], entry["consumer"], entry["deliveries"]) == ("call.turn", "worker-1", 1)
    finally:
        client.delete(stream)
        client.close()
