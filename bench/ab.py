"""`python -m bench.ab --base REF --model-repo DIR [--new REF] [--quick] [--slices N] --json OUT`:
this checkout's server against another commit's, on the same model with the same flags, loaded in
interleaved slices (bench/interleave.py): one ratio new/base per pair of slices, the median with
the pairs' min..max, and both servers' absolute figures.

The base runs from a detached git worktree of REF in a temporary folder (removed afterwards), with
that folder as its working directory and PYTHONPATH: this checkout is installed editable, and
without them `python -m service` would import this checkout's code. Each server logs the `service`
package it imported and the run refuses to go on if that is not its own tree's. The new server is
the working tree, or `--new REF` from a second worktree (to pin it while the working tree changes).
Both serve the same model repository unless `--base-model-repo` gives the base one it can read
(the same graphs under an older model.json). A worktree whose generated protobuf code does not load
on the installed protobuf runtime gets it made again from its own .proto files (the JSON says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from bench.interleave import SLICES, Slicing, figures, range_of, ratios, slice_count, used
from bench.processes import NO_HTTP, ServiceProcess, one_model
from bench.scenarios import Scenario, grpc_slices
from service import commands
from service.commands import Parser, existing_folder, writable_folder
from service.repository import ModelSpec

CHECKOUT = Path(__file__).resolve().parents[1]
SCENARIOS = [
    Scenario("Sample", 1, 1),
    Scenario("Sample", 1, 16),
    Scenario("Sample", 1, 64),
    Scenario("Sample", 256, 4),
    Scenario("Encode", 64, 8),
    Scenario("Decode", 64, 8),
]
# Run in place of `-m service`: says which package this process imported, then serves.
LAUNCHER = (
    "-c",
    "import runpy, service; print('service package:', service.__path__[0], flush=True); "
    "runpy.run_module('service', run_name='__main__', alter_sys=True)",
)


@dataclass(frozen=True)
class Tree:
    """Where one server's code lives: `commit` checked out at `root`, or the working tree."""

    label: str
    root: Path
    commit: str
    working_tree: bool = False

    def knows(self, flag: str) -> bool:
        """Whether this tree's server takes `flag` (older commits lack newer flags)."""
        help_text = subprocess.run(
            [sys.executable, "-m", "service", "--help"], cwd=self.root, env=self.env(), capture_output=True, text=True
        ).stdout
        return flag in help_text

    def env(self) -> dict[str, str]:
        return os.environ | {"PYTHONPATH": str(self.root)}


def protos_import(tree: Tree) -> bool:
    """Whether the tree's generated protobuf code loads on the protobuf runtime installed here."""
    check = [sys.executable, "-c", "import service.api.vae.v1.vae_pb2"]
    return subprocess.run(check, cwd=tree.root, env=tree.env(), capture_output=True).returncode == 0


def regenerate_protos(tree: Tree) -> None:
    """The worktree's generated code made again from its own .proto files by this environment's
    grpc_tools (its Makefile's `proto` target). An older commit's gencode may demand another protobuf
    runtime than the installed one (6cd3c9b's wants >= 7.35; the dev extras now pin < 7); made here,
    the messages are the same and both servers run on the same protobuf runtime."""
    subprocess.run(["make", "-C", str(tree.root), "proto", f"PY={sys.executable}"], check=True, capture_output=True)
    if not protos_import(tree):
        raise RuntimeError(f"{tree.label} ({tree.commit[:7]}): its generated protobuf code does not load here, even regenerated")


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(CHECKOUT), *args], check=True, capture_output=True, text=True).stdout.strip()


def is_commit(ref: str) -> bool:
    try:
        git("rev-parse", "--verify", f"{ref}^{{commit}}")
    except (subprocess.CalledProcessError, OSError):
        return False
    return True


@contextlib.contextmanager
def worktree(label: str, ref: str) -> Iterator[Tree]:
    """A detached worktree of `ref` in a temporary folder, removed (with its git bookkeeping) after."""
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    folder = Path(tempfile.mkdtemp(prefix=f"bench-ab-{label}-"))
    git("worktree", "add", "--detach", str(folder / "tree"), commit)
    try:
        yield Tree(label, folder / "tree", commit)
    finally:
        git("worktree", "remove", "--force", str(folder / "tree"))
        shutil.rmtree(folder, ignore_errors=True)


def working_tree() -> Tree:
    return Tree("new", CHECKOUT, git("rev-parse", "HEAD"), working_tree=True)


def start(tree: Tree, model_repo: Path, flags: list[str], log: Path) -> tuple[ServiceProcess, str]:
    """The tree's server, and the `service` package it logged; refused if that lies outside the tree."""
    own = NO_HTTP if tree.knows(NO_HTTP[0]) else ()
    server = ServiceProcess(model_repo, log, *flags, cwd=tree.root, env=tree.env(), launcher=LAUNCHER, own=own)
    package = next(line.split(": ", 1)[1] for line in log.read_text().splitlines() if line.startswith("service package: "))
    if not Path(package).resolve().is_relative_to(tree.root.resolve()):
        server.stop()
        raise RuntimeError(f"the {tree.label} server imported {package}, not {tree.root}/service")
    return server, package


