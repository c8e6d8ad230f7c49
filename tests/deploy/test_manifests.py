"""deploy/k8s against itself, the Dockerfile and the services: every overlay renders and
validates; every workload is hardened and probed; images, ports, commands and env names agree
with what the services really read and serve."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import secrets
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles

from services.common.settings import CommonSettings
from services.decisions.settings import DecisionsSettings
from services.gateway.settings import GatewaySettings
from services.store.settings import StoreSettings
from services.timers.settings import TimersSettings
from tests.deploy import crds, k8s
from tests.deploy.dockerfile import Dockerfile

SETTINGS: dict[str, type[CommonSettings]] = {
    "gateway": GatewaySettings,
    "store": StoreSettings,
    "decisions": DecisionsSettings,
    "timers": TimersSettings,
}
SERVICES = tuple(SETTINGS)
PYPROJECT = tomllib.loads((k8s.ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# Each service's Secret `canopy-<service>`: its keys, from secrets/<service>.env.example.
SECRET_KEYS = {
    name: [
        line.split("=", 1)[0]
        for line in (k8s.K8S / "base" / "secrets" / f"{name}.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    for name in SETTINGS
}
LABELS = ("name", "component", "part-of", "version", "managed-by")
# The setting that bounds each service's own wait when it drains: sockets closing, shards
# handed over once their inputs in flight are confirmed, the last log batch written.
DRAIN_WAIT = {
    "gateway": "close_grace",
    "decisions": "shard_release_timeout",
    "store": "store_batch_seconds",
}
# What a drain may take beyond preStop and that wait: the last publishes' confirms, acks.
DRAIN_MARGIN = 10


def of_kind(resources: list[k8s.Resource], kind: str) -> dict[str, k8s.Resource]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def config_map(resources: list[k8s.Resource]) -> dict[str, str]:
    (cm,) = [r for r in resources if r["kind"] == "ConfigMap"]
    data: dict[str, str] = cm["data"]
    return data


def setting_names(cls: type[Any]) -> set[str]:
    return {f"CANOPY_{name.upper()}" for name in cls.model_fields}


def setting(service: str, field: str, config: dict[str, str]) -> Any:
    """A service's setting as the ConfigMap makes it: its value there, else the default."""
    value = config.get(f"CANOPY_{field.upper()}")
    return value if value is not None else SETTINGS[service].model_fields[field].default


def port_of(service: str, config: dict[str, str]) -> int:
    return int(setting(service, f"{service}_port", config))


