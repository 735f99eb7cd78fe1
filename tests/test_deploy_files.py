"""The deployment files validate offline, with the same checks their tools run.

* ``cluster.yaml``: Ray's cluster-launcher schema (``prepare_config`` + ``validate_config``, what
  ``ray up`` does before it contacts AWS), plus the head's ``--num-cpus=0`` and GCS fault tolerance.
* ``config/*.yaml``: the app's settings model *and* Ray Serve's schema, plus the conventions of
  DESIGN.md (explicit ``max_ongoing_requests`` / ``target_ongoing_requests``, no
  ``request_timeout_s``). Serve's models ignore unknown keys, so typos are checked here.
* ``k8s/rayservice.yaml``: its ``serveConfigV2`` is ``config/distributed.yaml``, valid for both.
* ``deploy/grafana-dashboard.json``: every panel queries Prometheus for a known metric.

No Ray runtime is started: only Ray's schema modules are imported.
"""

from __future__ import annotations

import ast
import json
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from callray.settings import PROJECT_DIR, CallraySettings, SettingsError, load_serve_config

CLUSTER = PROJECT_DIR / "cluster.yaml"
RAYSERVICE = PROJECT_DIR / "k8s" / "rayservice.yaml"
DASHBOARD = PROJECT_DIR / "deploy" / "grafana-dashboard.json"
DISTRIBUTED = PROJECT_DIR / "config" / "distributed.yaml"
SERVE_CONFIGS = sorted((PROJECT_DIR / "config").glob("*.yaml"))
RAY_VERSION = version("ray")


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables the configs reference; nothing connects to them here."""
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://callray@127.0.0.1:1/callray")
    monkeypatch.setenv("RETELL_API_KEY", "key_test")
    monkeypatch.setenv("CALLRAY_SOCKET_SECRET", "test-secret")


def _gateway_deployment_name() -> str:
    """The ``name=`` of the ``@serve.deployment`` in serve_app.py (read, not imported)."""
    tree = ast.parse((PROJECT_DIR / "serve_app.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and ast.unparse(deco.func) == "serve.deployment":
                    for kw in deco.keywords:
                        if kw.arg == "name":
                            return ast.literal_eval(kw.value)
                    return node.name
    raise AssertionError("serve_app.py has no @serve.deployment class")


# ---------------------------------------------------------------------------- cluster.yaml


def _cluster() -> dict[str, Any]:
    return _yaml(CLUSTER)


def test_cluster_yaml_passes_rays_own_validation() -> None:
    validate_config(prepare_config(_cluster()))


def test_cluster_validation_catches_a_misspelt_field() -> None:
    """The check above is real: a typo in a node type is rejected by the same schema."""
    config = _cluster()
    config["available_node_types"]["call_worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


def test_cluster_head_runs_no_replicas_and_has_gcs_fault_tolerance() -> None:
    config = prepare_config(_cluster())
    head = " ".join(config["head_start_ray_commands"])
    assert re.search(r"ray start --head\b", head)
    assert "--num-cpus=0" in head.split()
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert re.search(r"\bRAY_REDIS_ADDRESS=\S+ ray start --head", head), "GCS FT needs RAY_REDIS_ADDRESS on the head's ray start"
    assert "--redis-password=" in head
    assert "--dashboard-host=0.0.0.0" in head.split()


def test_cluster_every_node_exports_metrics_and_loads_the_environment() -> None:
    config = _cluster()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = " ".join(config[key])
        assert "--metrics-export-port=8080" in commands.split(), key
        assert ". ~/.callray/callray.env" in commands, f"{key}: REDIS_URL must reach the replicas' environment"
    assert config["file_mounts"]["~/.callray"] == "~/.callray"


def test_cluster_installs_this_repository_on_a_pinned_ray() -> None:
    config = _cluster()
    assert config["file_mounts"]["~/callray"] == "."
    assert any(re.search(r"pip install .*-e ~/callray\b", c) for c in config["setup_commands"])
    assert config["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311"
    assert any(RAY_VERSION in c for c in config["setup_commands"]), "setup must check the image's Ray version"
    worker = config["available_node_types"]["call_worker"]
    assert 1 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]


# ---------------------------------------------------------------------------- config/*.yaml


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_is_valid_for_the_app_and_for_serve(path: Path, env: None) -> None:
    doc, settings = load_serve_config(path)
    ServeDeploySchema.model_validate(doc)
    if path.stem in ("single", "distributed", "event_driven"):
        assert settings.architecture == path.stem
    for name in settings.agents.files:
        assert settings.agents.resolve(name).is_file(), f"{path.name}: agent {name!r} file not found"


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_follows_the_deployment_conventions(path: Path) -> None:
    doc = _yaml(path)
    assert "request_timeout_s" not in (doc.get("http_options") or {}), f"{path.name}: it would close WebSockets"
    gateway = _gateway_deployment_name()
    for app in doc["applications"]:
        assert app["import_path"] == "serve_app:build_app"
        unknown_app = set(app) - set(ServeApplicationSchema.model_fields)
        assert not unknown_app, f"{path.name}: Serve would silently ignore {sorted(unknown_app)}"
        assert [d["name"] for d in app["deployments"]] == [gateway]
        for dep in app["deployments"]:
            where = f"{path.name}: deployment {dep['name']}"
            unknown = set(dep) - set(DeploymentSchema.model_fields)
            assert not unknown, f"{where}: Serve would silently ignore {sorted(unknown)}"
            # One open socket is one ongoing request for the whole call: Serve's default (5) is far too low.
            assert dep.get("max_ongoing_requests", 0) > 5, f"{where}: set max_ongoing_requests explicitly"
            assert "graceful_shutdown_timeout_s" in dep, f"{where}: open calls need time to drain on redeploy"
            autoscaling = dep.get("autoscaling_config")
            if autoscaling is not None:
                unknown_as = set(autoscaling) - set(AutoscalingConfig.model_fields)
                assert not unknown_as, f"{where}: Serve would silently ignore {sorted(unknown_as)}"
                target = autoscaling.get("target_ongoing_requests")
                assert target is not None and target > 2, f"{where}: set target_ongoing_requests explicitly"
                assert target <= dep["max_ongoing_requests"], where
                assert "num_replicas" not in dep or dep["num_replicas"] == "auto", where


@pytest.mark.parametrize(
    "path",
    [p for p in SERVE_CONFIGS if "${REDIS_URL}" in str(_yaml(p)["applications"][0]["args"].get("redis"))],
    ids=lambda p: p.name,
)
def test_redis_configs_fail_at_start_naming_redis_url_when_it_is_unset(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://callray@127.0.0.1:1/callray")
    monkeypatch.setenv("CALLRAY_SOCKET_SECRET", "test-secret")
    with pytest.raises(SettingsError, match="REDIS_URL"):
        load_serve_config(path)


@pytest.mark.parametrize("path", [p for p in SERVE_CONFIGS if (p.name in ("distributed.yaml", "event_driven.yaml"))],
                         ids=lambda p: p.name)
def test_cluster_configs_keep_records_in_postgres_and_fail_naming_database_url_when_it_is_unset(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a cluster a file archive would live on one node: the cluster configs use PostgreSQL."""
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("CALLRAY_SOCKET_SECRET", "test-secret")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        load_serve_config(path)
    monkeypatch.setenv("DATABASE_URL", "postgresql://callray@127.0.0.1:1/callray")
    _, settings = load_serve_config(path)
    assert settings.archive.backend == "postgres" and settings.archive.retention_days == 90