def compare(
    spec: ModelSpec, scenarios: list[Scenario], servers: dict[str, ServiceProcess], slicing: Slicing
) -> list[dict[str, Any]]:
    results = []
    targets = {name: server.target for name, server in servers.items()}
    pids = tuple(server.proc.pid for server in servers.values())
    for s in scenarios:
        rounds = asyncio.run(grpc_slices(spec, s, targets, slicing, pids))
        parts = rounds.parts
        ratio = ratios(parts["new"], parts["base"])
        results.append({
            "scenario": s.label, "rpc": s.rpc, "rows_per_request": s.rows, "concurrency": s.concurrency,
            "base": figures(parts["base"], s.rows), "new": figures(parts["new"], s.rows), "new_over_base": ratio.to_json(),
            "rounds": rounds.to_json(),
        })  # fmt: skip
        print(f"  {s.label}: new/base {ratio}, rounds {rounds.to_json()}", flush=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    """requests/s of each server over the rounds used; new/base the median over the pairs, min-max
    their range; used: the rounds used of those measured (the quiet ones, bench/interleave.py)."""
    head = (f"{'scenario':<18}{'base req/s':>12}{'new req/s':>12}{'new/base':>10}{'min-max':>12}{'base p50':>10}"
            f"{'new p50':>10}{'used':>7}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in results:
        ratio, rounds = r["new_over_base"], r["rounds"]
        lines.append(
            f"{r['scenario']:<18}{r['base']['requests_per_s']:>12.1f}{r['new']['requests_per_s']:>12.1f}"
            f"{ratio['median']:>10.3f}{range_of(ratio):>12}{r['base']['p50_ms']:>10.2f}"
            f"{r['new']['p50_ms']:>10.2f}{used(rounds):>7}"
        )
    return "\n".join(lines)


def describe(tree: Tree, package: str, model_repo: Path, regenerated: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "commit": tree.commit, "service_package": package, "model_repo": str(model_repo), "protos_regenerated": regenerated,
    }  # fmt: skip
    if tree.working_tree:
        out["working_tree_changes"] = git("status", "--porcelain", "--", "service").splitlines()
    return out


def build_parser() -> Parser:
    """The command's parser: a pure reading of the flags (the docs' commands are checked with it)."""
    parser = Parser(prog="python -m bench.ab", description=commands.summary(__doc__))
    parser.add_argument("--base", required=True, help="the commit to compare with (any git revision)")
    parser.add_argument("--new", help="a commit for the new side instead of the working tree")
    parser.add_argument("--model-repo", type=Path, required=True)
    parser.add_argument("--base-model-repo", type=Path, help="for the base, when it cannot read --model-repo's model.json")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="3 s per scenario and server instead of 10")
    parser.add_argument("--slices", type=slice_count, default=SLICES, help="slices per scenario and server, in turns")
    parser.add_argument("--threads", type=int, default=0, help="both servers' --intra-op-threads")
    parser.add_argument("--scenarios", help="comma-separated labels to run of: " + ", ".join(s.label for s in SCENARIOS))
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    scenarios = [s for s in SCENARIOS if not args.scenarios or s.label in args.scenarios.split(",")]
    if not scenarios:
        parser.error(f"--scenarios {args.scenarios!r} names none of: {', '.join(s.label for s in SCENARIOS)}")
    for flag, ref in (("--base", args.base), ("--new", args.new)):
        if ref is not None and not is_commit(ref):
            parser.error(f"{flag} {ref}: not a commit of {CHECKOUT} (git rev-parse cannot find it)")
    slicing = Slicing.of(args.quick, args.slices)
    spec = one_model(parser, args.model_repo)
    if args.base_model_repo:
        existing_folder(args.base_model_repo, "--base-model-repo")
    writable_folder(args.json.parent, "--json")
    base_repo = (args.base_model_repo or args.model_repo).resolve()
    flags = ["--intra-op-threads", str(args.threads)]
    logs = Path(tempfile.mkdtemp(prefix="bench-ab-logs-"))

    with contextlib.ExitStack() as stack:
        base_tree = stack.enter_context(worktree("base", args.base))
        new_tree = stack.enter_context(worktree("new", args.new)) if args.new else working_tree()
        regenerated = {}
        for tree in (base_tree, new_tree):  # never the working tree's: that is this checkout's own code
            regenerated[tree.label] = not tree.working_tree and not protos_import(tree)
            if regenerated[tree.label]:
                regenerate_protos(tree)
        servers: dict[str, ServiceProcess] = {}
        try:
            servers["base"], base_package = start(base_tree, base_repo, flags, logs / "base.log")
            servers["new"], new_package = start(new_tree, args.model_repo.resolve(), flags, logs / "new.log")
            print(f"model {spec.name} v{spec.version}; base {base_tree.commit[:7]} ({base_package}), new "
                  f"{new_tree.commit[:7]}{' + working tree' if new_tree.working_tree else ''} ({new_package}); "
                  f"{slicing.duration:.0f} s per scenario and server in {args.slices} slices; logs in {logs}", flush=True)  # fmt: skip
            results = compare(spec, scenarios, servers, slicing)
        finally:
            for server in servers.values():
                server.stop()
    report = {
        "model": {"name": spec.name, "version": spec.version, "image_shape": list(spec.image_shape), "latent_dim": spec.latent_dim},
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort.__version__},
        "base": describe(base_tree, base_package, base_repo, regenerated["base"]),
        "new": describe(new_tree, new_package, args.model_repo.resolve(), regenerated["new"]),
        "flags": flags,
        "quick": args.quick,
        "slices": args.slices,
        "seconds_per_slice": slicing.seconds,
        "ratio_spread": "min..max of the per-pair ratios new/base of interleaved slices; the ratio is their median",
        "scenarios": results,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print()
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    commands.run(main, "python -m bench.ab")
