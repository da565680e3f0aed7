"""Faults for the torchrun ranks of tests/test_distributed.py: one function per fault.

torchrun starts this module in every rank in place of `python -m training`:

    torchrun --nproc-per-node 2 -m tests.faults FAULT KWARGS TRAINING_FLAGS...

FAULT names one function below (`none` for a plain run) and KWARGS is a JSON object of its keyword
arguments ('{}' for none). Each rank calls that function, which replaces a function of the training
code through `patch`, then runs `python -m training`'s own main with TRAINING_FLAGS. The faults that
stop a rank act at a numbered call of the objective (one call per training step) on one rank, so
every event a test waits for happens at a known step of the run, not at a moment on the clock.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from training import checkpoint, train


def this_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def patch(owner: object, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """The one patch point: `owner.name` becomes `wrap(original)`."""
    setattr(owner, name, wrap(getattr(owner, name)))


def at_call(rank: int, call: int, act: Callable[[], None]) -> None:
    """On rank `rank`, `act()` runs at its `call`-th call of the objective (1-based), before the call."""
    if this_rank() != rank:
        return
    calls = 0

    def wrap(objective: Callable) -> Callable:
        def counted(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == call:
                act()
            return objective(*args, **kwargs)

        return counted

    patch(train, "objective", wrap)


# ---- the faults ------------------------------------------------------------------------------------


def none() -> None:
    """No fault: the run `python -m training` makes."""


def unsynced() -> None:
    """Every rank steps on its own gradients (DDP's gradient sync switched off): the control."""

    def wrap(init: Callable) -> Callable:
        def unsynced_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.net.require_backward_grad_sync = False  # what DDP.no_sync() sets, for every step

        return unsynced_init

    patch(train.Trainer, "__init__", wrap)


def record_writes(record_dir: str) -> None:
    """Each rank lists the files it writes (checkpoints, figures, event files), in order, in
    record_dir/writes-rank{RANK}.json when it exits."""
    writes: list[str] = []

    def wrap_save(save: Callable) -> Callable:
        def recording_save(path, *args, **kwargs):
            writes.append(Path(path).name)
            return save(path, *args, **kwargs)

        return recording_save

    def wrap_figures(write_figures: Callable) -> Callable:
        def recording_figures(*args, **kwargs):
            written = write_figures(*args, **kwargs)
            writes.extend(p.name for p in written)
            return written

        return recording_figures

    def wrap_board(board: type) -> type:
        class RecordingBoard(board):  # type: ignore[valid-type, misc] - TensorBoard's event files, once written
            def close(self) -> None:
                super().close()
                writes.extend(p.name for p in Path(self.writer.log_dir).glob("events.out.tfevents.*"))

        return RecordingBoard

    patch(checkpoint, "save", wrap_save)
    patch(train, "write_figures", wrap_figures)
    patch(train, "Board", wrap_board)
    rank = this_rank()
    atexit.register(lambda: (Path(record_dir) / f"writes-rank{rank}.json").write_text(json.dumps(writes)))


def sigterm_at(rank: int, call: int) -> None:
    """Rank `rank` sends itself SIGTERM at its `call`-th call of the objective: a stop asked for."""
    at_call(rank, call, lambda: os.kill(os.getpid(), signal.SIGTERM))


def killed_at(rank: int, call: int) -> None:
    """Rank `rank` dies (SIGKILL, sent to itself) at its `call`-th call of the objective. Every other
    rank is sent SIGTERM, as torchrun sends it, just as it tells a failed collective from other
    errors: torchrun's own SIGTERM, arriving there, once ended rank 0 before it said why it failed."""
    at_call(rank, call, lambda: os.kill(os.getpid(), signal.SIGKILL))
    if this_rank() == rank:
        return
    from training import distributed

    check = distributed.is_collective_error

    def sigterm_first(err: BaseException) -> bool:
        os.kill(os.getpid(), signal.SIGTERM)
        return check(err)

    distributed.is_collective_error = sigterm_first


def hang_at(rank: int, call: int) -> None:
    """Rank `rank` stops answering at its `call`-th call of the objective, alive (torchrun cannot
    see it), outside any collective; torchrun's SIGTERM still ends it."""

    def hang() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the trainer's handler waits for a step end that never comes
        threading.Event().wait()

    at_call(rank, call, hang)


FAULTS = {fault.__name__: fault for fault in (none, unsynced, record_writes, sigterm_at, killed_at, hang_at)}


def main(argv: list[str]) -> None:
    fault, kwargs, *training_argv = argv
    FAULTS[fault](**json.loads(kwargs))
    from training.__main__ import main as training_main

    training_main(training_argv)


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
