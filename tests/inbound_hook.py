"""An inbound-call hook for tests/test_gateway.py: what a user's hook looks like."""

import asyncio


async def answer(call_inbound: dict) -> dict | None:
    caller = call_inbound.get("from_number")
    if caller == "+15550000001":  # a known customer
        return {"dynamic_variables": {"customer_name": "Ada"}, "metadata": {"crm_id": "42"}}
    if caller == "+15550000002":
        raise RuntimeError("the CRM is down")
    if caller == "+15550000003":
        await asyncio.sleep(5)  # slower than inbound.timeout_s: this answer must never be used
        return {"dynamic_variables": {"customer_name": "Too Late"}}
    if caller == "+15550000004":
        return {"dynamic_variables": "not a mapping"}
    return None
