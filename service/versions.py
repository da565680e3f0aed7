"""How one version is loaded, swapped in and retired: loaded beside whatever serves, warmed and
checked (its files, its interface against the version it replaces, the server's limits), and only
then routed to; a version that leaves stops being routed at once and closes when its calls in
flight have finished. A version that cannot be served is refused with its reason, and the older
versions keep serving. Which versions should be served is `service.models`' decision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from service.config import ConfigError
from service.engine import BatchSettings, Engine, RequestLimits, load_estimate
from service.families import load_engine
from service.manifest import ModelSpec, RepositoryError, read_manifest
from service.memory import MemoryBudget, MemoryExhausted, show
from service.metrics import Metrics
from service.registry import LOADING, READY, UNAVAILABLE, UNLOADING, Registry, Version
from service.repository import ServingConfig, version_state
from service.runtime import ModelLoadError, RuntimeOptions

log = logging.getLogger(__name__)


class ShuttingDown(Exception):
    """The server began to shut down during a load: the pass stops."""


class Versions:
    """Loads, swaps and retires versions in the registry; `refusals` collects what a pass refused."""

    def __init__(
        self, registry: Registry, repo: Path, options: RuntimeOptions, metrics: Metrics,
        executor: Executor | None, check: Callable[[ModelSpec], RequestLimits], served: Callable[[str], bool],
        memory: MemoryBudget,
    ) -> None:  # fmt: skip
        """`check` gives a version's request limits, or raises ConfigError for one the server cannot
        serve; `served(name)` says
        whether a model is still to be served (a retired version of one that is stays listed);
        loaded versions hold their footprints of `memory`."""
        self.registry, self.repo, self.options, self.memory = registry, repo, options, memory
        self.metrics, self.executor, self.check, self.served = metrics, executor, check, served
        self.refusals: list[str] = []
        self.closed = False

    async def load(self, entry: Version, settings: BatchSettings, serving: ServingConfig) -> bool:
        """Load one version beside whatever serves, warm and check it, then route to it. False if it
        was refused and does not serve; a failed reload (new settings) leaves the old engine serving."""
        loop = asyncio.get_running_loop()
        name, number = entry.name, entry.version
        replaced = self.registry.newest_ready(name)
        seen = await loop.run_in_executor(None, version_state, self.repo, name, number)  # before loading: a file
        started = time.perf_counter()  # that changes meanwhile is seen as a change, and tried again
        reload = entry.engine is not None
        if not reload:
            self.registry.set_state(entry, LOADING, "loading and warming up")
        try:
            spec = await loop.run_in_executor(None, read_manifest, self.repo / name / str(number))
            spec = dataclasses.replace(spec, name=name)  # the folder names the model, whatever model.json says
            reference = await loop.run_in_executor(None, self._interface_reference, entry, replaced)
            if reference is not None:
                check_interface(spec, reference, serving)
            limits = self.check(spec)
            engine = await self._load_within_budget(spec, settings, limits)
        except (RepositoryError, ModelLoadError, ConfigError, MemoryExhausted, TypeError, ValueError, KeyError,
                AttributeError) as err:  # fmt: skip
            self.refusals.append(f"{name} v{number}: {err}")
            self.metrics.reloads.labels(result="refused", model=name).inc()
            if reload:
                log.error("model %s v%d: reload with new settings refused, still serving as it was: %s", name, number, err)
                return True
            entry.refused = seen
            self.registry.set_state(entry, UNAVAILABLE, f"refused: {err}")
            if replaced is not None:
                log.error("model update refused, still serving v%d of %s: %s", replaced.version, name, err)
            else:
                log.error("model %s v%d refused: %s", name, number, err)
            return False
        if self.closed:  # shutting down meanwhile: never start what the drain will not close
            await engine.close()
            raise ShuttingDown
        engine.start()
        old, entry.engine, entry.settings = entry.engine, engine, settings
        self.registry.set_state(entry, READY)
        self.registry.route()
        seconds = time.perf_counter() - started
        if old is not None:
            self._retire_later(entry, old)
            log.info("model reloaded: %s v%d with new settings (%.2fs)", name, number, seconds)
        elif replaced is not None and replaced.version < number:
            self.metrics.reloads.labels(result="swapped", model=name).inc()
            log.info("model updated: %s v%d -> v%d (loaded and warmed in %.2fs)", name, replaced.version, number, seconds)
        else:
            self.metrics.reloads.labels(result="loaded", model=name).inc()
            log.info("model loaded: %s v%d (loaded and warmed in %.2fs)", name, number, seconds)
        return True

    async def _load_within_budget(self, spec: ModelSpec, settings: BatchSettings, limits: RequestLimits) -> Engine:
        """Load a version holding its estimated bytes of the memory budget (waiting for requests to
        release them), then its measured footprint for as long as it is loaded. One that cannot fit
        beside the versions already loaded is refused: a swap holds both versions until the old
        one retires, so a budget that holds one version of a model refuses the swap, and the old
        version keeps serving."""
        loop = asyncio.get_running_loop()
        estimate = load_estimate(spec, settings, self.memory.total)
        await self.memory.acquire(estimate, f"loading {spec.name} v{spec.version}", None, spec.name, load=True)
        try:
            engine = await loop.run_in_executor(
                None, load_engine, spec, self.options, settings, limits, self.metrics, self.memory, self.executor
            )
        except BaseException:
            self.memory.release(estimate, load=True)
            raise
        self.memory.resize(estimate, engine.footprint)
        log.info("%s v%d holds %s of memory; batches of at most %d rows", spec.name, spec.version, show(engine.footprint),
                 engine.batch.max_batch_rows)  # fmt: skip
        return engine

    def _interface_reference(self, entry: Version, replaced: Version | None) -> ModelSpec | None:
        """What a new version must keep: the version it replaces (the newest serving), or when none
        serves (a restart, a model unloaded), the next older version in the repository, so a
        restart cannot slip another interface under a model's name either."""
        if replaced is not None and replaced is not entry and replaced.engine is not None:
            return replaced.engine.spec
        for number in sorted((n for n in self.registry.table.get(entry.name, {}) if n < entry.version), reverse=True):
            try:
                return read_manifest(self.repo / entry.name / str(number), verify=False)
            except RepositoryError:
                continue  # unreadable or broken: the next older one
        return None

    def unload(self, entry: Version, reason: str) -> None:
        """Stop routing to a version now; it closes once its calls in flight finish."""
        engine, entry.engine, entry.settings = entry.engine, None, None
        self.registry.set_state(entry, UNLOADING, reason)
        self.registry.route()
        if engine is not None:
            self._retire_later(entry, engine, reason)

    def forget(self, entry: Version, reason: str) -> None:
        """Its folder is gone: unload it if loaded, then drop it from the table; one still draining
        stays (UNAVAILABLE to its callers) until its retirement drops it."""
        if entry.engine is not None:
            self.unload(entry, reason)
        elif entry.state != UNLOADING:
            self.registry.drop(entry)

    def _retire_later(self, entry: Version, engine: Engine, reason: str | None = None) -> None:
        """Close `engine` once its calls in flight finish; with a reason, the version leaves service
        (UNAVAILABLE, or out of the table if its folder is gone); without, a reload replaced it."""

        async def retire() -> None:
            try:
                while engine.active_calls:
                    await asyncio.sleep(0.05)
            finally:
                await engine.close()
                self.memory.release(engine.footprint, load=True)
            log.info("retired v%d of %s", entry.version, entry.name)
            current = self.registry.table.get(entry.name, {}).get(entry.version) is entry
            if reason is None or not current or entry.engine is not None or entry.state != UNLOADING:
                return  # replaced by a reload of itself, loaded again meanwhile, or no longer in the table
            for graph in ("encoder", "decoder", *engine.priors, *engine.family):
                self.metrics.forget_graph(entry.name, entry.version, graph)
            if (self.repo / entry.name / str(entry.version)).is_dir() and self.served(entry.name):
                self.registry.set_state(entry, UNAVAILABLE, reason)
            else:
                self.registry.drop(entry)

        entry.retiring = asyncio.ensure_future(retire())


def check_interface(spec: ModelSpec, served: ModelSpec, serving: ServingConfig) -> None:
    """A client of a model name must not get other shapes silently: a version whose interface
    differs from the one it replaces is refused unless serving.json allows it."""
    changed = {k: (v, spec.interface[k]) for k, v in served.interface.items() if spec.interface[k] != v}
    if changed and not serving.allow_interface_change:
        diff = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        raise ConfigError(
            f"v{spec.version} changes the interface of v{served.version} ({diff}); export it under another "
            'model name, or set "allow_interface_change": true in serving.json'
        )
