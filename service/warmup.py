"""A version's warm-up: every graph run before traffic (so the first call pays no set-up), its outputs'
shapes checked against model.json, and its bytes per row measured, from which its requests are
costed (`service.costs`) and its batches capped by bytes.

The runs go small first: a probe batch shows the bytes per row, which cap the batch before the
largest batch runs, so a 64x64 model's warm-up does not itself take what a 1 GiB container has.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from service.costs import F32, Costs, Work, measure
from service.memory import fresh_blocks
from service.manifest import ModelSpec
from service.runtime import ModelLoadError, Runtime
from service.scoring import CHUNK_BYTES, IN_FLIGHT, SCORE_CHUNK_VALUES, chunk_rows

if TYPE_CHECKING:
    from service.engine import BatchSettings

PROBE_ROWS = 32  # the batch that shows a graph's bytes per row, before the largest runs
BATCH_SHARE = 0.25  # of the memory budget, the most one batch of each graph may take
# With onnxruntime's arena, the most one batch of each graph may take: the arena keeps it for good,
# so it is the idle footprint (a 64x64 colour model's 256-row batch kept 660 MiB; 96 MiB is 44 rows).
BATCH_BYTES = 96 << 20


def warm_up(
    spec: ModelSpec, runtime: Runtime, batch: BatchSettings, budget: float, arena: bool = True
) -> tuple[Costs, BatchSettings]:
    """Run each graph at the warm-up sizes (default 1, 2 and the batch limit) and check its shapes;
    measure its bytes per row on a probe batch, and cap its batch so that one batch of each graph
    takes at most BATCH_BYTES (with onnxruntime's `arena`, which keeps it for good) and
    BATCH_SHARE of `budget`. ModelLoadError for a graph whose shapes disagree with model.json."""
    with fresh_blocks():
        return _warm_up(spec, runtime, batch, min(BATCH_SHARE * budget, BATCH_BYTES if arena else math.inf))


def _warm_up(spec: ModelSpec, runtime: Runtime, batch: BatchSettings, share: float) -> tuple[Costs, BatchSettings]:
    c, h, w = spec.image_shape
    d = spec.latent_dim
    mean = spec.distribution.image
    in_batch = runtime.images_per_batch(spec.distribution)

    def decode(z: np.ndarray) -> list[np.ndarray]:  # as Engine._decode_batch runs a batch
        return runtime.decode(z, mean if in_batch else None)

    k = len(spec.classes) if spec.conditional else 0  # a conditional model's rows end with class weights
    graphs: dict[str, tuple[Callable[[np.ndarray], list[np.ndarray]], tuple[int, ...]]] = {
        "encoder": (runtime.encoder.run, (c * h * w + k,) if k else (c, h, w)),
        "decoder": (decode, (d + k,)),
        **{role: (graph.run, (d,)) for role, graph in runtime.priors.items()},
        **{role: (graph.run, (c * h * w + d + k,)) for role, graph in runtime.family.items()},  # the posterior's x_eps(_y)
    }
    runs: dict[str, list[tuple[int, int | None]]] = {role: [] for role in (*graphs, "mean")}

    def run(n: int) -> None:
        got, want = {}, {}
        for role, (fn, shape) in graphs.items():
            outputs, peak = measure(lambda: fn(np.zeros((n, *shape), np.float32)))  # noqa: B023 - called at once
            runs[role].append((n, peak))
            got[role] = [o.shape for o in outputs]
            if role == "decoder" and not in_batch:
                _, peak = measure(lambda: mean(outputs[0]))  # noqa: B023
                runs["mean"].append((n, peak))
        want["encoder"], want["decoder"] = (
            [(n, d), (n, d)],
            [(n, spec.decoder_channels, h, w)] + ([(n, c, h, w)] if in_batch else []),
        )
        for role in runtime.priors:  # a flow's: eps -> z and z -> (eps, log p(z))
            want[role] = {"prior_sample": [(n, d)], "prior_density": [(n, d), (n,)]}[role]
        for role in runtime.family:  # a hierarchical model's posterior: x_eps -> (params, log_ratio, u)
            want[role] = [(n, spec.decoder_channels, h, w), (n,), (n, d)]
        if got != want:
            raise ModelLoadError(f"{spec.folder}: graphs give shapes {got} at batch {n}, model.json says {want}")

    largest = batch.max_batch_rows
    run(1)  # the first run of a session allocates what it keeps: measured apart from the rows
    for role in runs:
        runs[role].clear()
    probe = min(PROBE_ROWS, largest)
    for n in sorted({1, probe}):
        run(n)  # what the probe grows by over one row, per row: each graph's bytes per row
    costs = _costs(spec, runs, largest, _score_arithmetic(spec), in_batch, batch.max_queue_rows)
    largest = min(largest, costs.batch_limit(share))
    runtime.cap_batches(largest)  # before the largest runs: the arena then holds what split halves take
    for n in sorted({*(min(n, largest) for n in batch.warmup_batch_sizes or (2,)), largest} - {1, probe}):
        run(n)  # the largest last: an arena then holds its peak from the start
    return dataclasses.replace(costs, batch_rows=largest), dataclasses.replace(batch, max_batch_rows=largest)


def _costs(
    spec: ModelSpec, runs: dict[str, list[tuple[int, int | None]]], batch_rows: int, likelihood: tuple[Work, int],
    in_batch: bool, queue_rows: int,
) -> Costs:  # fmt: skip
    c, h, w = spec.image_shape
    image, latent, params = F32 * c * h * w, F32 * spec.latent_dim, F32 * spec.decoder_channels * h * w
    return Costs(
        image=image, latent=latent, params=params, batch_rows=batch_rows,
        encoder=Work.fit(runs["encoder"], 2 * latent),
        decoder=Work.fit(runs["decoder"], params + (image if in_batch else 0)),
        mean=None if in_batch else Work.fit(runs["mean"], image),
        prior=Work.fit([r for role in ("prior_sample", "prior_density") for r in runs.get(role, [])], 2 * latent)
        if "prior_sample" in runs else None,
        posterior=Work.fit(runs["posterior"], params + 2 * latent) if "posterior" in runs else None,
        score_rows=chunk_rows(spec.decoder_channels * h * w, 1 << 62, queue_rows), score_in_flight=IN_FLIGHT,
        likelihood=likelihood[0], likelihood_rows=likelihood[1],
    )  # fmt: skip


def _score_arithmetic(spec: ModelSpec) -> tuple[Work, int]:
    """Score's likelihood arithmetic (`ScoreSums`) on one slice of a chunk, measured on zeros: its
    bytes per row, and the slice's rows."""
    c, h, w = spec.image_shape
    values = spec.decoder_channels * h * w
    rows = max(1, min(SCORE_CHUNK_VALUES // values, CHUNK_BYTES // (F32 * values)))
    x = np.zeros((rows, c, h, w))
    params = np.zeros((rows, spec.decoder_channels, h, w), np.float32)
    _, peak = measure(lambda: spec.distribution.log_prob(x, params))
    per_row = peak // rows if peak is not None else 3 * 8 * values  # else three float64 temporaries of its size
    return Work(0, per_row), rows
