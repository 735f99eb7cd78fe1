"""The socket guard: secret, address allowlist, trusted proxies, rate limit, call cap."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from callray.guard import (
    CODE_ADDRESS_REFUSED, CODE_BAD_SECRET, CODE_RATE_LIMITED, CODE_TOO_MANY_CALLS, SocketGuard, SocketGuardSettings,
)

SECRET = "s3cr3t-Value_42"


def guard(**kw) -> SocketGuard:
    return SocketGuard(SocketGuardSettings(**kw))


def check(g: SocketGuard, path: str, query: dict | None = None, peer: str = "203.0.113.5",
          headers: dict | None = None, now: float = 0.0):
    return g.check([s for s in path.split("/") if s], query or {}, peer, headers or {}, now)


# ------------------------------------------------------------------ secret


def test_no_settings_allows_everything_and_keeps_the_path():
    v = check(guard(), "shop/call_1")
    assert v.allowed and v.code == 0 and v.segments == ["shop", "call_1"] and v.client == "203.0.113.5"


@pytest.mark.parametrize("path, segments", [(f"{SECRET}/call_1", ["call_1"]), (f"{SECRET}/shop/call_1", ["shop", "call_1"])])
def test_secret_in_path_is_removed_from_the_segments(path, segments):
    v = check(guard(secret=SECRET), path)
    assert v.allowed and v.segments == segments


def test_wrong_secret_in_path_is_refused_without_echoing_it():
    v = check(guard(secret=SECRET), "guess/call_1")
    assert not v.allowed and v.code == CODE_BAD_SECRET == 4401
    assert "wrong secret" in v.reason and "guess" not in v.reason and SECRET not in v.reason
    assert v.segments == []


def test_missing_secret_in_path_is_refused():
    v = check(guard(secret=SECRET), "call_1")
    assert not v.allowed and v.code == CODE_BAD_SECRET and v.reason.startswith("missing secret")


def test_secret_prefix_or_longer_value_is_refused():
    g = guard(secret=SECRET)
    assert not check(g, f"{SECRET[:-1]}/call_1").allowed
    assert not check(g, f"{SECRET}x/call_1").allowed


def test_secret_in_query():
    g = guard(secret=SECRET, secret_in="query")
    ok = check(g, "shop/call_1", {"token": SECRET})
    assert ok.allowed and ok.segments == ["shop", "call_1"]
    wrong = check(g, "call_1", {"token": "nope"})
    assert (wrong.allowed, wrong.code) == (False, 4401) and "wrong secret in query parameter 'token'" in wrong.reason
    missing = check(g, f"{SECRET}/call_1")  # the path is not looked at in query mode
    assert not missing.allowed and "missing secret" in missing.reason


def test_custom_query_param():
    g = guard(secret=SECRET, secret_in="query", query_param="k")
    assert check(g, "call_1", {"k": SECRET}).allowed
    assert not check(g, "call_1", {"token": SECRET}).allowed


def test_secret_either_prefers_the_query_then_the_path():
    g = guard(secret=SECRET, secret_in="either")
    by_query = check(g, "shop/call_1", {"token": SECRET})
    assert by_query.allowed and by_query.segments == ["shop", "call_1"]
    by_path = check(g, f"{SECRET}/shop/call_1")
    assert by_path.allowed and by_path.segments == ["shop", "call_1"]
    assert not check(g, f"{SECRET}/call_1", {"token": "bad"}).allowed  # a present query param decides
    assert not check(g, "shop/call_1").allowed


def test_unicode_secret_compares_by_bytes():
    g = guard(secret="clé-ü", secret_in="query")
    assert check(g, "c", {"token": "clé-ü"}).allowed and not check(g, "c", {"token": "cle-u"}).allowed


# ------------------------------------------------------------------ addresses


def test_allowlist_allows_listed_addresses_and_networks():
    g = guard(allow_ips=["203.0.113.0/24", "2001:db8::1"])
    assert check(g, "c", peer="203.0.113.77").allowed
    assert check(g, "c", peer="2001:db8::1").allowed
    assert check(g, "c", peer="::ffff:203.0.113.9").allowed  # IPv4-mapped IPv6 is the IPv4 address


def test_allowlist_refuses_other_addresses():
    g = guard(allow_ips=["203.0.113.0/24"])
    v = check(g, "c", peer="198.51.100.1")
    assert not v.allowed and v.code == CODE_ADDRESS_REFUSED == 4403 and "198.51.100.1 is not in allow_ips" in v.reason
    assert not check(g, "c", peer="").allowed and not check(g, "c", peer=None).allowed


def test_forwarded_for_is_ignored_from_an_untrusted_peer():
    g = guard(allow_ips=["203.0.113.0/24"], trusted_proxies=["10.0.0.0/8"])
    v = check(g, "c", peer="198.51.100.1", headers={"X-Forwarded-For": "203.0.113.5"})
    assert not v.allowed and v.client == "198.51.100.1"


def test_forwarded_for_is_used_from_a_trusted_proxy():
    g = guard(allow_ips=["203.0.113.0/24"], trusted_proxies=["10.0.0.0/8"])
    v = check(g, "c", peer="10.1.2.3", headers={"x-forwarded-for": "203.0.113.5"})
    assert v.allowed and v.client == "203.0.113.5"
    refused = check(g, "c", peer="10.1.2.3", headers={"X-Forwarded-For": "198.51.100.1"})
    assert not refused.allowed and refused.client == "198.51.100.1"


def test_forwarded_for_takes_the_rightmost_untrusted_hop():
    # the client forged the left-most entry; proxies appended the real hops on the right
    g = guard(allow_ips=["203.0.113.0/24"], trusted_proxies=["10.0.0.0/8", "192.0.2.10"])
    headers = {"X-Forwarded-For": "203.0.113.1, 198.51.100.7, 192.0.2.10:443, 10.0.0.2"}
    v = check(g, "c", peer="10.0.0.1", headers=headers)
    assert v.client == "198.51.100.7" and not v.allowed


def test_forwarded_for_all_trusted_or_absent():
    g = guard(trusted_proxies=["10.0.0.0/8"])
    assert check(g, "c", peer="10.0.0.1", headers={"X-Forwarded-For": "10.0.0.9, 10.0.0.8"}).client == "10.0.0.9"
    assert check(g, "c", peer="10.0.0.1").client == "10.0.0.1"


def test_garbage_forwarded_for_matches_no_network():
    g = guard(allow_ips=["0.0.0.0/0"], trusted_proxies=["10.0.0.0/8"])
    v = check(g, "c", peer="10.0.0.1", headers={"X-Forwarded-For": "not-an-ip"})
    assert not v.allowed and v.client == "not-an-ip"


def test_refused_address_is_refused_before_the_secret_is_compared():
    v = check(guard(secret=SECRET, allow_ips=["203.0.113.0/24"]), "wrong/c", peer="198.51.100.1")
    assert v.code == CODE_ADDRESS_REFUSED


# ------------------------------------------------------------------ rate limit and call cap


def test_rate_limit_token_bucket_per_client():
    g = guard(connections_per_s=2, burst=3)
    assert [check(g, "c", now=100.0).allowed for _ in range(4)] == [True, True, True, False]
    limited = check(g, "c", now=100.0)
    assert limited.code == CODE_RATE_LIMITED == 4429 and "too many new sockets from 203.0.113.5" in limited.reason
    assert check(g, "c", peer="198.51.100.1", now=100.0).allowed  # another client has its own bucket
    assert check(g, "c", now=100.5).allowed  # 0.5 s at 2/s refills one token
    assert not check(g, "c", now=100.5).allowed
    assert [check(g, "c", now=200.0).allowed for _ in range(4)] == [True, True, True, False]  # refills to burst only


def test_rate_limit_also_limits_secret_guessing():
    g = guard(secret=SECRET, connections_per_s=1, burst=2)
    assert [check(g, f"guess{i}/c", now=0.0).code for i in range(3)] == [4401, 4401, 4429]
    assert check(g, f"{SECRET}/c", now=0.0).code == CODE_RATE_LIMITED


def test_rate_limit_prunes_refilled_buckets():
    g = guard(connections_per_s=1, burst=1)
    for i in range(5000):
        check(g, "c", peer=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", now=float(i) / 1000)
    assert len(g._buckets) < 5000


def test_max_calls_counts_open_sockets():
    g = guard(max_calls=2)
    for _ in range(2):
        assert check(g, "c").allowed
        g.opened()
    v = check(g, "c")
    assert not v.allowed and v.code == CODE_TOO_MANY_CALLS == 4503 and "max_calls=2" in v.reason
    g.closed()
    assert check(g, "c").allowed
    g.closed(), g.closed(), g.closed()
    assert g.active == 0


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("kw, message", [
    ({"secret": ""}, "secret is empty"),
    ({"secret": "a/b"}, "cannot be a path segment"),
    ({"allow_ips": ["10.0.0.0/33"]}, "allow_ips: '10.0.0.0/33' is not an IP address"),
    ({"trusted_proxies": ["proxy.local"]}, "trusted_proxies: 'proxy.local'"),
    ({"secret_in": "header"}, "secret_in"),
    ({"max_calls": 0}, "max_calls"),
    ({"connections_per_s": 0}, "connections_per_s"),
    ({"unknown": 1}, "unknown"),
])
def test_bad_settings_name_the_field(kw, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        SocketGuardSettings(**kw)


def test_slash_secret_is_fine_in_query_mode():
    assert SocketGuardSettings(secret="a/b", secret_in="query").secret == "a/b"


def test_every_setting_is_described():
    assert all(f.description for f in SocketGuardSettings.model_fields.values())
