"""The Kubernetes manifests and Prometheus configuration in deploy/: they parse, and they agree with
the image (Dockerfile) and the server (service/config.py): ports, paths, user, probe service name,
settings, and a termination grace period that covers the server's drain."""

import re
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from service.config import ServerConfig, parse_config
from tests.helpers import documents

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DEFAULTS = ServerConfig()


def everything() -> list[dict]:
    return [d for path in sorted(K8S.glob("*.yaml")) for d in documents(path)]


def of_kind(kind: str) -> list[dict]:
    return [d for d in everything() if d["kind"] == kind]


def dockerfile_stage(target: str) -> str:
    """The text of one stage of the Dockerfile."""
    text = (ROOT / "Dockerfile").read_text()
    found = re.search(rf"^FROM \S+ AS {target}\n(.*?)(?=^FROM |\Z)", text, re.S | re.M)
    assert found, f"no stage {target} in the Dockerfile"
    return found[1]


def image_facts(target: str) -> dict:
    stage = dockerfile_stage(target)
    env = dict(re.findall(r"\b(VAE_[A-Z_]+)=(\S+)", stage))
    return {
        "expose": {int(p) for line in re.findall(r"^EXPOSE (.+)$", stage, re.M) for p in line.split()},
        "uid": int(re.search(r"^ARG UID=(\d+)$", stage, re.M)[1]),
        "user": re.search(r"^USER (\S+)$", stage, re.M)[1],
        "env": env,
        "healthcheck": re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", stage, re.M | re.S)[1],
    }


DEPLOYMENTS = {d["metadata"]["name"]: d for d in of_kind("Deployment")}


def test_every_manifest_parses_and_is_named():
    docs = everything()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap",
                                         "PersistentVolumeClaim", "ServiceMonitor", "Kustomization"}  # fmt: skip
    for d in docs:
        assert d["apiVersion"] and (d["kind"] == "Kustomization" or d["metadata"]["name"]), d
    listed = documents(K8S / "kustomization.yaml")[0]["resources"]
    assert all((K8S / name).is_file() for name in listed)
    assert set(DEPLOYMENTS) == {"vae-serve", "vae-serve-gpu"}


