"""Settings: one model, env references, errors that name the file and the field."""

from __future__ import annotations

import pytest

from callray.cli import main
from callray.settings import CallraySettings, SettingsError, load_serve_config


def test_env_references_expand_with_defaults(monkeypatch):
    monkeypatch.setenv("CALLRAY_TEST_URL", "redis://example:6379/1")
    settings = CallraySettings.parse({"redis": {"url": "${CALLRAY_TEST_URL}"}, "state": {"backend": "redis"},
                                      "webhook": {"api_key": "${CALLRAY_TEST_UNSET:-fallback}"}})
    assert settings.redis.url == "redis://example:6379/1" and settings.webhook.api_key == "fallback"
    with pytest.raises(SettingsError, match=r"redis\.url: environment variable CALLRAY_TEST_UNSET is not set"):
        CallraySettings.parse({"redis": {"url": "${CALLRAY_TEST_UNSET}"}})


def test_what_a_variable_holds_is_taken_as_it_is_in_sections_lists_and_defaults(monkeypatch):
    """One expansion: a secret with ``${`` in it is not expanded again (it once was, twice per
    parse and again in every replica)."""
    monkeypatch.setenv("CALLRAY_TEST_SECRET", "pa${CALLRAY_TEST_UNSET}ss")
    monkeypatch.setenv("CALLRAY_READ_TOKEN", "tok${CALLRAY_TEST_UNSET}")  # read by a default
    settings = CallraySettings.parse({"gateway": {"guard": {"secret": "${CALLRAY_TEST_SECRET}"}},
                                      "turns": {"holding_phrases": ["${CALLRAY_TEST_SECRET}"]},
                                      "agents": {"files": {"clinic": "${CALLRAY_TEST_SECRET}"}}})
    assert settings.gateway.guard.secret == "pa${CALLRAY_TEST_UNSET}ss"
    assert settings.turns.holding_phrases == ["pa${CALLRAY_TEST_UNSET}ss"]
    assert settings.agents.files == {"clinic": "pa${CALLRAY_TEST_UNSET}ss"}
    assert settings.gateway.read_token == "tok${CALLRAY_TEST_UNSET}"


@pytest.mark.parametrize("args, said", [
    ({"state": {"backend": "redis", "redis_url": "redis://h:6379/0"}}, r"state: .*redis_url moved to the top-level redis"),
    ({"events": {"archive_dir": "var/calls"}}, r"events: .*archive_dir moved to the top-level archive section"),
    ({"gateway": {"host_retry_s": 30}}, r"gateway: .*host_retry_s is now activate_timeout_s"),
])
def test_a_field_of_an_earlier_release_names_its_new_place(args, said):
    with pytest.raises(SettingsError, match=said):
        CallraySettings.parse(args)


@pytest.mark.parametrize("args, field", [
    ({"hosts": {"warm_pool": -1}}, "hosts.warm_pool"),
    ({"hosts": {"placement": "shared"}}, "hosts.placement"),
    ({"hosts": {"placment": "dedicated"}}, "hosts.placment"),
    ({"agents": {"default": "nobody"}}, "agents"),
    ({"gateway": {"path_prefix": "no-slash"}}, "gateway.path_prefix"),
    ({"turns": {"latency_budget_ms": -1}}, "turns.latency_budget_ms"),
    ({"events": {"backend": "redis_streams"}}, "events.backend 'redis_streams' needs state.backend"),
])
def test_invalid_settings_name_the_field(args, field):
    with pytest.raises(SettingsError) as error:
        CallraySettings.parse(args, source="my.yaml")
    assert f"my.yaml: {field}" in str(error.value)


def test_check_command(tmp_path, capsys):
    assert main(["check", "config/serve.yaml"]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: callray\n    import_path: serve_app:build_app\n"
                   "    args:\n      hosts:\n        warm_pool: -3\n")
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out.replace("\n", "")
    assert str(bad) in out and "hosts.warm_pool" in out
    monkeypatch_env = {"CALLRAY_SOCKET_SECRET": "s"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in monkeypatch_env.items():
            mp.setenv(k, v)
        _, settings = load_serve_config("config/single.yaml")
    assert settings.architecture == "single"


SECRET = "hunter2-very-secret-value"


@pytest.mark.parametrize("args", [
    {"gateway": {"guard": {"secret": f"with/slash/{SECRET}"}}},  # the guard's own check once printed it
    {"gateway": {"read_token": 12345, "guard": {"secret": ["not", "a", SECRET]}}},
    {"webhook": {"api_key": {"nested": SECRET}}},
    {"redis": {"url": 7}, "cache": {"ttl_s": f"redis://:{SECRET}@host:6379"}},
])
def test_a_bad_config_never_prints_a_secret(args, tmp_path, capsys):
    with pytest.raises(SettingsError) as error:
        CallraySettings.parse(args, source="bad.yaml")
    assert SECRET not in str(error.value) and "bad.yaml" in str(error.value)
    config = tmp_path / "bad.yaml"
    import yaml

    config.write_text(yaml.safe_dump({"applications": [{"name": "callray", "import_path": "serve_app:build_app",
                                                        "args": args}]}))
    assert main(["check", str(config)]) == 1
    assert SECRET not in capsys.readouterr().out


def test_check_warns_about_sockets_served_beyond_this_machine_without_a_secret(tmp_path, capsys):
    import yaml

    doc = yaml.safe_load(open("config/serve.yaml"))
    assert main(["check", "config/serve.yaml"]) == 0 and "WARNING" not in capsys.readouterr().out  # 127.0.0.1
    doc["http_options"]["host"] = "0.0.0.0"
    doc["applications"][0]["args"]["gateway"]["guard"]["allow_ips"] = []  # serve.yaml's: this machine only
    exposed = tmp_path / "exposed.yaml"
    exposed.write_text(yaml.safe_dump(doc))
    assert main(["check", str(exposed)]) == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "WARNING" in out and "gateway.guard.secret" in out


def test_check_warns_when_redacted_records_could_not_be_found_by_number(monkeypatch, capsys):
    """event_driven.yaml keeps records in PostgreSQL, redacted: without CALLRAY_PRIVACY_KEY
    erasure by phone number would find none of them."""
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://callray@127.0.0.1:1/callray")
    monkeypatch.setenv("CALLRAY_SOCKET_SECRET", "s" * 32)
    monkeypatch.delenv("CALLRAY_PRIVACY_KEY", raising=False)
    assert main(["check", "config/event_driven.yaml"]) == 0
    assert "CALLRAY_PRIVACY_KEY" in capsys.readouterr().out.replace("\n", " ")
    monkeypatch.setenv("CALLRAY_PRIVACY_KEY", "k" * 32)
    assert main(["check", "config/event_driven.yaml"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_every_shipped_config_but_the_laptop_one_requires_the_socket_secret(monkeypatch):
    monkeypatch.delenv("CALLRAY_SOCKET_SECRET", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://callray@127.0.0.1:1/callray")
    for path in ("config/single.yaml", "config/distributed.yaml", "config/event_driven.yaml"):
        with pytest.raises(SettingsError, match="CALLRAY_SOCKET_SECRET"):
            load_serve_config(path)
    _, laptop = load_serve_config("config/serve.yaml")
    assert laptop.gateway.guard.secret is None
