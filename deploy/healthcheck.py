"""The image's HEALTHCHECK: ask the server's grpc.health.v1.Health for its overall status.

Exit 0 when SERVING, 1 otherwise (NOT_SERVING while warming up or draining, or no answer). The port
and address are the server's own: read from its command line and environment (PID 1, where the
ENTRYPOINT runs it), so `--port 6000` given to `docker run` is followed without repeating it here.

    python3 /opt/vae/app/healthcheck.py [--service NAME] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import parse_config
from service.listen import WILDCARDS, bare, grpc_address


def server_argv_env() -> tuple[list[str], dict[str, str] | None]:
    """The serving process's flags and environment, when PID 1 is `python3 -m service ...`."""
    try:
        argv = Path("/proc/1/cmdline").read_bytes().decode().split("\0")[:-1]
        env_items = Path("/proc/1/environ").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return [], None
    if "service" not in argv or argv[argv.index("service") - 1] != "-m":
        return [], None
    env = dict(item.split("=", 1) for item in env_items if "=" in item)
    return argv[argv.index("service") + 1 :], env


def target() -> str:
    argv, env = server_argv_env()
    try:
        config = parse_config(argv, env)
    except SystemExit:  # flags this parser does not know: fall back to our own environment
        config = parse_config([], None)
    host = "127.0.0.1" if bare(config.host) in (*WILDCARDS, "0.0.0.0") else config.host
    return grpc_address(host, config.port if config.health_port is None else config.health_port)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", default="", help="health service name ('' is the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    address = target()
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as err:
        print(f"{address}: {err.code().name} {err.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
