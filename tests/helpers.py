"""Helpers that several test modules share; test modules import them from here, never from each other.

The fixtures (a trained model, its repository, a running server) live in tests/conftest.py, with
the classes and functions they are built from and which tests also use: `ServerProcess`,
`wait_for`, `HeldGraph`, `expected_sample`, `ROOT`. Reaching a server by a literal address is
tests/reach.py; throw-away certificate authorities are tests/certs.py.

Here: a free port, reading a server's Prometheus metrics (`scrape`, `metric`), loading a server
with gRPC calls (`burst`, `Load`), training a small model (`train`) and reading YAML manifests
(`documents`).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import yaml

from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a server's metrics ----------------------------------------------------------------------------


def scrape(server) -> str:
    """The Prometheus text a server (a `ServerProcess`) shows on its metrics port now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, family: str, /, **labels: str) -> float:
    """The sum of the samples of one family in Prometheus text whose labels include `labels` (0 if
    none): a series that gained labels (a model, a version) is still found by the ones asked for."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(family):
            continue
        head, value = line.rsplit(" ", 1)
        got = head[len(family) :]
        if got and not got.startswith("{"):
            continue  # another family with this one's name as prefix
        if want <= set(got.strip("{}").split(",")) - {""}:
            total += float(value)
    return total


# ---- load on a server ------------------------------------------------------------------------------


def burst(target: str, count: int, rows: int) -> None:
    """`count` Sample calls of `rows` rows, all sent at once."""

    async def send() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            await asyncio.gather(*(stub.Sample(pb.SampleRequest(num_samples=rows, seed=i), timeout=120) for i in range(count)))

    asyncio.run(send())


class Load:
    """Closed-loop callers in a background thread; every call's caller, status code and answer kept,
    in the order they ended."""

    def __init__(self, target: str, request: pb.SampleRequest, concurrency: int = 8) -> None:
        self.concurrency = concurrency
        self.calls: list[tuple[int, str, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(target, request, concurrency)))
        self._thread.start()

    async def _run(self, target: str, request: pb.SampleRequest, concurrency: int) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)

            async def caller(number: int) -> None:
                while not self._stop.is_set():
                    try:
                        response = await stub.Sample(request, timeout=60)
                        self.calls.append((number, "OK", response.images.tensor.data))
                    except grpc.aio.AioRpcError as err:
                        self.calls.append((number, err.code().name, b""))
                        await asyncio.sleep(0.01)

            await asyncio.gather(*(caller(number) for number in range(concurrency)))

    def stop(self) -> Counter:
        self._stop.set()
        self._thread.join(60)
        return Counter(code for _, code, _ in self.calls)

    def callers(self) -> list[list[str]]:
        """Each caller's status codes, in the order its calls were made."""
        return [[code for number, code, _ in self.calls if number == caller] for caller in range(self.concurrency)]


# ---- models and manifests --------------------------------------------------------------------------


def train(digits, out: Path, latent_dim: int = 8, epochs: int = 3, seed: int = 5):
    """A small VAE really trained on digits into `out` (the shape of the session's `trained` model,
    another seed by default): the model, in eval mode, and its TrainConfig."""
    from training.config import ModelConfig, TrainConfig
    from training.train import Trainer

    model = ModelConfig(latent_dim=latent_dim, widths=(16, 32), hidden=64)
    cfg = TrainConfig(model=model, epochs=epochs, batch_size=32, seed=seed)
    trainer = Trainer(cfg, out, digits)
    trainer.fit()
    return trainer.model.eval(), cfg


def documents(path: Path) -> list[dict]:
    """The YAML documents of a file, empty ones left out."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]