# ---------------------------------------------------------------------------- k8s/rayservice.yaml


def _rayservice() -> dict[str, Any]:
    return _yaml(RAYSERVICE)


def test_rayservice_serves_exactly_the_distributed_config(env: None) -> None:
    service = _rayservice()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    embedded = service["spec"]["serveConfigV2"]
    assert isinstance(embedded, str), "serveConfigV2 must be a YAML string (a block scalar)"
    serve_config = yaml.safe_load(embedded)
    ServeDeploySchema.model_validate(serve_config)
    for i, app in enumerate(serve_config["applications"]):
        CallraySettings.parse(app.get("args"), source=f"serveConfigV2 applications.{i}.args")
    distributed = _yaml(DISTRIBUTED)
    assert serve_config["applications"] == distributed["applications"], (
        "k8s/rayservice.yaml serveConfigV2 drifted from config/distributed.yaml: copy the config's body into it"
    )
    assert {k: v for k, v in serve_config.items() if k != "applications"} == {
        k: v for k, v in distributed.items() if k != "applications"
    }


def _containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_rayservice_cluster_shape() -> None:
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == RAY_VERSION
    assert str(cluster["headGroupSpec"]["rayStartParams"]["num-cpus"]) == "0"
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"]
    workers = cluster["workerGroupSpecs"]
    assert workers, "no worker group: nothing could host a gateway replica"
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    for container in _containers(cluster):
        assert container["image"] == f"rayproject/ray:{RAY_VERSION}-py311", container["name"]
        redis_url = next(e for e in container["env"] if e["name"] == "REDIS_URL")
        assert redis_url["valueFrom"]["secretKeyRef"]["name"], f"{container['name']}: REDIS_URL from a Secret"
        assert "value" not in redis_url, "a literal REDIS_URL would put the password in the manifest"


