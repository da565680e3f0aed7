"""Limits, deadlines, start-up failures and graceful shutdown, each on its own real server."""

import json
import logging
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from service.config import parse_config
from service.repository import RepositoryError, load_spec
from service.runtime import CPU, CUDA, Graph, RuntimeOptions, available_cores, choose_providers
from tests.conftest import ROOT, ServerProcess
from tests.test_service import burst, metric, scrape


@pytest.fixture
def slow_server(model_repo, tmp_path):
    """Batches wait up to 1.5 s to fill, so requests sit in the queue long enough to test around them."""
    proc = ServerProcess(
        model_repo, tmp_path / "slow.log", "--max-batch-delay-ms", "1500", "--batch-delay", "always",
        "--max-batch-rows", "5", "--max-request-rows", "5", "--max-queue-rows", "6", "--grace-seconds", "10",
    )  # fmt: skip
    yield proc
    proc.terminate()


def sample(stub, n, timeout=20.0):
    return stub.Sample.future(pb.SampleRequest(num_samples=n, seed=1), timeout=timeout)


def test_full_queue_refuses_at_once(slow_server):
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        first = sample(stub, 4)
        time.sleep(0.3)  # the first request is queued, waiting for its batch to fill
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Sample(pb.SampleRequest(num_samples=4), timeout=20)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
        assert time.monotonic() - started < 1.0  # refused, not queued behind the 1.5 s wait
        assert first.result().images.tensor.shape == [4, 1, 8, 8]  # the admitted call still completes
    assert metric(scrape(slow_server), "vae_rejections_total", reason="queue_full") == 1


def test_expired_deadline_is_dropped_before_compute(slow_server):
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Sample(pb.SampleRequest(num_samples=2), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.6)  # the batch forms after 1.5 s and finds the request expired
        text = scrape(slow_server)
    assert metric(text, "vae_rejections_total", reason="deadline") == 1
    assert metric(text, "vae_batch_rows_count", graph="decoder") == 0  # nothing was computed (warm-up bypasses the batcher)


