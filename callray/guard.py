"""Who may open a Retell socket: a URL secret, an address allowlist, a rate limit, a call cap.

Retell sends no auth header on the LLM WebSocket (protocol §1), so the route is protected by
a secret in the URL (a path segment or a query parameter; Retell substitutes it into
``llm_websocket_url``) and/or by the caller's address. The gateway asks :meth:`SocketGuard.check`
before any call state exists and closes the socket with the verdict's code on a refusal.

Path shape (``path_segments`` are the segments *after* the route prefix, e.g. ``/llm-websocket``):

* no secret, or secret in the query: ``/{call_id}`` or ``/{agent}/{call_id}``;
* ``secret_in="path"``: ``/{secret}/{call_id}`` or ``/{secret}/{agent}/{call_id}``; the secret
  is the first segment and is removed from :attr:`Verdict.segments`;
* ``secret_in="either"``: when the query parameter is present it is checked and the path is
  left whole; otherwise the first path segment must be the secret, as for ``"path"``.

Close codes (WebSocket application range 4000-4999: the matching HTTP status + 4000):

=====  ==========================================================
4401   secret missing or wrong
4403   client address not in ``allow_ips``
4429   too many new sockets from this client address (rate limit)
4503   this replica already holds ``max_calls`` sockets
=====  ==========================================================

Checks run in that order of cost-to-attacker: the address first (no secret is compared for
a refused address), then the rate limit (so guessing secrets is rate limited too), then the
secret, then the call cap. Reasons never contain the secret or the value presented for it.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, field_validator, model_validator

from callray.env import EnvSection

CODE_ALLOWED = 0
CODE_BAD_SECRET = 4401
CODE_ADDRESS_REFUSED = 4403
CODE_RATE_LIMITED = 4429
CODE_TOO_MANY_CALLS = 4503

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAX_BUCKETS = 4096  # client addresses tracked by the rate limiter before full buckets are pruned


def _parse_networks(values: list[str], field_name: str) -> list[_Network]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{field_name}: {value!r} is not an IP address or CIDR network ({exc})") from None
    return networks


class SocketGuardSettings(EnvSection):
    """How the LLM WebSocket route is protected (``gateway.guard`` in the config file)."""

    secret: str | None = Field(
        default=None,
        description="Shared secret Retell must present in its llm_websocket_url (usually given as ${ENV} in the "
                    "config file). None disables the secret check; an empty string is refused, so an unset "
                    "variable cannot silently open the route.",
    )
    secret_in: Literal["path", "query", "either"] = Field(
        default="path",
        description="Where the secret is: 'path' = first segment after the prefix (/llm-websocket/{secret}/{call_id}), "
                    "'query' = the query parameter named by query_param, 'either' = the query parameter when present, "
                    "else the first path segment.",
    )
    query_param: str = Field(default="token", min_length=1, description="Query parameter holding the secret (secret_in 'query' or 'either').")
    allow_ips: list[str] = Field(
        default_factory=list,
        description="Client addresses allowed to connect, as IPs or CIDR networks (e.g. Retell's egress addresses). "
                    "Empty allows every address.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Peers (IPs or CIDRs, e.g. your load balancer) whose X-Forwarded-For header is believed. The client "
                    "address is then the right-most X-Forwarded-For entry that is not itself a trusted proxy; from any "
                    "other peer the header is ignored.",
    )
    max_calls: int | None = Field(
        default=None, ge=1,
        description="Most sockets one gateway replica holds at once; further sockets are refused with 4503. None = no cap.",
    )
    connections_per_s: float | None = Field(
        default=None, gt=0,
        description="Sustained rate of new sockets allowed per client address (token bucket). Retell connects from few "
                    "addresses, so size it for your peak call-start rate. None disables rate limiting.",
    )
    burst: int = Field(default=20, ge=1, description="Token bucket size: new sockets a client address may open at once before connections_per_s applies.")

    @field_validator("secret")
    @classmethod
    def _secret_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("secret is empty (is its environment variable set?); remove the field to disable the check")
        return value

    @field_validator("allow_ips", "trusted_proxies")
    @classmethod
    def _valid_networks(cls, values: list[str], info) -> list[str]:
        _parse_networks(values, info.field_name)
        return values

    @model_validator(mode="after")
    def _secret_fits_a_path_segment(self) -> SocketGuardSettings:
        if self.secret is not None and self.secret_in != "query" and "/" in self.secret:
            raise ValueError(f"secret contains '/', which cannot be a path segment (secret_in={self.secret_in!r}); "
                             "use secret_in='query' or another secret")
        return self


@dataclass(frozen=True)
class Verdict:
    """The guard's answer for one socket.

    ``code`` is 0 when allowed, else the WebSocket close code (4401, 4403, 4429, 4503).
    ``segments`` is the path without the secret segment: ``[call_id]`` or ``[agent, call_id]``
    (empty on a refusal). ``client`` is the address the checks used.
    """

    allowed: bool
    code: int
    reason: str
    segments: list[str] = field(default_factory=list)
    client: str = ""


class SocketGuard:
    """Applies :class:`SocketGuardSettings` to each new socket of one gateway replica.

    Not thread-safe; meant for one event loop. Call :meth:`opened` right after an allowed
    check (before any ``await``) and :meth:`closed` when that socket ends, so ``max_calls``
    counts live sockets.
    """

    def __init__(self, settings: SocketGuardSettings):
        self.settings = settings
        self._allow = _parse_networks(settings.allow_ips, "allow_ips")
        self._proxies = _parse_networks(settings.trusted_proxies, "trusted_proxies")
        self._secret = settings.secret.encode() if settings.secret is not None else None
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self.active = 0

    # ------------------------------------------------------------------ counters

    def opened(self) -> None:
        """A socket was accepted after an allowed check."""
        self.active += 1

    def closed(self) -> None:
        """A socket counted by :meth:`opened` ended."""
        self.active = max(0, self.active - 1)

    # ------------------------------------------------------------------ the check

    def check(self, path_segments: list[str], query: dict[str, str], client_host: str | None,
              headers: dict[str, str], now: float | None = None) -> Verdict:
        """Decide whether a new socket may be accepted (see the module docstring for the order)."""
        now = time.monotonic() if now is None else now
        client = self.client_address(client_host, headers)
        if self._allow and not self._in(client, self._allow):
            return Verdict(False, CODE_ADDRESS_REFUSED, f"address {client or '(unknown)'} is not in allow_ips", client=client)
        if not self._take_token(client, now):
            return Verdict(False, CODE_RATE_LIMITED,
                           f"too many new sockets from {client or '(unknown)'} (connections_per_s="
                           f"{self.settings.connections_per_s:g}, burst={self.settings.burst})", client=client)
        segments, problem = self._check_secret(list(path_segments), query)
        if problem:
            return Verdict(False, CODE_BAD_SECRET, problem, client=client)
        if self.settings.max_calls is not None and self.active >= self.settings.max_calls:
            return Verdict(False, CODE_TOO_MANY_CALLS, f"this replica holds max_calls={self.settings.max_calls} sockets",
                           client=client)
        return Verdict(True, CODE_ALLOWED, "ok", segments=segments, client=client)

    def _check_secret(self, segments: list[str], query: dict[str, str]) -> tuple[list[str], str | None]:
        """The segments without the secret, and why the secret was refused (None if accepted)."""
        if self._secret is None:
            return segments, None
        mode, param = self.settings.secret_in, self.settings.query_param
        if mode == "query" or (mode == "either" and param in query):
            presented = query.get(param)
            if presented is None:
                return [], f"missing secret: query parameter {param!r} is required"
            return (segments, None) if self._matches(presented) else ([], f"wrong secret in query parameter {param!r}")
        where = "/{secret}/{call_id}" + (f" or ?{param}={{secret}}" if mode == "either" else "")
        if len(segments) < 2:
            return [], f"missing secret: expected the path {where} after the prefix"
        if not self._matches(segments[0]):
            return [], f"wrong secret in the first path segment (expected {where})"
        return segments[1:], None

    def _matches(self, presented: str) -> bool:
        assert self._secret is not None
        return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), self._secret)

    # ------------------------------------------------------------------ addresses

    def client_address(self, peer: str | None, headers: dict[str, str]) -> str:
        """The socket peer, or, when the peer is a trusted proxy, the right-most untrusted
        ``X-Forwarded-For`` entry (the left-most entry if every one is trusted).

        ``headers`` is a plain dict (any key case); join repeated ``X-Forwarded-For`` headers
        with ``","`` first, in the order received.
        """
        peer = _normalise(peer or "")
        if not self._proxies or not self._in(peer, self._proxies):
            return peer
        forwarded = next((v for k, v in headers.items() if k.lower() == "x-forwarded-for"), "")
        hops = [_normalise(h) for h in forwarded.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._in(hop, self._proxies):
                return hop
        return hops[0] if hops else peer

    @staticmethod
    def _in(address: str, networks: list[_Network]) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in networks if net.version == ip.version)

    # ------------------------------------------------------------------ rate limit

    def _take_token(self, client: str, now: float) -> bool:
        rate = self.settings.connections_per_s
        if rate is None:
            return True
        capacity = float(self.settings.burst)
        tokens, at = self._buckets.get(client, (capacity, now))
        tokens = min(capacity, tokens + max(0.0, now - at) * rate)
        allowed = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > _MAX_BUCKETS:
            self._prune(now, rate, capacity)
        return allowed

    def _prune(self, now: float, rate: float, capacity: float) -> None:
        """Forget clients whose bucket has refilled: they behave as new clients anyway."""
        full = [c for c, (tokens, at) in self._buckets.items() if tokens + max(0.0, now - at) * rate >= capacity]
        for client in full:
            del self._buckets[client]


def _normalise(address: str) -> str:
    """A bare IP: whitespace, ``:port`` and ``[...]`` stripped, IPv4-mapped IPv6 as IPv4.
    Anything that is not an IP is returned stripped (it then matches no network)."""
    text = address.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)
