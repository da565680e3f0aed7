"""Checkpoints: plain tensors and containers, loaded with weights_only=True (nothing is unpickled).

A checkpoint carries the full config, so `load_model` can rebuild the network without any flags.
Checkpoints are always read onto the CPU: the random generators' saved states must be CPU
ByteTensors to be restored, whatever device trained the model. Weights move to the device after.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from service.commands import UsageError
from training.config import TrainConfig, from_dict, to_dict
from training.families import Model, build

FORMAT = 1


def save(path: Path, model: Model, cfg: TrainConfig, **extra: Any) -> None:
    """Write atomically and durably: a temp file, flushed to disk, renamed over `path`, and the
    rename itself flushed, so neither a crash nor a power cut leaves a torn or missing checkpoint."""
    state = {"format": FORMAT, "config": to_dict(cfg), "model": model.state_dict(), **extra}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the file itself is already on disk
    finally:
        os.close(fd)


class CheckpointError(UsageError, ValueError):
    """A file named as a checkpoint or classifier that is not one of this project's, or that comes
    from a version of it whose layout this one cannot rebuild."""


def read(path: Path | str, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A file the user named, read with torch.load (weights only, onto the CPU): CheckpointError,
    saying which file and why, unless it is a dict holding `keys`. `what` completes 'PATH is not ...'."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err
    except Exception as err:  # torch's readers raise anything from KeyError to RuntimeError on a foreign file
        cause = innermost(err)  # torch wraps the reason in advice to turn weights_only off, which is never right here
        if str(cause).startswith("Unsupported global"):
            raise CheckpointError(
                f"{path} is not {what}: it holds Python objects, which are never unpickled (torch.load weights_only: "
                f"{first_line(cause)})"
            ) from err
        raise CheckpointError(f"{path} is not {what}: torch cannot read it ({type(cause).__name__}: {first_line(cause)})") from err
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise CheckpointError(f"{path} is not {what}: it holds no {', '.join(missing)}")
    return state


def innermost(err: BaseException) -> BaseException:
    """The exception at the bottom of `err`'s chain: what went wrong, under the wrappers' advice."""
    while err.__cause__ or err.__context__:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return err


def first_line(err: BaseException, limit: int = 160) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


CHECKPOINT = "a checkpoint of this project (the best.pt or last.pt that python -m training writes)"


def load(path: Path | str) -> dict[str, Any]:
    """The checkpoint dict, every tensor on the CPU."""
    state = read(path, CHECKPOINT, ("format", "config", "model"))
    if state["format"] != FORMAT:
        raise CheckpointError(
            f"{path} comes from another version of this project (checkpoint format {state['format']!r}; this one reads "
            f"{FORMAT}): use that version, or train again"
        )
    return state


def load_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[Model, TrainConfig, dict[str, Any]]:
    """The model on `device` in eval mode, its training config, and the whole checkpoint dict (on the CPU)."""
    state = load(path)
    model, cfg = model_from_state(state, device, source=path)
    return model, cfg, state


def model_from_state(
    state: dict[str, Any], device: torch.device | str = "cpu", source: Path | str = "the checkpoint"
) -> tuple[Model, TrainConfig]:
    """The Model a loaded checkpoint dict holds, on `device` in eval mode, and its training config.
    CheckpointError, naming `source`, where its config or weights are not this version's layout."""
    try:
        cfg = from_dict(TrainConfig, state["config"])
    except (TypeError, ValueError) as err:  # a config of settings this version does not accept
        raise CheckpointError(f"{source} comes from a version of this project whose config this one cannot read "
                              f"({first_line(err)}): use that version, or train again") from err  # fmt: skip
    model = build(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:  # the weights' names or shapes are another layout's
        raise CheckpointError(f"{source} comes from a version of this project whose model this one cannot rebuild "
                              f"({first_line(err)}): use that version, or train again") from err  # fmt: skip
    return model.to(device).eval(), cfg
