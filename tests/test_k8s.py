"""deploy/k8s/ is well-formed and agrees with the app (no cluster here: parse every manifest and check names,
ports, probes, env against Settings, and the router's metric names against what /metrics exposes)."""

from __future__ import annotations

import asyncio
import ipaddress
import re
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from fastapi.testclient import TestClient
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
Doc = dict[str, Any]


def _docs() -> dict[tuple[str, str], Doc]:
    out: dict[tuple[str, str], Doc] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict) and doc.get("kind"), path
            key = (str(doc["kind"]), str(doc["metadata"]["name"]) if "metadata" in doc else path.name)
            assert key not in out, f"{key} twice"
            out[key] = cast(Doc, doc)
    return out


def _container(deployment: Doc) -> Doc:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return cast(Doc, container)


def _env_names(container: Doc, docs: dict[tuple[str, str], Doc]) -> dict[str, Doc]:
    """Every env var a container gets: its own list, and each ConfigMap it loads whole."""
    names: dict[str, Doc] = {e["name"]: e for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        config = docs[("ConfigMap", source["configMapRef"]["name"])]
        names.update({k: {"name": k, "value": v} for k, v in config["data"].items()})
    return names


def test_every_manifest_parses_and_kustomize_lists_them() -> None:
    docs = _docs()
    assert {("Deployment", "oppu-api"), ("Service", "oppu-api"), ("Deployment", "oppu-worker")} <= set(docs)
    assert {("InferencePool", "oppu"), ("Deployment", "oppu-router"), ("Service", "oppu-router")} <= set(docs)
    assert ("PersistentVolumeClaim", "oppu-adapters") in docs
    listed = set(docs[("Kustomization", "kustomization.yaml")]["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == files  # the example Secret is never applied (placeholders)


@pytest.mark.parametrize("name", ["oppu-api", "oppu-worker"])
def test_env_matches_settings_and_secrets_come_from_secrets(name: str) -> None:
    docs = _docs()
    container = _container(docs[("Deployment", name)])
    env = _env_names(container, docs)
    fields = Settings.model_fields
    for var in env:
        assert var.startswith("OPPU_") and var.removeprefix("OPPU_").lower() in fields, f"{name}: {var} is no setting"
    secret = docs[("Secret", "oppu-secrets")]
    for var in ("OPPU_DATABASE_URL", "OPPU_REDIS_URL", "OPPU_ADMIN_KEY", "OPPU_MASTER_KEY", "OPPU_KEYRING_URL"):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "oppu-secrets" and ref["key"] in secret["stringData"], (name, var)
    for var, entry in env.items():
        if re.search(r"KEY|TOKEN|PASSWORD|_URL$", var):
            assert "valueFrom" in entry, f"{name}: {var} must come from the Secret"
    for value in secret["stringData"].values():
        assert value == "" or "change-me" in value  # placeholders only
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["adapters"] == env["OPPU_ADAPTERS_DIR"]["value"]  # the shared store is where the app looks
    volumes = {v["name"]: v for v in docs[("Deployment", name)]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["adapters"]["persistentVolumeClaim"]["claimName"] == "oppu-adapters"
    assert docs[("PersistentVolumeClaim", "oppu-adapters")]["spec"]["accessModes"] == ["ReadWriteMany"]
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    (arg,) = container["args"]
    assert re.search(rf"^\s*{arg}\) ", entrypoint, re.M), f"{name}: entrypoint has no `{arg}` command"


def test_api_ports_probes_and_service() -> None:
    docs = _docs()
    api = docs[("Deployment", "oppu-api")]
    container = _container(api)
    ((port,),) = [[p for p in container["ports"] if p["name"] == "http"]]
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    entry_port = re.search(r"oppu serve --host 0\.0\.0\.0 --port (\d+)", entrypoint)
    assert entry_port is not None and port["containerPort"] == int(entry_port[1])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    assert api["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = docs[("Service", "oppu-api")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] == "http" and svc_port["port"] == port["containerPort"]
    security = api["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 10001  # the image's `oppu` user


def test_inference_pool_and_router_point_at_each_other() -> None:
    docs = _docs()
    pool = docs[("InferencePool", "oppu")]["spec"]
    api = docs[("Deployment", "oppu-api")]
    assert pool["selector"]["matchLabels"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    assert [p["number"] for p in pool["targetPorts"]] == [_container(api)["ports"][0]["containerPort"]]
    router_svc = docs[("Service", "oppu-router")]
    assert pool["endpointPickerRef"]["name"] == router_svc["metadata"]["name"]
    assert pool["endpointPickerRef"]["port"]["number"] in [p["port"] for p in router_svc["spec"]["ports"]]
    args = _container(docs[("Deployment", "oppu-router")])["args"]
    assert "--pool-name=oppu" in args
    route = docs[("HTTPRoute", "oppu")]["spec"]["rules"]
    v1 = [r for r in route if any(m["path"]["value"] == "/v1/" for m in r["matches"])]
    assert v1 and v1[0]["backendRefs"][0]["kind"] == "InferencePool"
    routed = [m["path"]["value"] for r in route for m in r["matches"]]
    assert not [p for p in routed if p.startswith(("/metrics", "/docs", "/openapi"))]


def test_the_router_may_read_its_pool_and_the_pods() -> None:
    """The picker watches its InferencePool and the pool's pods: under the namespace's default account (no
    rules) it got Forbidden and /v1/ had no endpoint picker."""
    docs = _docs()
    spec = docs[("Deployment", "oppu-router")]["spec"]["template"]["spec"]
    account = spec["serviceAccountName"]
    assert ("ServiceAccount", account) in docs
    (binding,) = [d for (kind, _), d in docs.items() if kind == "RoleBinding" and d["subjects"][0]["name"] == account]
    rules = docs[("Role", binding["roleRef"]["name"])]["rules"]
    pool_group = docs[("InferencePool", "oppu")]["apiVersion"].split("/")[0]

    def allowed(group: str, resource: str) -> bool:
        return any(
            group in r["apiGroups"] and resource in r["resources"] and {"get", "watch", "list"} <= set(r["verbs"])
            for r in rules
        )

    assert allowed(pool_group, "inferencepools") and allowed("", "pods")
    assert not [r for r in rules if set(r["verbs"]) - {"get", "watch", "list"}]  # read-only


def _router_config() -> Doc:
    config = _docs()[("ConfigMap", "oppu-router-config")]["data"]["config.yaml"]
    return cast(Doc, yaml.safe_load(config))


def test_router_scores_lora_affinity_and_queues() -> None:
    config = _router_config()
    assert config["kind"] == "EndpointPickerConfig"
    types = {p.get("name", p["type"]): p["type"] for p in config["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer"} <= set(types.values())
    (profile,) = config["schedulingProfiles"]
    refs = [p["pluginRef"] for p in profile["plugins"]]
    assert set(refs) <= set(types) and "lora-affinity-scorer" in refs and "queue-scorer" in refs


def test_router_reads_metrics_the_app_exposes(sqlite_client: TestClient) -> None:
    """The metric names the router is told to read are series our /metrics really has."""
    args = _container(_docs()[("Deployment", "oppu-router")])["args"]
    wanted = {a.split("=", 1)[1] for a in args if a.split("=", 1)[0].endswith("-metric")}
    assert wanted == {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info"}
    text = sqlite_client.get("/metrics").text
    exposed = {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert wanted <= exposed, wanted - exposed


def _setting(name: str, field: str) -> str:
    """A Deployment's value of an OPPU_* setting: its env or ConfigMap, else the Settings default."""
    docs = _docs()
    env = _env_names(_container(docs[("Deployment", name)]), docs)
    var = f"OPPU_{field.upper()}"
    if var in env:
        return str(env[var]["value"])
    return str(Settings.model_fields[field].default)


def _client_seen(trusted: str, peer: str, forwarded_for: str) -> str:
    """The client address the app sees (its ProxyHeadersMiddleware, as create_app adds it) for a request from
    `peer` carrying this X-Forwarded-For."""
    seen: list[str] = []

    async def app(scope: Any, _receive: Any, _send: Any) -> None:
        seen.append(scope["client"][0])

    scope = {"type": "http", "client": (peer, 40000), "headers": [(b"x-forwarded-for", forwarded_for.encode())]}
    asyncio.run(ProxyHeadersMiddleware(app, trusted_hosts=trusted)(scope, None, None))  # type: ignore[arg-type]
    return seen[0]


def test_api_takes_client_addresses_from_the_gateway() -> None:
    """Unset, every pod saw the Gateway's address for everyone: the per-client caps (failed-auth limiter, request
    bodies arriving at once) acted per Gateway, i.e. on all users together."""
    trusted = _setting("oppu-api", "forwarded_allow_ips")
    assert trusted, "OPPU_FORWARDED_ALLOW_IPS unset: the Gateway is the one client behind everyone"
    Settings(forwarded_allow_ips=trusted)
    entries = [e.strip() for e in trusted.split(",")]
    assert entries and "*" not in entries
    networks = [ipaddress.ip_network(e) for e in entries]  # strict: a CIDR as written, no stray host bits
    for net in networks:
        assert net.is_private and net.prefixlen >= 8, net  # a cluster's own range, never the internet
    gateway = str(next(networks[0].hosts()))
    assert _client_seen(trusted, gateway, "203.0.113.7") == "203.0.113.7"
    # The Gateway appends the peer it saw; what the client wrote itself (left of it) is skipped.
    assert _client_seen(trusted, gateway, "198.51.100.1, 203.0.113.7") == "203.0.113.7"
    assert _client_seen(trusted, "203.0.113.9", "198.51.100.1") == "203.0.113.9"  # from outside: not believed
    readme = (K8S / "README.md").read_text()
    assert "OPPU_FORWARDED_ALLOW_IPS" in readme and "pod CIDR" in readme
    if not [kind for kind, _ in _docs() if kind == "NetworkPolicy"]:
        assert "No NetworkPolicy ships here" in readme  # only the Gateway may reach the pods: say who must


def test_pods_stop_within_their_grace() -> None:
    """uvicorn waits for open streams (up to OPPU_REQUEST_TIMEOUT_S) before the app's shutdown: a 60 s grace cut
    them and skipped the shutdown. A preStop sleep keeps the pod serving while it leaves the endpoints."""
    docs = _docs()
    api = docs[("Deployment", "oppu-api")]["spec"]["template"]["spec"]
    command = _container(docs[("Deployment", "oppu-api")])["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    pre_stop_s = float(command[1])
    assert 1 <= pre_stop_s <= 15
    # `sleep` must exist in the image: Debian's python slim has coreutils (distroless would not).
    base = re.search(r"^FROM (\S+)", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    assert base is not None and re.fullmatch(r"python:[\d.]+-slim(-\w+)?", base[1]), base
    timeout_s = float(_setting("oppu-api", "request_timeout_s"))
    assert api["terminationGracePeriodSeconds"] >= pre_stop_s + timeout_s + 10  # the grace counts from preStop
    worker = docs[("Deployment", "oppu-worker")]["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= 60  # the running job stops at its next training step