def test_graceful_shutdown_finishes_calls_in_flight(slow_server):
    with grpc.insecure_channel(slow_server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        in_flight = [sample(stub, 1), sample(stub, 2)]
        time.sleep(0.3)
        slow_server.proc.send_signal(__import__("signal").SIGTERM)
        time.sleep(0.3)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Sample(pb.SampleRequest(num_samples=1), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert [f.result().images.tensor.shape[0] for f in in_flight] == [1, 2]
    assert slow_server.proc.wait(30) == 0
    assert "stopped" in slow_server.log.read_text()


def test_missing_model_repository_fails_clearly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-repo", str(tmp_path / "nope"), "--port", "0", "--metrics-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "does not exist" in done.stderr


def test_repository_checks(model_repo, tmp_path):
    spec = load_spec(model_repo)
    assert (spec.name, spec.version, spec.latent_dim, spec.image_shape) == ("digits", 1, 8, (1, 8, 8))
    import shutil

    broken = tmp_path / "repo"
    shutil.copytree(model_repo, broken)
    with open(broken / "digits" / "1" / "decoder.onnx", "ab") as f:
        f.write(b"torn")
    with pytest.raises(RepositoryError, match="sha256"):
        load_spec(broken)
    info = json.loads((broken / "digits" / "1" / "model.json").read_text())
    del info["graphs"]["encoder"]
    (broken / "digits" / "1" / "model.json").write_text(json.dumps(info))
    with pytest.raises(RepositoryError, match="encoder"):
        load_spec(broken)
    with pytest.raises(RepositoryError, match="version 7 not found"):
        load_spec(model_repo, version=7)
    with pytest.raises(RepositoryError, match="not found"):
        load_spec(model_repo, name="other")


def test_provider_selection(caplog):
    assert choose_providers(RuntimeOptions("cpu"), [CUDA, CPU]) == [CPU]
    providers = choose_providers(RuntimeOptions("auto", cuda_mem_limit_bytes=1 << 30), [CUDA, CPU])
    assert providers[0][0] == CUDA and providers[1] == CPU
    options = providers[0][1]
    assert options["cudnn_conv_algo_search"] == "HEURISTIC" and options["gpu_mem_limit"] == 1 << 30
    assert choose_providers(RuntimeOptions("auto"), [CPU]) == [CPU]
    with caplog.at_level(logging.WARNING):
        assert choose_providers(RuntimeOptions("cuda"), [CPU]) == [CPU]
    assert "serving on CPU" in caplog.text
    with pytest.raises(ValueError, match="device"):
        choose_providers(RuntimeOptions("tpu"), [CPU])


def test_default_threads_leave_a_core_to_the_event_loop(model_repo, tmp_path):
    affinity = len(os.sched_getaffinity(0))
    limit = tmp_path / "cpu.max"
    limit.write_text("max 100000\n")  # no quota
    assert available_cores(limit) == affinity
    limit.write_text("150000 100000\n")  # a container limited to 1.5 CPUs
    assert available_cores(limit) == 1
    assert available_cores(tmp_path / "absent") == affinity
    decoder = str(load_spec(model_repo).graph("decoder"))
    threads = lambda options: Graph(decoder, options, [CPU]).session.get_session_options().intra_op_num_threads  # noqa: E731
    assert threads(RuntimeOptions("cpu")) == max(1, available_cores() - 1)
    assert threads(RuntimeOptions("cpu", intra_op_threads=3)) == 3


def test_inconsistent_limits_and_empty_token_file_are_refused(model_repo, tmp_path):
    with pytest.raises(SystemExit):
        parse_config(["--max-batch-rows", "512", "--max-request-rows", "256"], env={})
    (tmp_path / "tokens").write_text("# no token yet\n")
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-repo", str(model_repo), "--port", "0", "--metrics-port", "0",
         "--auth-token-file", str(tmp_path / "tokens")], cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "holds no token" in done.stderr


def test_config_from_flags_and_environment():
    cfg = parse_config(["--port", "7000"], env={"VAE_METRICS_PORT": "9100", "VAE_PORT": "1", "VAE_MODEL_VERSION": "3"})
    assert (cfg.port, cfg.metrics_port, cfg.model_version) == (7000, 9100, 3)  # a flag beats the environment
    assert parse_config([], env={}).model_version is None


def test_generated_code_is_current(tmp_path):
    from grpc_tools import protoc

    args = ["protoc", "-Iservice/api=proto", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", "proto/vae/v1/vae.proto"]  # fmt: skip
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert protoc.main(args) == 0
    finally:
        os.chdir(cwd)
    for name in ("vae_pb2.py", "vae_pb2.pyi", "vae_pb2_grpc.py"):
        fresh = (tmp_path / "service/api/vae/v1" / name).read_text()
        assert fresh == (ROOT / "service/api/vae/v1" / name).read_text(), f"{name} is stale: run make proto"


def test_client_cli_writes_a_png(server, tmp_path):
    out = tmp_path / "grid.png"
    done = subprocess.run(
        [sys.executable, "-m", "service.client", "--target", server.target, "sample", "-n", "16", "--seed", "1",
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    for command in (["score", "--input", str(tmp_path / "x.npy"), "-k", "8"], ["info"]):
        done = subprocess.run(
            [sys.executable, "-m", "service.client", "--target", server.target, *command],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "service.client", "--target", server.target, "sample", "-n", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr


def test_batching_off_computes_every_request_alone(model_repo, tmp_path):
    proc = ServerProcess(model_repo, tmp_path / "off.log", "--batching", "off", "--max-batch-delay-ms", "50")
    try:
        burst(proc.target, count=20, rows=2)
        text = scrape(proc)
        assert metric(text, "vae_batch_rows_count", graph="decoder") == 20
        assert metric(text, "vae_batch_rows_sum", graph="decoder") == 40
    finally:
        assert proc.terminate() == 0


def test_adaptive_delay_lets_a_lone_request_through(model_repo, tmp_path):
    """With a 1.5 s batch delay, a request with no company is not held for it (adaptive, the default)."""
    proc = ServerProcess(model_repo, tmp_path / "adaptive.log", "--max-batch-delay-ms", "1500")
    try:
        with grpc.insecure_channel(proc.target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            for seed in range(3):
                stub.Sample(pb.SampleRequest(num_samples=1, seed=seed), timeout=20)
        text = scrape(proc)
        assert metric(text, "vae_queue_wait_seconds_count", graph="decoder") == 3
        assert metric(text, "vae_queue_wait_seconds_bucket", graph="decoder", le="0.5") == 3
    finally:
        assert proc.terminate() == 0
