"""Rendezvous (highest-random-weight) hashing: which host owns a call.

Every gateway replica computes the same owner from the host names alone, with no lookup
service; adding or removing one host moves only the calls that host gains or loses.
"""

from __future__ import annotations

import hashlib
from typing import Sequence


def _weight(host: str, call_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{host}\x00{call_id}".encode(), digest_size=8).digest(), "big")


def place(call_id: str, hosts: Sequence[str]) -> str:
    """The host with the highest weight for ``call_id``."""
    if not hosts:
        raise ValueError("no hosts to place a call on")
    return max(hosts, key=lambda host: _weight(host, call_id))


def host_names(app_name: str, count: int) -> list[str]:
    """The Ray actor names of an application's call hosts."""
    return [f"{app_name}-host-{i}" for i in range(count)]
