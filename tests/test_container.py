"""The serving image, for real: `make image` builds it with podman, a container serves a mounted model
repository, and it is called over gRPC, health-checked, scraped and stopped with SIGTERM.

Needs podman (and root, as on the project's machines and in CI). Without podman the tests are skipped
with a reason, except in CI (CI=true), where a missing podman is a failure: .ci/run installs it.
"""

import base64
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import VaeClient
from service.vae_grpc import SERVICE  # not service.server: it loads the inference protocol's messages, which tritonclient holds in its tests
from tests.helpers import free_port, metric, scrape
from tests.reach import FAMILIES, grpc_health, http_get, url

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("VAE_IMAGE", "localhost/vae-serve:latest")
PODMAN = shutil.which("podman")
ENV = os.environ | {"CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(ROOT / "deploy" / "containers.conf"))}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([PODMAN, *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def image():
    """`make image`: the same command a user types; layers are cached, so a rebuild takes seconds."""
    if PODMAN is None:
        if os.environ.get("CI") == "true":
            pytest.fail("podman is not installed; .ci/run installs it (apt-get install podman runc debootstrap)")
        pytest.skip("podman is not installed: `apt-get install podman runc debootstrap`, then `make image`")
    started = time.monotonic()
    done = subprocess.run(["make", "--no-print-directory", "image", f"IMAGE={IMAGE}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, f"make image failed:\n{done.stdout[-5000:]}\n{done.stderr[-5000:]}"
    print(f"make image: {time.monotonic() - started:.1f}s")
    return IMAGE


@pytest.fixture(scope="module")
def inspected(image) -> dict:
    return json.loads(podman("image", "inspect", image).stdout)[0]


class Container:
    def __init__(self, name: str, port: int, metrics_port: int, http_port: int) -> None:
        self.name, self.port, self.metrics_port = name, port, metrics_port
        self.target = f"127.0.0.1:{port}"
        self.http_port = http_port
        self.http_url = f"http://127.0.0.1:{http_port}"

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def state(self) -> dict:
        return json.loads(podman("inspect", "--type", "container", self.name).stdout)[0]["State"]


def health_status(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return reply.status


@pytest.fixture(scope="module")
def container(image, model_repo, tmp_path_factory):
    """The image serving the test model repository, mounted read-only at /models; removed at the end.

    Host networking (the only kind podman has here), on free ports and the image's default addresses
    (every address, IPv4 and IPv6): the flags after the image name go to the server through the
    ENTRYPOINT. Health timers are off (they need systemd);
    test_health runs the image's HEALTHCHECK by hand.
    """
    repo = tmp_path_factory.mktemp("mounted") / "models"
    shutil.copytree(model_repo, repo)
    for path in [repo, *repo.rglob("*")]:  # readable by the image's non-root user
        path.chmod(0o755 if path.is_dir() else 0o644)
    c = Container(f"vae-test-{uuid.uuid4().hex[:8]}", free_port(), free_port(), http_port := free_port())
    try:
        podman("run", "--detach", "--name", c.name, "--network", "host", "--health-interval", "disable",
               # As deploy/k8s runs it: read-only root filesystem, no capabilities, no privilege gain.
               "--read-only", "--cap-drop", "all", "--security-opt", "no-new-privileges",
               "--volume", f"{repo}:/models:ro", image,
               "--port", str(c.port), "--metrics-port", str(c.metrics_port), "--http-port", str(http_port), "--intra-op-threads", "1")  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            try:
                if health_status(c.target) == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if not c.state()["Running"] or time.monotonic() > deadline:
                pytest.fail(f"the container did not start serving:\n{c.logs()}")
            time.sleep(0.2)
        yield c
    finally:
        podman("rm", "--force", "--time", "0", c.name, check=False)


def test_image_holds_no_torch_pip_or_compiler(image):
    probe = (
        "import importlib.util as u, json, shutil; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in ('torch', 'onnxruntime', 'grpc', 'pip', 'service')}"
        " | {'bin/' + t: shutil.which(t) for t in ('gcc', 'cc', 'c++', 'make', 'pip', 'pip3')}))"
    )
    found = json.loads(podman("run", "--rm", "--network", "host", "--no-healthcheck", "--entrypoint", "python3", image,
                              "-c", probe).stdout.strip().splitlines()[-1])  # fmt: skip
    assert found == {"torch": False, "onnxruntime": True, "grpc": True, "pip": False, "service": True,
                     "bin/gcc": None, "bin/cc": None, "bin/c++": None, "bin/make": None, "bin/pip": None,
                     "bin/pip3": None}  # fmt: skip
    done = podman("run", "--rm", "--network", "host", "--no-healthcheck", "--entrypoint", "python3", image, "-c", "import torch",
                  check=False)  # fmt: skip
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr


def test_image_settings(inspected):
    image_config = inspected["Config"]
    assert image_config["User"] == "10001:10001"
    assert image_config["Entrypoint"] == ["python3", "-m", "service"]
    assert set(image_config["ExposedPorts"]) == {"50051/tcp", "8000/tcp", "9090/tcp"}
    assert "VAE_MODEL_REPO=/models" in image_config["Env"]
    assert image_config["StopSignal"] in ("SIGTERM", "15")
    assert inspected["Healthcheck"]["Test"] == ["CMD", "python3", "/opt/vae/app/healthcheck.py"]


def test_flags_pass_through_the_entrypoint(image):
    done = podman("run", "--rm", "--network", "host", "--no-healthcheck", image, "--help")
    assert "--model-repo" in done.stdout and "--metrics-port" in done.stdout and "env VAE_MODEL_REPO" in done.stdout


def test_runs_as_non_root(container):
    assert podman("exec", container.name, "id", "-u").stdout.strip() == "10001"
    assert podman("exec", container.name, "id", "-g").stdout.strip() == "10001"


def test_sample_and_model_info(container, server):
    with VaeClient(container.target) as client, VaeClient(server.target) as process:
        info = client.info()
        assert (info.name, info.version, list(info.image_shape)) == ("digits", 1, [1, 8, 8])
        assert info.execution_provider == "CPUExecutionProvider" and info.likelihood == "bernoulli"
        x = client.sample(16, seed=7)
        assert x.shape == (16, 1, 8, 8) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
        assert np.array_equal(client.sample(16, seed=7), x)
        # The container serves exactly what the process serves from the same repository.
        np.testing.assert_allclose(x, process.sample(16, seed=7), atol=1e-6)
        pngs = client.sample(2, seed=7, format="png")
        assert all(p.startswith(b"\x89PNG") for p in pngs)


def test_http_port_serves_the_api_the_docs_and_the_page(container, server):
    """The image holds the HTTP stack and its files: no network, nothing from a CDN."""
    with httpx.Client(base_url=container.http_url, timeout=30) as web:
        assert web.get("/v2/health/ready").json() == {"ready": True}
        r = web.post("/v1/models/digits/sample", json={"num_samples": 4, "seed": 7, "encoding": "base64"})
        images = np.frombuffer(base64.b64decode(r.json()["images"]["b64"]), np.float32).reshape(4, 1, 8, 8)
        with VaeClient(server.target) as process:
            np.testing.assert_allclose(images, process.sample(4, seed=7), atol=1e-6)
        assert web.get("/v1/models/digits/sample.png", params={"n": 4}).content.startswith(b"\x89PNG")
        assert "VAE playground" in web.get("/").text
        assert web.get("/docs/assets/swagger-ui-bundle.js").status_code == 200


@pytest.mark.parametrize("host", FAMILIES)
def test_every_port_takes_ipv4_and_ipv6_clients(container, host):
    """As a kubelet's probes and Prometheus reach a pod: by its address, IPv4 in most clusters."""
    assert grpc_health(host, container.port) == "SERVING"
    assert http_get(url(host, container.http_port, "/v2/health/ready")) == "200"
    assert http_get(url(host, container.metrics_port, "/metrics")) == "200"


def test_health(container):
    for name in ("", SERVICE):
        assert health_status(container.target, name) == health_pb2.HealthCheckResponse.SERVING
    # The image's own HEALTHCHECK (deploy/healthcheck.py), which finds the port from the server's flags.
    done = podman("healthcheck", "run", container.name, check=False)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert podman("inspect", "--type", "container", container.name).stdout.count('"healthy"') >= 1


def test_metrics(container):
    with VaeClient(container.target) as client:
        client.sample(3, seed=1)
    text = scrape(container)
    assert metric(text, "vae_requests_total", rpc="Sample", code="OK") >= 1
    assert metric(text, "vae_model_info", name="digits", version="1", provider="CPUExecutionProvider") == 1


def test_sigterm_stops_the_container_cleanly(container):
    """Last: SIGTERM to the container reaches the server (PID 1), which drains and exits 0."""
    assert podman("exec", container.name, "cat", "/proc/1/cmdline").stdout.split("\0")[:3] == ["python3", "-m", "service"]
    podman("kill", "--signal", "TERM", container.name)
    code = podman("wait", container.name, timeout=60).stdout.strip()
    logs = container.logs()
    assert code == "0", logs  # exited by itself: a process killed for not stopping would give 137
    assert "shutting down" in logs and "stopped" in logs, logs
