"""The model families the server serves, by model.json's "family": the engine that runs a version's
operations on its graphs. A family is one engine module (`service.engine` for the flat VAE,
`service.hierarchical` for the hierarchical one), its graphs in `service.manifest.FAMILY_ROLES`,
and one line in ENGINES.
"""

from __future__ import annotations

from concurrent.futures import Executor

from service.engine import BatchSettings, Engine, RequestLimits, graph_bytes, load_estimate
from service.hierarchical import HierarchicalEngine
from service.manifest import ModelSpec, RepositoryError
from service.memory import MemoryBudget, resident
from service.metrics import Metrics
from service.runtime import ModelLoadError, RuntimeOptions, load_runtime
from service.warmup import warm_up

ENGINES: dict[str, type[Engine]] = {"vae": Engine, "hvae": HierarchicalEngine}


def load_engine(
    spec: ModelSpec, options: RuntimeOptions, batch: BatchSettings, limits: RequestLimits, metrics: Metrics,
    memory: MemoryBudget, executor: Executor | None = None,
) -> Engine:
    """The engine of the version's family, on sessions for every graph (four with a flow prior, three
    for a hierarchical model), warmed up, checked and measured
    (`service.warmup`); ModelLoadError (or RepositoryError, for a missing file) says what is wrong
    with them. The engine's footprint is what the process grew by while loading it, its batches'
    working memory included (`Costs.batches`)."""
    before = resident()
    try:
        runtime = load_runtime(spec, options)
    except RepositoryError:
        raise
    except Exception as err:  # onnxruntime raises its own types for unreadable or invalid graphs
        raise ModelLoadError(f"{spec.folder}: cannot load the graphs: {err}") from err
    try:
        costs, batch = warm_up(spec, runtime, batch, memory.total, options.cpu_arena)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"{spec.folder}: warm-up failed: {err}") from err
    # Requests served meanwhile move the process's memory too: the figure is kept within what the
    # graphs hold at least and what the load was estimated at.
    grown = min(max(graph_bytes(spec), resident() - before), load_estimate(spec, batch, memory.total))
    # With the arena, the process grew by its batches' working memory too, which the arena keeps;
    # without it, their runs give it back, and the version holds it for them here.
    footprint = grown if options.cpu_arena else grown + costs.batches()
    return ENGINES[spec.family](spec, runtime, metrics, batch, limits, costs, memory, footprint, executor)
