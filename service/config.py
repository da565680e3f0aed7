"""Server settings: every flag also reads an environment variable (VAE_ + the flag in capitals)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from service.commands import Parser
from service.manifest import DECODER_PRECISIONS
from service.memory import parse_size
from service.repository import VersionPolicy


@dataclass(frozen=True)
class ServerConfig:
    model_repo: Path = Path("models")
    models: str = ""
    default_model: str | None = None
    version_policy: str = "latest:1"
    model_name: str | None = None
    model_version: int | None = None
    host: str = "[::]"
    port: int = 50051
    http_port: int = 8000
    metrics_port: int = 9090
    health_port: int | None = None
    metrics_addr: str = "[::]"
    device: str = "auto"
    intra_op_threads: int = 0
    split_rows: int = 128
    cpu_arena: str = "on"
    decoder_precision: str = "fp32"
    inter_op_threads: int = 1
    inference_workers: int = 0
    max_batch_rows: int = 256
    max_batch_delay_ms: float = 2.0
    max_queue_rows: int = 32768
    background_share: float = 0.25  # service.batcher.BACKGROUND_SHARE (which imports this module's readers)
    max_request_rows: int = 1024
    max_importance_samples: int = 5000
    max_interpolation_steps: int = 1024
    memory_budget: str = "auto"
    batching: str = "on"
    batch_delay: str = "adaptive"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    admin_token_file: Path | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    max_concurrent_calls: int = 256
    cors_origins: str = ""
    grace_seconds: float = 10.0
    watch_seconds: float = 5.0
    log_level: str = "INFO"

    def to_log(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


HELP = {
    "model_repo": "model repository folder (MODELS/<name>/<version>/...)",
    "models": "comma-separated models to serve (LoadModel adds others); default: every model in the repository",
    "default_model": "the model a request with an empty model_name gets; default: the only model, if one",
    "version_policy": "versions served per model: latest:N, all, or specific:V1,V2 (a model's serving.json may override)",
    "model_name": "shorthand for --models NAME --default-model NAME",
    "model_version": "shorthand for --version-policy specific:VERSION",
    "memory_budget": "bytes that loaded models and running requests may hold (e.g. 800M, 2G): a request that does not "
    "fit waits, one that never can is refused with RESOURCE_EXHAUSTED; auto: the container's memory limit (else half "
    "the machine's memory) less the process's footprint before any model and a margin; off: not by bytes",
    "admin_token_file": "bearer tokens for LoadModel/UnloadModel, one per line (VAE_ADMIN_TOKENS adds comma-separated "
    "ones); with --auth-token-file and without this, model control is refused",
    "device": "auto (CUDA if onnxruntime-gpu sees a GPU), cpu or cuda",
    "intra_op_threads": "onnxruntime's one intra-op thread pool, shared by every graph (0: one fewer than the cores, at least 1)",
    "split_rows": "on CPU, a batch of this many rows or more runs in two halves at once, one on the core the "
    "intra-op pool leaves to the event loop (0: never)",
    "inference_workers": "threads that run batches, shared by every graph of every model (0: one fewer than the cores, "
    "at least 1)",
    "max_batch_rows": "rows per batch sent to a graph",
    "max_batch_delay_ms": "how long the oldest queued request may wait for a batch to fill",
    "max_queue_rows": "rows that may wait per graph before requests are refused",
    "background_share": "of a batch's time, what bulk work (Score's and Classify's draws) gets while interactive calls "
    "wait or are about, in (0, 1]: less keeps Sample, Encode and Decode faster beside Score, more finishes Score sooner",
    "max_request_rows": "images or latents in one request",
    "decoder_precision": "fp32; fp16 serves decoder_fp16.onnx (export --fp16-decoder, for GPUs), int8 decoder_int8.onnx "
    "(export --int8-decoder, for CPUs)",
    "cpu_arena": "on (onnxruntime keeps a batch's working memory between batches: faster; each model holds it of the "
    "memory budget) or off (it goes back after each batch)",
    "batching": "on, or off to compute every request alone (a baseline for benchmarks)",
    "batch_delay": "adaptive (wait for company only once requests arrive together) or always",
    "grace_seconds": "how long calls in flight may take to finish on SIGTERM",
    "health_port": "also serve grpc.health.v1 alone, in plaintext, on this port (for probes when the main port has TLS)",
    "watch_seconds": "how often to look for a newer model version (0: only on SIGHUP)",
    "tls_cert": "PEM certificate (chain) for TLS on the gRPC and HTTP ports; with --tls-key",
    "tls_key": "PEM private key for --tls-cert",
    "tls_client_ca": "PEM CA bundle: clients must present a certificate it signed (mutual TLS)",
    "auth_token_file": "bearer tokens, one per line (VAE_AUTH_TOKENS adds comma-separated ones)",
    "host": "address the gRPC, HTTP and --health-port ports bind to: [::] takes IPv4 and IPv6 clients (IPv4 alone "
    "on a host without IPv6); 0.0.0.0 all of IPv4; 127.0.0.1 or ::1 that address alone",
    "metrics_addr": "address the metrics port binds to, read as --host",
    "http_port": "the HTTP port: the Open Inference Protocol's REST API, vae.v1 as plain HTTP, the OpenAPI docs and the "
    "playground page, with the gRPC port's TLS, tokens and limits (0: off)",
    "cors_origins": "comma-separated origins whose browser pages may call the HTTP port (CORS); default: none",
    "max_message_bytes": "the largest gRPC message and HTTP request body",
    "max_concurrent_calls": "inference calls in progress at once, vae.v1 and the Open Inference Protocol's on both "
    "ports; beyond it RESOURCE_EXHAUSTED at once (health checks, the Open Inference Protocol's metadata calls and "
    "model control are not counted)",
}


MESSAGE_OVERHEAD = 64 * 1024  # protobuf framing and the small fields beside a message's tensors


class ConfigError(ValueError):
    """Settings that cannot work together; the message says which."""


def _optional_int(value: str) -> int | None:
    return None if value in ("", "none", "None") else int(value)


def parse_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> ServerConfig:
    env = dict(os.environ) if env is None else env
    parser = Parser(prog="python -m service", description="Serve a VAE over gRPC and HTTP.")
    for f in fields(ServerConfig):
        default = f.default
        env_name = f"VAE_{f.name.upper()}"
        paths = {name: Path for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "admin_token_file")}
        optional = {"model_version": _optional_int, "health_port": _optional_int, "model_name": str, "default_model": str}
        kind = {**optional, **paths}.get(
            f.name, type(default)
        )
        if env_name in env:
            default = kind(env[env_name])
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=kind, default=default,
            help=f"{HELP.get(f.name, f.name.replace('_', ' '))} (env {env_name}, default %(default)s)",
        )  # fmt: skip
    config = ServerConfig(**vars(parser.parse_args(argv)))
    if config.model_name:
        config = replace(config, models=config.models or config.model_name, default_model=config.default_model or config.model_name)
    if config.model_version is not None:
        config = replace(config, version_policy=f"specific:{config.model_version}")
    try:
        VersionPolicy.parse(config.version_policy)
    except ValueError as err:
        parser.error(f"--version-policy: {err}")
    if config.memory_budget not in ("auto", "off"):
        try:
            parse_size(config.memory_budget)
        except ValueError as err:
            parser.error(f"--memory-budget: {err}, or auto, or off")
    if config.batching not in ("on", "off"):
        parser.error(f"--batching must be on or off, got {config.batching!r}")
    if not 1 <= config.max_batch_rows <= config.max_request_rows <= config.max_queue_rows:
        parser.error(
            "limits must satisfy 1 <= --max-batch-rows <= --max-request-rows <= --max-queue-rows, got "
            f"{config.max_batch_rows}, {config.max_request_rows}, {config.max_queue_rows}"
        )
    if config.max_interpolation_steps > config.max_queue_rows:
        parser.error(
            f"--max-interpolation-steps {config.max_interpolation_steps} can never be met: an interpolation's "
            f"steps are decoded as one request, and the queue holds --max-queue-rows {config.max_queue_rows}"
        )
    if not 0 < config.background_share <= 1:
        parser.error(f"--background-share must be in (0, 1], got {config.background_share}")
    if config.split_rows < 0:
        parser.error(f"--split-rows must be 0 (never) or more, got {config.split_rows}")
    if config.inference_workers < 0:
        parser.error(f"--inference-workers must be 0 (automatic) or more, got {config.inference_workers}")
    if not 0 <= config.http_port <= 65535:
        parser.error(f"--http-port must be a port number, or 0 for no HTTP port; got {config.http_port}")
    if config.max_concurrent_calls < 1:
        parser.error(f"--max-concurrent-calls must be at least 1, got {config.max_concurrent_calls}")
    if (config.tls_cert is None) != (config.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        parser.error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if config.decoder_precision not in ("fp32", *DECODER_PRECISIONS):
        parser.error(f"--decoder-precision must be fp32, {', '.join(DECODER_PRECISIONS)}; got {config.decoder_precision!r}")
    if config.cpu_arena not in ("on", "off"):
        parser.error(f"--cpu-arena must be on or off, got {config.cpu_arena!r}")
    if config.batch_delay not in ("adaptive", "always"):
        parser.error(f"--batch-delay must be adaptive or always, got {config.batch_delay!r}")
    return config


def message_limits(config: ServerConfig, image_shape: tuple[int, int, int], latent_dim: int) -> tuple[int, int]:
    """The rows one request of this model may hold and the steps of its interpolations:
    --max-request-rows and --max-interpolation-steps, or fewer where that many would not fit in one
    gRPC message (a model of large latents: Encode's mu, sigma and z; an interpolation's images and
    latents), so that no call the limits allow fails with RESOURCE_EXHAUSTED from gRPC itself.
    ConfigError where not even a batch of rows fits: the model cannot be served so."""
    image, latent = 4 * math.prod(image_shape), 4 * latent_dim  # float32 bytes per row
    per_row, room = max(image, 3 * latent), config.max_message_bytes - MESSAGE_OVERHEAD
    model = f"a {'x'.join(map(str, image_shape))} model with {latent_dim} latents"
    fits = max(room, 0) // per_row
    if fits < min(config.max_request_rows, config.max_batch_rows):
        raise ConfigError(
            f"--max-request-rows images or Encode's mu, sigma and z of {model} take {config.max_request_rows * per_row} "
            f"bytes, more than --max-message-bytes {config.max_message_bytes}: lower the limit or raise --max-message-bytes"
        )
    return min(config.max_request_rows, fits), min(config.max_interpolation_steps, max(2, room // (image + latent)))