def container(deployment: k8s.Resource) -> dict[str, Any]:
    (one,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(one)


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_overlay_validates(rendered: dict[str, list[k8s.Resource]], overlay: str) -> None:
    problems = [p for r in rendered[overlay] for p in k8s.validate(r)]
    assert problems == []


def test_validation_refuses_what_the_api_server_would_drop(
    rendered: dict[str, list[k8s.Resource]],
) -> None:
    """A misspelt field, in a built-in kind and in each operator kind, is a problem."""
    kinds = {(r["apiVersion"], r["kind"]): r for r in rendered["prod"]}
    assert set(crds.SCHEMAS) <= set(kinds)  # every CRD kind is used, so every schema is exercised
    for key in [*crds.SCHEMAS, ("apps/v1", "Deployment")]:
        broken = copy.deepcopy(kinds[key])
        broken["spec"]["replicaz"] = 3
        assert k8s.validate(broken), key
    unknown = {"apiVersion": "example.org/v1", "kind": "Gadget", "metadata": {"name": "x"}}
    assert k8s.validate(unknown) == [
        "Gadget/x: no schema for example.org/v1 Gadget in Kubernetes 1.32.0 nor in "
        "tests/deploy/crds.py"
    ]


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_every_service_has_a_hardened_probed_deployment(
    rendered: dict[str, list[k8s.Resource]], overlay: str
) -> None:
    resources = rendered[overlay]
    deployments = of_kind(resources, "Deployment")
    assert sorted(deployments) == sorted(SERVICES)
    config = config_map(resources)
    dockerfile = Dockerfile.read()
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        for labels in (deployment["metadata"]["labels"], pod["metadata"]["labels"]):
            assert {f"app.kubernetes.io/{key}" for key in LABELS} <= set(labels), name
            assert labels["app.kubernetes.io/name"] == name
            assert labels["app.kubernetes.io/part-of"] == "canopy"
            assert labels["app.kubernetes.io/version"] == VERSION
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        spec = pod["spec"]
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == dockerfile.user_id != 0
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        box = container(deployment)
        assert box["name"] == name
        assert box["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
        }
        # Writable paths are emptyDirs (the root filesystem is read-only).
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in box.get("volumeMounts", []):
            assert "emptyDir" in volumes[mount["name"]], (name, mount)
        requests, limits = box["resources"]["requests"], box["resources"]["limits"]
        assert {"cpu", "memory"} <= set(requests) and "memory" in limits, name
        for probe, path in [
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
            ("startupProbe", "/healthz"),
        ]:
            assert box[probe]["httpGet"] == {"path": path, "port": "http"}, (name, probe)
        # Longer than the drain: preStop, then the service's own wait, then the margin.
        pre_stop = box["lifecycle"]["preStop"]["sleep"]["seconds"]
        wait = DRAIN_WAIT.get(name)
        waited = float(setting(name, wait, config)) if wait else 0.0
        assert spec["terminationGracePeriodSeconds"] > pre_stop + waited + DRAIN_MARGIN, name


def test_probe_paths_are_the_services_health_routes() -> None:
    from prometheus_client import CollectorRegistry

    from services.common.health import health_router

    async def ready() -> list[str]:
        return []

    paths = {getattr(r, "path", None) for r in health_router(CollectorRegistry(), ready).routes}
    assert {"/healthz", "/readyz", "/metrics"} <= paths


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_a_job_gives_each_service_its_own_broker_user(
    rendered: dict[str, list[k8s.Resource]], overlay: str
) -> None:
    """rabbitmq-users (services/common/bus/access.py) reads each service's broker URL from
    that service's own Secret, and the operator's default user; it is hardened as the
    services are; in prod its only way out is the management API."""
    from services.common.bus import access

    resources = rendered[overlay]
    job = of_kind(resources, "Job")["rabbitmq-users"]
    spec = job["spec"]["template"]["spec"]
    (box,) = spec["containers"]
    assert box["command"] == ["python", "-m", access.__name__]
    assert box["image"] == container(of_kind(resources, "Deployment")["store"])["image"]
    references = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in box["env"] if "valueFrom" in e}
    assert references == {
        "RABBITMQ_USERNAME": {"name": "rabbitmq-default-user", "key": "username"},
        "RABBITMQ_PASSWORD": {"name": "rabbitmq-default-user", "key": "password"},
        **{
            f"CANOPY_{name.upper()}_AMQP_URL": {"name": f"canopy-{name}", "key": "CANOPY_AMQP_URL"}
            for name in access.SERVICES
        },
    }
    assert set(access.SERVICES) == set(SERVICES)
    assert all("CANOPY_AMQP_URL" in SECRET_KEYS[name] for name in SERVICES)
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert box["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    if overlay == "prod":
        policies = of_kind(resources, "NetworkPolicy")
        assert policies["rabbitmq-users"]["spec"]["egress"] == [
            {
                "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "rabbitmq"}}}],
                "ports": [{"protocol": "TCP", "port": 15672}],
            }
        ]
        management = [
            rule
            for rule in policies["rabbitmq"]["spec"]["ingress"]
            if {"protocol": "TCP", "port": 15672} in rule["ports"]
        ]
        assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "rabbitmq-users"}}} in [
            peer for rule in management for peer in rule["from"]
        ]


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_config_comes_from_one_config_map_and_each_services_own_secret(
    rendered: dict[str, list[k8s.Resource]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = rendered[overlay]
    config = config_map(resources)
    (cm_name,) = [r["metadata"]["name"] for r in resources if r["kind"] == "ConfigMap"]
    known = set().union(*(setting_names(cls) for cls in SETTINGS.values()))
    assert set(config) - known == set(), "ConfigMap keys the services do not read"
    every_secret = set().union(*SECRET_KEYS.values())
    assert every_secret - known == set(), "secrets/*.env.example keys the services do not read"
    assert set(config) & every_secret == set()
    deployments = of_kind(resources, "Deployment")
    assert set(deployments) == set(SERVICES)
    for name, deployment in deployments.items():
        box = container(deployment)
        assert "env" not in box, name
        # Its own Secret only (least privilege): never a Secret another service reads.
        assert box["envFrom"] == [
            {"configMapRef": {"name": cm_name}},
            {"secretRef": {"name": f"canopy-{name}"}},
        ]
        spec = deployment["spec"]["template"]["spec"]
        assert "secret" not in json.dumps(spec.get("volumes", [])).lower(), name
    # Production-grade values for every key of every Secret.
    values = {
        "CANOPY_ADMIN_TOKEN": secrets.token_urlsafe(32),
        "CANOPY_INTERNAL_TOKEN": secrets.token_urlsafe(32),
        "CANOPY_SEAT_SECRET": secrets.token_urlsafe(32),
        "CANOPY_AMQP_URL": "amqp://canopy:pw@rabbitmq:5672/",
        "CANOPY_MONGO_URL": "mongodb://canopy:pw@mongodb-svc:27017/?replicaSet=mongodb",
    }
    assert every_secret == set(values)
    for name, cls in SETTINGS.items():
        # Each Secret holds exactly what its service's settings say it needs...
        assert sorted(SECRET_KEYS[name]) == sorted(f"CANOPY_{f.upper()}" for f in cls.SECRETS)
        # ... and the service starts with exactly that and the ConfigMap: nothing mistyped,
        # nothing missing.
        for variable in [v for v in __import__("os").environ if v.startswith("CANOPY_")]:
            monkeypatch.delenv(variable)
        for key in [*config, *SECRET_KEYS[name]]:
            monkeypatch.setenv(key, config.get(key) or values[key])
        settings = cls()
        assert settings.host == "0.0.0.0", name
        assert settings.store_url == f"http://store:{port_of('store', config)}"
        assert settings.queue_type == "quorum"
        for field in ("amqp_url", "mongo_url", "public_url"):
            if field in cls.model_fields:
                assert f"CANOPY_{field.upper()}" in {*config, *SECRET_KEYS[name]}, (name, field)
    # The internet-facing gateway: the internal token and the seat secret, never the admin
    # token nor the database (issue 23); timers: no token at all.
    assert "CANOPY_ADMIN_TOKEN" not in SECRET_KEYS["gateway"]
    assert "CANOPY_MONGO_URL" not in SECRET_KEYS["gateway"]
    assert {"CANOPY_INTERNAL_TOKEN", "CANOPY_SEAT_SECRET"} <= set(SECRET_KEYS["gateway"])
    assert [k for k in SECRET_KEYS["timers"] if "TOKEN" in k or "SECRET" in k] == []
    assert [n for n, keys in SECRET_KEYS.items() if "CANOPY_ADMIN_TOKEN" in keys] == ["store"]


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_ports_agree_between_settings_manifests_and_dockerfile(
    rendered: dict[str, list[k8s.Resource]], overlay: str
) -> None:
    resources = rendered[overlay]
    config = config_map(resources)
    services = of_kind(resources, "Service")
    ports = {name: port_of(name, config) for name in SERVICES}
    assert Dockerfile.read().exposed == set(ports.values())
    for name, deployment in of_kind(resources, "Deployment").items():
        assert container(deployment)["ports"] == [
            {"name": "http", "containerPort": ports[name], "protocol": "TCP"}
        ]
        service = services[name]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["spec"]["ports"] == [
            {"name": "http", "port": ports[name], "targetPort": "http", "protocol": "TCP"}
        ]


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_one_image_and_each_service_its_real_entry_command(
    rendered: dict[str, list[k8s.Resource]], overlay: str
) -> None:
    for name, deployment in of_kind(rendered[overlay], "Deployment").items():
        box = container(deployment)
        assert box["image"] == f"canopy:{VERSION}"
        assert box["command"] == ["python", "-m", f"services.{name}"]
        assert importlib.util.find_spec(f"services.{name}.__main__") is not None
    # A service process (its __main__ serves HTTP) without a Deployment would be forgotten.
    servers = {
        path.parent.name
        for path in (k8s.ROOT / "services").glob("*/__main__.py")
        if "serve(" in path.read_text()
    }
    assert servers == set(SERVICES)
    dockerfile = Dockerfile.read()
    assert dockerfile.label("org.opencontainers.image.title") == "canopy"
    assert dockerfile.label("org.opencontainers.image.version") == VERSION


def test_dev_runs_one_of_everything_and_prod_survives_losing_one(
    rendered: dict[str, list[k8s.Resource]],
) -> None:
    dev, prod = rendered["dev"], rendered["prod"]
    assert {d["spec"]["replicas"] for d in of_kind(dev, "Deployment").values()} == {1}
    assert of_kind(dev, "RabbitmqCluster")["rabbitmq"]["spec"]["replicas"] == 1
    assert of_kind(dev, "MongoDBCommunity")["mongodb"]["spec"]["members"] == 1
    for kind in ("PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"):
        assert of_kind(dev, kind) == {}, kind

    deployments = of_kind(prod, "Deployment")
    budgets = of_kind(prod, "PodDisruptionBudget")
    autoscalers = of_kind(prod, "HorizontalPodAutoscaler")
    assert sorted(autoscalers) == ["decisions", "gateway"]
    for name, deployment in deployments.items():
        assert deployment["spec"]["replicas"] >= 2, name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert budgets[name]["spec"]["maxUnavailable"] == 1
        assert budgets[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {
            "kubernetes.io/hostname",
            "topology.kubernetes.io/zone",
        }
        for constraint in spread:
            assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
            assert "app.kubernetes.io/name" in constraint["matchLabelKeys"]
    for name, hpa in autoscalers.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        assert hpa["spec"]["minReplicas"] == deployments[name]["spec"]["replicas"]
    # A shard has one active consumer: decisions replicas beyond CANOPY_SHARDS would idle.
    shards = int(config_map(prod)["CANOPY_SHARDS"])
    assert shards >= autoscalers["decisions"]["spec"]["maxReplicas"]
    assert shards >= deployments["decisions"]["spec"]["replicas"]
    assert int(config_map(dev)["CANOPY_SHARDS"]) >= 1

    # The broker and the database lose one member of three at a time in a drain.
    assert budgets["rabbitmq"]["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "rabbitmq"}},
    }
    assert budgets["mongodb"]["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"app": "mongodb-svc"}},
    }
    rabbitmq = of_kind(prod, "RabbitmqCluster")["rabbitmq"]["spec"]
    assert rabbitmq["replicas"] == 3
    assert "rabbitmq_prometheus" in rabbitmq["rabbitmq"]["additionalPlugins"]
    assert config_map(prod)["CANOPY_QUEUE_TYPE"] == "quorum"
    mongodb = of_kind(prod, "MongoDBCommunity")["mongodb"]["spec"]
    assert (mongodb["members"], mongodb["type"]) == (3, "ReplicaSet")


def _mounts(app: Any) -> list[Mount]:
    return [r for r in app.router.routes if isinstance(r, Mount) and isinstance(r.app, StaticFiles)]


def _directory(mount: Mount) -> Path:
    """The folder a static mount (one of `_mounts`) serves."""
    assert isinstance(mount.app, StaticFiles) and mount.app.directory is not None
    return Path(mount.app.directory)


def _serves_file(app: Any, path: str) -> bool:
    """The file `path` exists under the first of the app's static mounts it falls under
    (Starlette tries the mounts in order, as nginx would hand them the request)."""
    for mount in _mounts(app):
        if path.startswith(mount.path + "/"):
            return (_directory(mount) / path.removeprefix(mount.path + "/")).exists()
    return False


def _route_matches(app: Any, path: str, kind: str) -> bool:
    scope = {"type": kind, "path": path, "method": "GET", "root_path": "", "headers": []}
    return any(route.matches(scope)[0] != Match.NONE for route in app.router.routes)


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_ingress_sends_each_path_to_the_service_that_serves_it(
    rendered: dict[str, list[k8s.Resource]], overlay: str
) -> None:
    from services.gateway.app import create_app as gateway_app
    from services.store.app import create_app as store_app

    apps = {  # built, not started: routing needs no broker
        "gateway": gateway_app(GatewaySettings(admin_token="ingress-test")),
        "store": store_app(StoreSettings(admin_token="ingress-test")),
    }
    (ingress,) = of_kind(rendered[overlay], "Ingress").values()
    annotations = ingress["metadata"]["annotations"]
    for direction in ("read", "send"):  # a WebSocket idles between decisions
        assert int(annotations[f"nginx.ingress.kubernetes.io/proxy-{direction}-timeout"]) >= 3600
    routes = {
        p["path"]: (p["pathType"], p["backend"]["service"]["name"], p["backend"]["service"]["port"])
        for rule in ingress["spec"]["rules"]
        for p in rule["http"]["paths"]
    }
    assert {path: backend for path, (_, backend, _) in routes.items()} == {
        "/ws": "gateway",
        "/p": "gateway",
        "/join": "gateway",
        "/static": "gateway",
        "/static/console": "store",
        "/api": "store",
        "/": "store",
    }
    samples = {"/ws": "/ws/abc", "/p": "/p/abc", "/static": "/static/canopy.js"}
    samples |= {"/join": "/join/abc"}
    samples |= {"/static/console": "/static/console/console.js", "/api": "/api/sessions"}
    samples |= {"/": "/"}
    for path, (path_type, backend, port) in routes.items():
        assert port == {"name": "http"}
        kind = "websocket" if path == "/ws" else "http"
        assert _route_matches(apps[backend], samples[path], kind), path
        # Exact "/" for the console: /internal, /metrics, /docs of the store stay inside.
        assert path_type == ("Exact" if path == "/" else "Prefix")
    assert not _route_matches(apps["gateway"], "/ws/abc", "http")  # the upgrade is the route

    # Every directory of files either app serves reaches that app through the ingress, as
    # nginx picks a route: an Exact match, else the longest Prefix (whole path elements).
    def backend_of(path: str) -> str | None:
        exact = [b for p, (t, b, _) in routes.items() if t == "Exact" and p == path]
        prefixes = [
            (len(p), b)
            for p, (t, b, _) in routes.items()
            if t == "Prefix" and (path == p or path.startswith(p.rstrip("/") + "/"))
        ]
        return exact[0] if exact else max(prefixes)[1] if prefixes else None

    for name, app in apps.items():
        for mount in _mounts(app):
            for file in sorted(_directory(mount).rglob("*"))[:3]:
                sample = f"{mount.path}/{file.relative_to(_directory(mount))}"
                backend = backend_of(sample)
                assert backend is not None, sample
                assert _serves_file(apps[backend], sample), (name, sample, backend)


def test_network_policies_open_only_the_real_flows(
    rendered: dict[str, list[k8s.Resource]],
) -> None:
    policies = of_kind(rendered["prod"], "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert policies["allow-dns"]["spec"]["podSelector"] == {}

    def egress_to(name: str) -> set[str]:
        targets = set()
        for rule in policies[name]["spec"]["egress"]:
            for peer in rule["to"]:
                labels = peer.get("podSelector", {}).get("matchLabels", {})
                targets.add(labels.get("app.kubernetes.io/name") or labels.get("app", ""))
        return targets

    for name, cls in SETTINGS.items():
        uses_store = "Directory(" in (k8s.ROOT / "services" / name / "app.py").read_text()
        expected = {"rabbitmq"}
        expected |= {"mongodb-svc"} if "mongo_url" in cls.model_fields else set()
        expected |= {"store"} if uses_store else set()
        assert egress_to(name) == expected, name
        assert policies[name]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    store_from = policies["store"]["spec"]["ingress"][0]["from"]
    clients = {
        value
        for peer in store_from
        for expression in peer.get("podSelector", {}).get("matchExpressions", [])
        for value in expression["values"]
    }
    assert clients == {
        name
        for name in SERVICES
        if "Directory(" in (k8s.ROOT / f"services/{name}/app.py").read_text()
    }
    mongo_from = policies["mongodb"]["spec"]["ingress"][0]["from"][0]["podSelector"]
    assert set(mongo_from["matchExpressions"][0]["values"]) == {
        name for name, cls in SETTINGS.items() if "mongo_url" in cls.model_fields
    }


def test_service_monitors_scrape_every_service_port(
    rendered: dict[str, list[k8s.Resource]],
) -> None:
    prod = rendered["prod"]
    monitors = of_kind(prod, "ServiceMonitor")
    selected = monitors["canopy"]["spec"]["selector"]["matchExpressions"][0]["values"]
    assert sorted(selected) == sorted(SERVICES)
    assert monitors["canopy"]["spec"]["endpoints"][0]["port"] == "http"
    assert monitors["canopy"]["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitors["rabbitmq"]["spec"]["endpoints"][0]["port"] == "prometheus"


def test_prometheus_rule_is_the_monitoring_rules_files(
    rendered: dict[str, list[k8s.Resource]],
) -> None:
    if not k8s.rules_files():
        pytest.skip("deploy/monitoring/rules/*.yml not there yet")
    (rule,) = of_kind(rendered["prod"], "PrometheusRule").values()
    groups = [
        group
        for path in k8s.rules_files()
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", [])
    ]
    assert groups, "the rules files hold no group"
    assert rule["spec"]["groups"] == groups
    assert k8s.rules_problems() == []


def test_operations_doc_tells_what_to_do_for_every_alert() -> None:
    alerts = [
        rule["alert"]
        for group in k8s.rule_groups()
        for rule in group.get("rules", [])
        if "alert" in rule
    ]
    if not alerts:
        pytest.skip("deploy/monitoring/rules/*.yml not there yet")
    text = (k8s.ROOT / "docs" / "operations.md").read_text()
    missing = [alert for alert in alerts if not re.search(rf"\b{alert}\b", text)]
    assert missing == []


def test_operations_doc_names_the_dashboards_real_panels() -> None:
    text = (k8s.ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## Read the dashboard") : text.index("## Drain a node")]
    named = re.findall(r"\*\*(.+?)\*\*", section)
    dashboard = json.loads((k8s.ROOT / "deploy/monitoring/grafana/canopy.json").read_text())
    titles = {panel.get("title") for panel in dashboard["panels"]}
    titles |= {
        inner.get("title") for panel in dashboard["panels"] for inner in panel.get("panels", [])
    }
    assert named, "the section names no panel"
    assert [name for name in named if name not in titles] == []
