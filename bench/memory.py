"""Resident memory of the server: idle after warm-up, the peak of one Score(16 images, k), and the
peak of four such calls at once (VmRSS and VmHWM from /proc, Linux).

    python -m bench.memory --model-repo models [--k 256] [--json runs/memory.json]

The peak is reset before each measurement, so each is that of its own calls (not of the warm-up).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.processes import ServiceProcess, one_model, rss_mb
from service import commands
from service.client import VaeClient
from service.commands import Parser, writable_folder

IMAGES = 16


def peak_from_now(pid: int) -> None:
    """Reset the process's peak resident memory (VmHWM) to its resident memory now, so the next
    peak is that of what runs next alone (Linux: /proc/PID/clear_refs, 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def build_parser() -> Parser:
    parser = Parser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model-repo", type=Path, required=True)
    parser.add_argument("--k", type=int, default=256, help="importance samples per image (default 256)")
    parser.add_argument("--threads", type=int, default=0, help="the server's --intra-op-threads")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = one_model(parser, args.model_repo)
    if args.json:
        writable_folder(args.json.parent, "--json")
    log = Path(tempfile.mkdtemp(prefix="bench-memory-")) / "server.log"
    server = ServiceProcess(args.model_repo, log, "--intra-op-threads", str(args.threads))
    pid = server.proc.pid
    images = np.random.default_rng(0).uniform(0, 1, (IMAGES, *spec.image_shape)).astype(np.float32)
    try:
        with VaeClient(server.target, timeout=600) as client:
            client.sample(4, seed=0)  # every path once, as a served model would have been called
            idle = rss_mb(pid)
            peak_from_now(pid)
            started = time.perf_counter()
            client.score(images, k=args.k, seed=1)
            one = {"peak_mb": rss_mb(pid, "VmHWM"), "seconds": time.perf_counter() - started}
            peak_from_now(pid)
            started = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda s: client.score(images, k=args.k, seed=s), range(4)))
            four = {"peak_mb": rss_mb(pid, "VmHWM"), "seconds": time.perf_counter() - started}
    finally:
        server.stop()
    report = {
        "model": {"name": spec.name, "version": spec.version, "image_shape": list(spec.image_shape),
                  "likelihood": spec.likelihood, "decoder_channels": spec.decoder_channels},
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "k": args.k, "idle_mb": idle, "one_score": one, "four_scores": four,
    }  # fmt: skip
    print(f"{spec.name} v{spec.version} {list(spec.image_shape)}: idle {idle:.0f} MiB; Score({IMAGES}, k={args.k}) "
          f"peak {one['peak_mb']:.0f} MiB in {one['seconds']:.2f}s; four at once peak {four['peak_mb']:.0f} MiB in "
          f"{four['seconds']:.2f}s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    commands.run(main, "python -m bench.memory")