@pytest.mark.parametrize("name, target", [("vae-serve", "cpu"), ("vae-serve-gpu", "gpu")])
def test_deployment_agrees_with_the_image_and_the_server(name, target):
    image = image_facts(target)
    pod = DEPLOYMENTS[name]["spec"]["template"]
    assert DEPLOYMENTS[name]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert c["image"].startswith("localhost/vae-serve:")

    # The settings: env and args parse as the server's own flags would.
    env = image["env"] | {e["name"]: e["value"] for e in c.get("env", [])}
    assert all(k[4:].lower() in {f.name for f in fields(ServerConfig)} for k in env), env
    config = parse_config(c.get("args", []), env)
    assert str(config.model_repo) == "/models"

    # Ports: the image exposes them, the server listens on them, the manifest names them.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": config.port, "http": config.http_port, "metrics": config.metrics_port}
    assert set(ports.values()) == image["expose"] == {DEFAULTS.port, DEFAULTS.http_port, DEFAULTS.metrics_port}

    # Probes: the Open Inference Protocol's health routes on the HTTP port; readiness turns false
    # while no model is served and from the first moment of a drain.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert ports[c[probe]["httpGet"]["port"]] == config.http_port, probe
    assert c["readinessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "healthcheck.py" in image["healthcheck"]

    # The model repository is mounted where the image's VAE_MODEL_REPO points, read-only.
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "models"]
    assert mount["mountPath"] == image["env"]["VAE_MODEL_REPO"] == "/models" and mount["readOnly"]

    # Metrics annotations point Prometheus at the metrics port and path.
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == config.metrics_port
    assert notes["prometheus.io/path"] == "/metrics"

    # The image's non-root user, and nothing that would let it become root.
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == image["uid"] != 0
    assert image["user"] == "${UID}:${UID}" and security["runAsGroup"] == image["uid"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False

    # Termination: preStop pause + the server's drain (grace seconds) + a second to close fit the grace period.
    pause = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pause + config.grace_seconds + 1

    # Resources: requests and limits for CPU and memory; the GPU variant asks for one GPU.
    res = c["resources"]
    assert {"cpu", "memory"} <= res["requests"].keys() and {"cpu", "memory"} <= res["limits"].keys()
    if target == "gpu":
        assert res["limits"]["nvidia.com/gpu"] == 1 and config.device == "cuda"
        assert c["image"].endswith(":gpu")
    else:
        assert "nvidia.com/gpu" not in res["limits"] and config.device == "cpu"
        # Threads come from the server's default (the cgroup's CPU limit less one core for the event
        # loop); a fixed count here would be wrong whenever the limit changes.
        assert config.intra_op_threads == DEFAULTS.intra_op_threads == 0


def test_services_reach_the_pods():
    pods = [d["spec"]["template"] for d in DEPLOYMENTS.values()]
    for svc in of_kind("Service"):
        selector = svc["spec"]["selector"]
        assert all(selector.items() <= pod["metadata"]["labels"].items() for pod in pods)
        for port in svc["spec"]["ports"]:
            for pod in pods:
                named = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
                assert port["targetPort"] in named and named[port["targetPort"]] == port["port"]
    (main,) = [s for s in of_kind("Service") if s["metadata"]["name"] == "vae-serve"]
    assert {p["name"] for p in main["spec"]["ports"]} == {"grpc", "http", "metrics"}


def test_autoscalers_target_the_deployments():
    hpas = {h["metadata"]["name"]: h for h in of_kind("HorizontalPodAutoscaler")}
    assert set(hpas) == set(DEPLOYMENTS)
    for name, hpa in hpas.items():
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", name)
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        (container,) = DEPLOYMENTS[name]["spec"]["template"]["spec"]["containers"]
        assert "cpu" in container["resources"]["requests"]  # utilization targets need a request


def test_prometheus_scrapes_the_metrics_port():
    (config_map,) = of_kind("ConfigMap")
    (job,) = yaml.safe_load(config_map["data"]["vae-serve-scrape.yml"])["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == "vae-serve"
    assert keep[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"
    (monitor,) = of_kind("ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics" and monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    local = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (static,) = local["scrape_configs"]
    assert static["static_configs"][0]["targets"] == [f"127.0.0.1:{DEFAULTS.metrics_port}"]


def test_make_image_without_podman_says_what_to_install():
    done = subprocess.run(
        ["make", "--no-print-directory", "image", "PODMAN=/nonexistent/podman"], cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    first = done.stderr.splitlines()[0]
    assert "apt-get install podman" in first and "docker build" in first, done.stderr


@pytest.mark.parametrize("manifest, protocol", [("inferenceservice.yaml", "grpc"), ("inferenceservice-http.yaml", "http")])
def test_kserve_predictor_agrees_with_the_image_and_the_server(manifest, protocol):
    """deploy/kserve: the serving image as a KServe predictor on the v2 protocol over gRPC or HTTP."""
    (isvc,) = documents(ROOT / "deploy" / "kserve" / manifest)
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    notes = isvc["metadata"]["annotations"]
    assert notes["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container" and c["image"] == DEPLOYMENTS["vae-serve"]["spec"]["template"]["spec"]["containers"][0]["image"]
    image = image_facts("cpu")
    env = image["env"] | {e["name"]: e["value"] for e in c.get("env", [])}
    assert all(k[4:].lower() in {f.name for f in fields(ServerConfig)} for k in env), env
    config = parse_config(c.get("args", []), env)
    # KServe sends gRPC to the port named h2c and HTTP to the one named http1: the server's port for
    # the protocol, which the image exposes; the probes ask that port.
    (port,) = c["ports"]
    name, number = ("h2c", config.port) if protocol == "grpc" else ("http1", config.http_port)
    assert (port["name"], port["containerPort"]) == (name, number) and number in image["expose"]
    assert int(notes["prometheus.kserve.io/port"]) == config.metrics_port and notes["prometheus.kserve.io/path"] == "/metrics"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe][protocol if protocol == "grpc" else "httpGet"]["port"] == number, probe
    if protocol == "grpc":
        assert c["readinessProbe"]["grpc"]["service"] == "inference.GRPCInferenceService"
    else:
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready" and c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "models"]
    assert mount["mountPath"] == str(config.model_repo) == "/models" and mount["readOnly"]
    (volume,) = [v for v in predictor["volumes"] if v["name"] == "models"]
    (pvc,) = of_kind("PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert c["securityContext"]["runAsUser"] == image["uid"] and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert config.grace_seconds + 1 <= 30  # the pod's default termination grace
