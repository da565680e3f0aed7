"""Fixtures: the digits data, a small model trained on it, that model exported into a model
repository, and the real server on it. Beside them, what they are built from and tests use too:
`ServerProcess` (the server in its own process), `wait_for` (poll for an event the server shows),
`HeldGraph` (a graph function for batcher tests that holds its batch until released),
`expected_sample` (what Sample should answer) and `ROOT` (the repository). Other helpers that
several test modules share are in tests/helpers.py."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import free_port
from training.data import load_dataset

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Every server under test reads VAE_* settings from its environment: a developer's exported
    VAE_AUTH_TOKENS or VAE_DEVICE must not change what the tests run against. Torch gets one
    thread, here and in the processes the tests start: with a core taken by another process, its
    threads wait on each other and small training runs take many times longer."""
    for name in [n for n in os.environ if n.startswith("VAE_")]:
        del os.environ[name]
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    """The 8x8 digits bundled with scikit-learn: real data, no network, trains in seconds."""
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, digits):
    """A small VAE really trained on digits, and its run folder."""
    from training.config import ModelConfig, TrainConfig
    from training.train import Trainer

    out = tmp_path_factory.mktemp("digits-run")
    cfg = TrainConfig(model=ModelConfig(latent_dim=8, widths=(16, 32), hidden=64), epochs=8, batch_size=32)
    Trainer(cfg, out, digits).fit()
    (out / "metrics.json").write_text(json.dumps({"test": {"elbo": -27.0, "nll": 26.0}}))
    return out


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory, trained):
    """That model exported into a model repository, as the service reads it."""
    from export.repository import publish
    from training.checkpoint import load_model

    repo = tmp_path_factory.mktemp("models")
    model, cfg, _ = load_model(trained / "best.pt")
    publish(model, cfg, repo, "digits", {"elbo": -27.0, "nll": 26.0})
    return repo


def wait_for(predicate, timeout: float = 60.0) -> None:
    """Poll until `predicate()` holds: for ordering a test by an event the server shows (a metric,
    a log line, a status). The timeout only ends a test that would otherwise hang."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)


class HeldGraph:
    """A graph's run function for batcher tests: it signals when a batch reaches it and holds the
    batch until released, so a test orders itself on `computing`, not on the clock."""

    def __init__(self) -> None:
        self.computing, self.release = threading.Event(), threading.Event()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self.computing.set()
        self.release.wait(10)
        return [x]


def expected_sample(model, n: int, seed: int):
    """What Sample(n, seed) should answer, computed with torch from the service's own noise stream."""
    import torch

    from service.engine import normal

    z = normal(seed, (n, model.cfg.latent_dim))
    with torch.no_grad():
        return model.mean_image(model.decode(torch.from_numpy(z))).numpy()


class ServerProcess:
    """The real server, `python -m service`, in its own process on free ports."""

    def __init__(
        self, repo: Path, log: Path, *args: str, http: bool = False, loopback: bool = True,
        launcher: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        """`http`: open the HTTP port too (on a free port; `http_url`), which is off otherwise.
        `loopback`: bind 127.0.0.1 alone; False keeps the server's default addresses. `launcher`
        runs the server through another command (`ip netns exec NAME`)."""
        addresses = ["--host", "127.0.0.1", "--metrics-addr", "127.0.0.1"] if loopback else []
        self.log = log
        for attempt in range(3):
            # The HTTP port is picked before the server binds it: a test running beside this one
            # (pytest -n) may take it in between, and then another is picked.
            cmd = [*launcher, sys.executable, "-m", "service", "--model-repo", str(repo), "--port", "0", "--metrics-port",
                   "0", *addresses, "--intra-op-threads", "1", "--http-port", str(free_port()) if http else "0", *args]  # fmt: skip
            try:
                self._start(cmd, log)
                return
            except RuntimeError:
                if not http or attempt == 2 or "Address already in use" not in log.read_text():
                    raise

    def _start(self, cmd: list[str], log: Path) -> None:
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = re.search(r"on port (\d+) \(metrics on (\d+)(?:, HTTP on (\d+))?", log.read_text())
            if found:
                self.port, self.metrics_port = int(found[1]), int(found[2])
                self.target = f"127.0.0.1:{self.port}"
                self.http_port = int(found[3]) if found[3] else None
                self.http_url = f"http://127.0.0.1:{found[3]}" if found[3] else None
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{log.read_text()}")
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"server did not start:\n{log.read_text()}")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture(scope="session")
def server(model_repo, tmp_path_factory):
    proc = ServerProcess(model_repo, tmp_path_factory.mktemp("server") / "server.log", "--max-batch-delay-ms", "5")
    yield proc
    proc.terminate()


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser():
    """A real headless chromium through Selenium (Debian's chromium and chromium-driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_window_size(1280, 1000)
    yield driver
    driver.quit()
