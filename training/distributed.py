"""Data-parallel training on several processes: torch.distributed and DistributedDataParallel, with
the processes started by torchrun (on a cluster, by the Kubeflow training operator's PyTorchJob,
which runs torchrun on every node).

torchrun tells each process its place in the environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); without WORLD_SIZE above 1 a run is one process, `Dist()`, and nothing
here talks to anyone. How a run splits its work (`training.train`):

- Every rank holds the whole dataset and the same seeded generators, so every rank draws the same
  permutation, flips, binarization and reparameterization noise for each global batch
  (`--batch-size`), and keeps its own contiguous share of the batch (`Dist.share`). The data
  generator advances exactly as in a one-process run, so the permutations, and a checkpoint's
  generator states, do not depend on the number of processes: a run resumes on any number of them.
- Each mean over the batch is taken as a sum over the rank's rows divided by the global batch and
  multiplied by the number of ranks (`train.Shard`), which DDP's average over the ranks turns back
  into the mean over the whole batch: the gradient a single process gets for the same batch.
- Evaluation splits its images the same way and sums zero-padded per-image results
  (`gather_rows`), so every rank holds every image's figures, as one process would.
- Rank 0 alone logs, draws the progress bar and writes; the others read what it decides.

Collectives time out after `--dist-timeout` seconds (default 300), so a rank that hangs ends the
run with an error instead of stalling it; a rank that dies is noticed by torchrun, which stops
the others.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# How long the other ranks of a node wait while its local rank 0 prepares the data (a folder's first
# decode can take hours); a rank that dies meanwhile is still noticed by torchrun at once.
DATA_WAIT = timedelta(hours=24)


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device a `--device` flag names; under torchrun `cuda` (or `auto` with CUDA present) is
    LOCAL_RANK's GPU. `cuda:N` is refused there: every process of the node would share one GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if local_rank is None or device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"--device {name}: under torchrun each process uses LOCAL_RANK's GPU; pass --device cuda")
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank of world_size (one process: 0 of 1, backend None)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n rows (as torch.tensor_split: sizes differ by at most one,
        the first ranks take the extra rows; a rank's share is empty when n < world_size)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


def environment_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def setup(device: str, timeout_s: float) -> Dist:
    """Join the process group torchrun's environment describes (nccl on CUDA, gloo on CPU), each
    CUDA process on LOCAL_RANK's GPU; one process outside torchrun. Idempotent."""
    if dist.is_available() and dist.is_initialized():
        return current()
    rank, world, local = environment_world()
    if world == 1:
        return Dist()
    where = pick_device(device, local)
    backend = "nccl" if where.type == "cuda" else "gloo"
    if where.type == "cuda":
        torch.cuda.set_device(where)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return current()


def current() -> Dist:
    """The process group this process has joined, as a Dist; `Dist()` when none."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), environment_world()[2], dist.get_backend())


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_collective_error(err: BaseException) -> bool:
    """A collective that failed: a peer gone (connection closed), or one that timed out."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in ("gloo", "NCCL", "Timed out", "Connection closed"))


def collective_device(d: Dist) -> torch.device:
    """Where small reduction tensors live: NCCL reduces only CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if d.backend == "nccl" else torch.device("cpu")


def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Each value summed over the ranks (in float64); the values themselves in one process."""
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(d))
    dist.all_reduce(t)
    return t.tolist()


def any_rank(d: Dist, value: int) -> int:
    """The largest of the ranks' values (a signal number, 0 for none): every rank learns that one
    of them was asked to stop."""
    if not d.active:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=collective_device(d))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def global_mean(d: Dist, rows: torch.Tensor, total: int) -> torch.Tensor:
    """The mean over the whole global batch of per-row values [n_rank, ...] (no gradient): each
    rank's sum, summed over the ranks, over `total` rows."""
    s = rows.detach().sum(dim=0)
    if d.active:
        dist.all_reduce(s)
    return s / total


def gather_rows(d: Dist, local: torch.Tensor, rows: slice, n: int) -> torch.Tensor:
    """Every rank's rows [n, ...] from this rank's `rows` of them: each rank writes its own into
    zeros and the ranks sum, exactly (x + 0 is x), so every rank holds what one process computes."""
    if not d.active:
        return local
    full = local.new_zeros((n, *local.shape[1:]))
    full[rows] = local
    dist.all_reduce(full)
    return full


def from_main(d: Dist, make: Callable[[], T]) -> T:
    """What rank 0 computes (a file only it reads, a decision only it takes), on every rank."""
    if not d.active:
        return make()
    box: list[Any] = [make() if d.main else None]
    dist.broadcast_object_list(box, src=0, device=collective_device(d))
    return box[0]


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


@contextmanager
def local_main_first(d: Dist) -> Iterator[None]:
    """Run the body on each node's local rank 0 first, then on the node's other ranks: a folder is
    decoded (or a dataset downloaded) once per node, and the others read the cache it leaves.
    The wait has its own long timeout (`DATA_WAIT`): a first decode may outlast --dist-timeout."""
    if not d.active:
        yield
        return
    group = dist.new_group(backend="gloo", timeout=DATA_WAIT)
    if d.local_rank != 0:
        dist.barrier(group=group)
    yield
    if d.local_rank == 0:
        dist.barrier(group=group)
