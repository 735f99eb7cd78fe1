"""Settings: one model, env references, errors that name the file and the field."""

from __future__ import annotations

import pytest

from callray.cli import main
from callray.settings import CallraySettings, SettingsError, load_serve_config


def test_env_references_expand_with_defaults(monkeypatch):
    monkeypatch.setenv("CALLRAY_TEST_URL", "redis://example:6379/1")
    settings = CallraySettings.parse({"state": {"backend": "redis", "redis_url": "${CALLRAY_TEST_URL}"},
                                      "webhook": {"api_key": "${CALLRAY_TEST_UNSET:-fallback}"}})
    assert settings.state.redis_url == "redis://example:6379/1" and settings.webhook.api_key == "fallback"
    with pytest.raises(SettingsError, match=r"state\.redis_url: environment variable CALLRAY_TEST_UNSET is not set"):
        CallraySettings.parse({"state": {"redis_url": "${CALLRAY_TEST_UNSET}"}})


@pytest.mark.parametrize("args, field", [
    ({"hosts": {"count": 0}}, "hosts.count"),
    ({"hosts": {"placment": "shared"}}, "hosts.placment"),
    ({"agents": {"default": "nobody"}}, "agents"),
    ({"gateway": {"path_prefix": "no-slash"}}, "gateway.path_prefix"),
    ({"turns": {"latency_budget_ms": -1}}, "turns.latency_budget_ms"),
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
                   "    args:\n      hosts:\n        count: -3\n")
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out.replace("\n", "")
    assert str(bad) in out and "hosts.count" in out
    _, settings = load_serve_config("config/single.yaml")
    assert settings.architecture == "single"
