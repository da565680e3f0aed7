"""Servers under test, each in its own process: started, timed to SERVING, measured, stopped."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.memory import MiB, status_bytes
from service.repository import ModelSpec, RepositoryError, load_spec


def one_model(parser: argparse.ArgumentParser, repo: Path) -> ModelSpec:
    """The one model of --model-repo a bench runs against, or the parser's one-line error."""
    try:
        return load_spec(repo)
    except RepositoryError as err:
        parser.error(f"--model-repo: {err}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process (VmRSS), or its peak (VmHWM), in MiB, from /proc (Linux)."""
    size = status_bytes(f"{field}:", pid)
    return size / MiB if size else float("nan")


class Process:
    def __init__(
        self, args: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """This Python running `args` in `cwd`, with `env` added to the environment (bench.ab runs
        another commit's code this way: its worktree as cwd and PYTHONPATH); `preexec` runs in the
        child before it starts (bench.memory moves it into a memory cgroup)."""
        self.log = log
        self.started = time.perf_counter()
        environment = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
        self.proc = subprocess.Popen(
            [sys.executable, *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=environment, cwd=cwd,
            preexec_fn=preexec,
        )  # fmt: skip

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def wait_for_line(self, marker: str, what: str) -> None:
        """Until the process logs `marker` (it is up); an error with its log if it exits first."""
        while marker not in self.log.read_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited: {self.log.read_text()}")
            time.sleep(0.02)


NO_HTTP = ("--http-port", "0")  # this checkout's server opens an HTTP port by default; none here


class ServiceProcess(Process):
    """`python -m service`; `cold_start_s` is process start to health SERVING. bench.ab starts
    another commit's server with `launcher` (a `-c` that logs which `service` package it imported,
    then runs it) and without the flags that server does not know (`own` = ())."""

    def __init__(
        self, model_repo: Path, log: Path, *extra: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        launcher: tuple[str, ...] = ("-m", "service"), own: tuple[str, ...] = NO_HTTP,
        preexec: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        super().__init__(
            [*launcher, "--model-repo", str(model_repo), "--host", "127.0.0.1", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--metrics-addr", "127.0.0.1", *own, *extra],
            log, cwd, env, preexec,
        )  # fmt: skip
        try:
            self.cold_start_s = self._wait_serving()
        except BaseException:
            self.stop()
            raise

    def _wait_serving(self, timeout: float = 120) -> float:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.perf_counter() - self.started < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"service exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - self.started
                except grpc.RpcError:
                    pass
                time.sleep(0.01)
        raise RuntimeError(f"service not SERVING after {timeout}s")


class EchoProcess(Process):
    def __init__(self, image_shape: tuple[int, ...], log: Path) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        super().__init__(["-m", "bench.echo", "--port", str(self.port), "--image-shape", ",".join(map(str, image_shape))], log)
        self.wait_for_line("echo on port", "echo server")