def test_rayservice_workers_outlive_the_gateways_graceful_shutdown() -> None:
    service = _rayservice()
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    longest = max(d.get("graceful_shutdown_timeout_s", 20) for a in serve_config["applications"] for d in a["deployments"])
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        grace = group["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace > longest, f"{group['groupName']}: pods are killed before their calls drain"


def test_cluster_launcher_and_kubernetes_use_the_same_image() -> None:
    images = {c["image"] for c in _containers(_rayservice()["spec"]["rayClusterConfig"])}
    assert images == {_cluster()["docker"]["image"]}


# ---------------------------------------------------------------------------- Grafana dashboard

APP_METRICS = [
    "ray_callray_active_calls",
    "ray_callray_turn_first_chunk_ms",
    "ray_callray_turn_first_sentence_ms",
    "ray_callray_turns_total",
    "ray_callray_cache_hits_total",
    "ray_callray_cache_misses_total",
    "ray_callray_budget_misses_total",
    "ray_callray_reconnects_total",
    "ray_callray_bus_lag",
    "ray_callray_events_dropped_total",
]
SERVE_METRICS = [
    "ray_serve_num_ongoing_http_requests",
    "ray_serve_replica_processing_queries",
    "ray_serve_deployment_replica_healthy",
]
HISTOGRAMS = ["ray_callray_turn_first_chunk_ms", "ray_callray_turn_first_sentence_ms"]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "}": "{", "]": "["}, []
    for ch in expr:
        if ch in "({[":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def test_dashboard_panels_each_query_prometheus() -> None:
    dash = _dashboard()
    assert dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"]), "panel ids must be unique"
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            expr = target["expr"].strip()
            assert expr and _balanced(expr), f"panel {panel['title']!r}: bad PromQL {expr!r}"
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert re.search(r"\b(ray_callray|ray_serve)_\w+", expr), f"panel {panel['title']!r} queries no known metric"


def test_dashboard_covers_every_metric() -> None:
    exprs = [t["expr"] for p in _dashboard()["panels"] if p["type"] != "row" for t in p["targets"]]
    text = "\n".join(exprs)
    for metric in APP_METRICS + SERVE_METRICS:
        assert re.search(rf"\b{metric}(_bucket)?\b", text), f"no panel shows {metric}"
    for histogram in HISTOGRAMS:
        uses = re.findall(rf"\b{histogram}\w*", text)
        assert uses and set(uses) == {f"{histogram}_bucket"}, f"{histogram}: query its _bucket series"
        for quantile in ("0.5", "0.99"):
            assert f"histogram_quantile({quantile}, sum by (le) (rate({histogram}_bucket" in text, (histogram, quantile)
