"""Limits, deadlines, start-up failures and graceful shutdown, each on its own real server."""

import json
import logging
import os
import signal
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from service.config import ConfigError, message_limits, parse_config
from service.repository import RepositoryError, load_spec, version_state
from service.runtime import CPU, CUDA, Graph, RuntimeOptions, available_cores, choose_providers
from tests.conftest import ROOT, ServerProcess, wait_for
from tests.helpers import burst, metric, scrape


@pytest.fixture
def held_server(model_repo, tmp_path):
    """A batch goes only when full (5 rows): the timer never fires within a test, so whatever sits
    in the queue stays there until the test sends the rows that fill the batch. With an HTTP port."""
    proc = ServerProcess(
        model_repo, tmp_path / "held.log", "--max-batch-delay-ms", "600000", "--batch-delay", "always",
        "--max-batch-rows", "5", "--max-request-rows", "5", "--max-queue-rows", "6", "--max-interpolation-steps", "6",
        http=True,
    )  # fmt: skip
    yield proc
    proc.terminate()


def sample(stub, n, timeout=60.0):
    return stub.Sample.future(pb.SampleRequest(num_samples=n, seed=1), timeout=timeout)


def queued(server, rows: int) -> None:
    """Wait until the decoder's queue holds `rows` rows (the server's own gauge says so)."""
    wait_for(lambda: metric(scrape(server), "vae_queue_rows", graph="decoder") == rows)


def test_concurrent_requests_merge_into_one_batch(held_server):
    """Five one-row calls sent together go out as one batch of five: the batch leaves only when full,
    so each call is answered only once all five were merged (no timing decides it)."""
    burst(held_server.target, count=5, rows=1)
    text = scrape(held_server)
    assert metric(text, "vae_batch_rows_count", graph="decoder") == 1
    assert metric(text, "vae_batch_rows_sum", graph="decoder") == 5


def test_full_queue_refuses_at_once(held_server):
    with grpc.insecure_channel(held_server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        first = sample(stub, 4)
        queued(held_server, 4)
        with pytest.raises(grpc.RpcError) as err:
            stub.Sample(pb.SampleRequest(num_samples=4), timeout=60)  # 4 + 4 > 6: refused, not queued
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
        assert not first.done()  # still held: the refusal did not wait for the queue to move
        last = sample(stub, 1)  # fills the batch: both admitted calls complete
        assert first.result().images.tensor.shape == [4, 1, 8, 8] and last.result().images.tensor.shape == [1, 1, 8, 8]
    text = scrape(held_server)
    assert metric(text, "vae_rejections_total", reason="queue_full") == 1
    assert metric(text, "vae_batch_rows_sum", graph="decoder") == 5


def test_expired_deadline_is_dropped_before_compute(held_server):
    with grpc.insecure_channel(held_server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        doomed = stub.Sample.future(pb.SampleRequest(num_samples=2), timeout=5)
        queued(held_server, 2)  # admitted, then held past its deadline
        with pytest.raises(grpc.RpcError) as err:
            doomed.result()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        queued(held_server, 0)  # its rows leave the queue once its caller is gone, before any batch forms
        full = sample(stub, 5)  # the next batch computes only the live request
        assert full.result().images.tensor.shape == [5, 1, 8, 8]
        text = scrape(held_server)
    dropped = metric(text, "vae_rejections_total", reason="deadline") + metric(text, "vae_rejections_total", reason="cancelled")
    assert dropped == 1
    assert metric(text, "vae_batch_rows_sum", graph="decoder") == 5  # nothing of the expired request was computed


def test_http_timeouts_answer_504_at_the_deadline_and_free_the_queue(held_server):
    """HTTP has no client-side cancellation at a deadline, so the server ends the call itself: the
    held request (the batch never goes while it waits) is answered 504 and its rows leave the queue."""
    with httpx.Client(base_url=held_server.http_url, timeout=60) as web:
        r = web.get("/v1/models/digits/sample.png", params={"n": 2, "timeout": 0.5})
        assert r.status_code == 504 and "timeout" in r.json()["error"]
        queued(held_server, 0)
        z = {"name": "z", "datatype": "FP32", "shape": [3, 8], "data": [0.0] * 24}
        r = web.post("/v2/models/digits_decoder/infer", json={"inputs": [z], "parameters": {"timeout": 500_000}})
        assert r.status_code == 504 and "timeout" in r.json()["error"]
        queued(held_server, 0)
    with grpc.insecure_channel(held_server.target) as channel:
        assert sample(vae_pb2_grpc.VaeServiceStub(channel), 5).result().images.tensor.shape == [5, 1, 8, 8]
    text = scrape(held_server)
    assert metric(text, "vae_requests_total", rpc="http.Sample", code="DEADLINE_EXCEEDED") == 1
    assert metric(text, "vae_requests_total", rpc="http.oip.ModelInfer", code="DEADLINE_EXCEEDED") == 1
    assert metric(text, "vae_batch_rows_sum", graph="decoder") == 5  # nothing of the timed-out calls was computed


def test_graceful_shutdown_finishes_calls_in_flight(model_repo, tmp_path):
    proc = ServerProcess(
        model_repo, tmp_path / "drain.log", "--max-batch-delay-ms", "1500", "--batch-delay", "always",
        "--max-batch-rows", "5", "--grace-seconds", "30",
    )  # fmt: skip
    with grpc.insecure_channel(proc.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        in_flight = [sample(stub, 1), sample(stub, 2)]
        queued(proc, 3)  # both admitted, waiting for their batch
        proc.proc.send_signal(signal.SIGTERM)
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == not_serving)
        with pytest.raises(grpc.RpcError) as err:
            stub.Sample(pb.SampleRequest(num_samples=1), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert [f.result().images.tensor.shape[0] for f in in_flight] == [1, 2]
    assert proc.proc.wait(60) == 0
    log = proc.log.read_text()
    assert "stopped" in log and "after the grace period" not in log


def test_missing_model_repository_fails_clearly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-repo", str(tmp_path / "nope"), "--port", "0", "--metrics-port", "0", "--http-port", "0"],
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
    info["graphs"]["encoder"] = {"file": "encoder.onnx"}  # listed, but with no hash to check it by
    (broken / "digits" / "1" / "model.json").write_text(json.dumps(info))
    with pytest.raises(RepositoryError, match="encoder.onnx: model.json gives no sha256"):
        load_spec(broken, verify=False)  # refused even when the hashes are not computed
    for fmt in (2, None):
        info = json.loads((model_repo / "digits" / "1" / "model.json").read_text()) | {"format": fmt}
        (broken / "digits" / "1" / "model.json").write_text(json.dumps(info))
        with pytest.raises(RepositoryError, match=f"format {fmt}; this server reads format 1"):
            load_spec(broken)
    # A version that cannot be read has a state too, the same while it stays so: it is refused
    # once, not on every poll.
    assert version_state(broken, "digits", 9) == version_state(broken, "digits", 9) != version_state(broken, "digits", 1)
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


def test_inconsistent_limits_and_empty_token_file_are_refused(model_repo, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--max-batch-rows", "512", "--max-request-rows", "256"], env={})
    with pytest.raises(SystemExit):
        parse_config(["--max-interpolation-steps", "2000", "--max-queue-rows", "1500"], env={})
    assert "--max-interpolation-steps 2000 can never be met" in capsys.readouterr().err
    for share in ("0", "1.5"):
        with pytest.raises(SystemExit):
            parse_config(["--background-share", share], env={})
        assert f"--background-share must be in (0, 1], got {float(share)}" in capsys.readouterr().err
    assert parse_config([], env={"VAE_BACKGROUND_SHARE": "0.1"}).background_share == 0.1
    # 64 float32 images of 8x8 are 16 KiB: the default message size holds them, 8 KiB does not.
    assert message_limits(parse_config(["--max-batch-rows", "64", "--max-request-rows", "64"], env={}), (1, 8, 8), 8) == (64, 1024)
    small = parse_config(["--max-batch-rows", "64", "--max-request-rows", "64", "--max-message-bytes", str(64 * 1024 + 8192)], env={})
    with pytest.raises(ConfigError, match="--max-request-rows images"):
        message_limits(small, (1, 8, 8), 8)
    # A model of large latents (the hierarchical Twemoji recipe's 6,016) is served with fewer rows per
    # request than --max-request-rows, the most whose Encode answer (mu, sigma, z) fits one message;
    # at 64x64 its interpolations take fewer steps too, the most whose images and latents fit.
    room = parse_config([], env={}).max_message_bytes - 64 * 1024
    rows, steps = message_limits(parse_config([], env={}), (3, 32, 32), 6016)
    assert 256 <= rows < 1024 and (rows + 1) * 3 * 4 * 6016 > room and steps == 1024
    rows, steps = message_limits(parse_config([], env={}), (3, 64, 64), 6016)
    assert 2 <= steps < 1024 and (steps + 1) * 4 * (3 * 64 * 64 + 6016) > room
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-repo", str(model_repo), "--port", "0", "--metrics-port", "0", "--http-port", "0",
         "--max-message-bytes", "70000"], cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "more than --max-message-bytes 70000" in done.stderr
    (tmp_path / "tokens").write_text("# no token yet\n")
    done = subprocess.run(
        [sys.executable, "-m", "service", "--model-repo", str(model_repo), "--port", "0", "--metrics-port", "0", "--http-port", "0",
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
            f"--grpc_python_out={tmp_path}", "proto/vae/v1/vae.proto", "proto/inference/grpc_service.proto"]  # fmt: skip
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert protoc.main(args) == 0
    finally:
        os.chdir(cwd)
    for package, stem in (("vae/v1", "vae"), ("inference", "grpc_service")):
        for name in (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"):
            fresh = (tmp_path / "service/api" / package / name).read_text()
            assert fresh == (ROOT / "service/api" / package / name).read_text(), f"{name} is stale: run make proto"


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
    info = json.loads(done.stdout)  # `info`: numbers print as numbers, 64-bit ones too
    assert (info["version"], info["latent_dim"], info["image_shape"], info["max_batch_rows"]) == (1, 8, [1, 8, 8], 256)
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
    """With a ten-minute batch delay, a request with no company is not held for it (adaptive, the
    default): each of these calls could only finish by going at once."""
    proc = ServerProcess(model_repo, tmp_path / "adaptive.log", "--max-batch-delay-ms", "600000")
    try:
        with grpc.insecure_channel(proc.target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            for seed in range(3):
                stub.Sample(pb.SampleRequest(num_samples=1, seed=seed), timeout=120)
        text = scrape(proc)
        assert metric(text, "vae_queue_wait_seconds_count", graph="decoder") == 3
    finally:
        assert proc.terminate() == 0


def test_concurrent_calls_are_capped(model_repo, tmp_path):
    """Past --max-concurrent-calls a call is refused at once with RESOURCE_EXHAUSTED, and the calls
    admitted are served."""
    proc = ServerProcess(
        model_repo, tmp_path / "capped.log", "--max-concurrent-calls", "2", "--max-batch-delay-ms", "600000",
        "--batch-delay", "always", "--max-batch-rows", "5",
    )  # fmt: skip
    try:
        with grpc.insecure_channel(proc.target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            held = [sample(stub, 2), sample(stub, 2)]  # both wait for a fifth row that never comes
            queued(proc, 4)
            with pytest.raises(grpc.RpcError) as err:
                stub.Sample(pb.SampleRequest(num_samples=1), timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent-calls" in err.value.details()
            assert not any(f.done() for f in held)
            # Probes are not counted: at the cap, health still answers, so no orchestrator
            # restarts a busy server.
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert metric(scrape(proc), "vae_rejections_total", reason="concurrent_calls") == 1
            for f in held:
                f.cancel()
            queued(proc, 0)  # their rows left the queue at once; their slots free as their handlers end
            wait_for(lambda: metric(scrape(proc), "vae_requests_total", rpc="Sample", code="CANCELLED") == 2)
            assert stub.Sample(pb.SampleRequest(num_samples=5), timeout=60).images.tensor.shape == [5, 1, 8, 8]
    finally:
        assert proc.terminate() == 0


def test_a_model_whose_answers_outgrow_a_message_is_served_with_fewer_rows_per_request(model_repo, tmp_path):
    """A message limit that holds 300 of the digits model's rows (256 bytes each) caps its requests
    at 300 rows, said in ModelInfo and the log, instead of refusing the model (the hierarchical
    Twemoji recipe's 6,016 latents at the default limit); 301 rows are INVALID_ARGUMENT, 300 serve."""
    from service.tensors import from_array

    flags = ["--max-message-bytes", str(64 * 1024 + 300 * 256), "--max-interpolation-steps", "200"]  # 200 steps fit
    proc = ServerProcess(model_repo, tmp_path / "server.log", *flags)
    try:
        with grpc.insecure_channel(proc.target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            assert stub.GetModelInfo(pb.GetModelInfoRequest()).max_request_rows == 300
            images = np.random.default_rng(0).random((301, 1, 8, 8), dtype=np.float32)
            with pytest.raises(grpc.RpcError) as err:
                stub.Encode(pb.EncodeRequest(images=from_array(images)))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "300" in err.value.details()
            answer = stub.Encode(pb.EncodeRequest(images=from_array(images[:300]), sample=True, seed=1))
            assert answer.mu.shape == [300, 8]
        assert "at most 300 rows per request" in proc.log.read_text()
    finally:
        proc.terminate()
