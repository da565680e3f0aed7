"""What should be served, and model control: every model of the repository with the versions its
policy keeps (a model's serving.json may override the flags), less what UnloadModel took out and
plus what LoadModel pinned. `sync()` makes the registry (`service.registry`) match it, loading,
swapping and retiring versions through `service.versions`: a new model folder is loaded, a removed
one drains and unloads, a new version is loaded beside the old one and only then takes its routes.
A refused version is tried again only once its files change. `load()` and `unload()` are model
control (LoadModel / UnloadModel): an unloaded model stays unloaded, whatever the repository holds,
until it is loaded again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from service.config import ConfigError
from service.engine import BatchSettings, Engine, RequestLimits
from service.errors import FailedPrecondition
from service.manifest import ModelSpec, RepositoryError
from service.memory import MemoryBudget
from service.metrics import Metrics
from service.registry import READY, UNAVAILABLE, UNLOADING, ModelNotFound, ModelUnavailable, Registry, Status, Version
from service.repository import ServingConfig, VersionPolicy, read_serving_config, scan, version_state
from service.runtime import RuntimeOptions
from service.versions import ShuttingDown, Versions

__all__ = ["LoadFailed", "Models", "ModelNotFound", "ModelUnavailable", "READY", "UNAVAILABLE", "UNLOADING", "Status"]
log = logging.getLogger(__name__)


class LoadFailed(FailedPrecondition):
    """LoadModel could not bring the model to READY; the message holds the reason (FAILED_PRECONDITION)."""


@dataclass
class Models:
    repo: Path
    options: RuntimeOptions
    batch: BatchSettings  # the flags; a model's serving.json overrides them
    limits: RequestLimits
    metrics: Metrics
    policy: VersionPolicy = VersionPolicy()
    executor: Executor | None = None  # the inference workers every batcher shares (None: one per graph)
    only: set[str] | None = None  # --models: serve these (LoadModel adds to it); None: all
    default_name: str | None = None  # --default-model, or the only model at start (Server.load_models)
    # A version's request limits (fewer rows where its answers would not fit a message), or
    # ConfigError for one the server cannot serve; None: the flags' limits for every version
    check: Callable[[ModelSpec], RequestLimits] | None = None
    unloaded: set[tuple[str, int]] = field(default_factory=set)  # by UnloadModel: (name, 0) is the whole model
    pinned: set[tuple[str, int]] = field(default_factory=set)  # versions LoadModel named, served beside the policy
    memory: MemoryBudget | None = None  # the budget loads and requests hold bytes of; None: unbounded

    def __post_init__(self) -> None:
        self.registry = Registry(self.metrics, self.default_name)
        if self.memory is None:
            self.memory = MemoryBudget(math.inf, self.metrics)
        self.versions = Versions(
            self.registry, self.repo, self.options, self.metrics, self.executor, self.check or (lambda spec: self.limits),
            served=lambda name: self.only is None or name in self.only, memory=self.memory,
        )  # fmt: skip
        self._lock = asyncio.Lock()
        self._serving_errors: dict[str, str] = {}  # model -> the serving.json error last reported

    # What is served, as the registry has it.

    @property
    def table(self) -> dict[str, dict[int, Version]]:
        return self.registry.table

    @property
    def routes(self) -> dict[tuple[str, int], Engine]:
        return self.registry.routes

    @property
    def default(self) -> str | None:
        return self.registry.default

    def resolve(self, name: str, version: int) -> Engine:
        return self.registry.resolve(name, version)

    def settle_default(self) -> str | None:
        return self.registry.settle_default()

    def statuses(self, name: str | None = None) -> list[Status]:
        return self.registry.statuses(name)

    def engines(self) -> list[Engine]:
        return self.registry.engines()

    # Keeping it in line with the repository.

    async def sync(self, force: str | None = None, model: str | None = None) -> list[str]:
        """Load, swap and unload until what is served matches the repository, the policies and model
        control (for every model, or only `model`). `force` names a model whose refused versions are
        tried again even if unchanged. Returns what this pass refused, one line each.

        The pass runs as a task of its own, shielded: a caller that goes away (an RPC's deadline, the
        watcher cancelled at shutdown) never cuts a load in half, which would leave sessions that
        nothing closes and a version stuck LOADING."""
        return await asyncio.shield(asyncio.ensure_future(self._locked(force, model)))

    async def _locked(self, force: str | None, model: str | None) -> list[str]:
        async with self._lock:
            self.versions.refusals = []
            try:
                await self._sync(force, model)
            except ShuttingDown:
                pass
            return self.versions.refusals

    async def _sync(self, force: str | None, model: str | None) -> None:
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, scan, self.repo)
        if self.only is not None:
            found = {name: versions for name, versions in found.items() if name in self.only}
        if model is not None:
            found = {name: versions for name, versions in found.items() if name == model}
        names = [model] if model is not None else list(self.table)
        for name in [name for name in names if name in self.table and name not in found]:
            for entry in list(self.table[name].values()):
                self.versions.forget(entry, "its model folder left the repository")
        for name, versions in found.items():
            try:
                await self._sync_model(name, versions, force == name)
            except ShuttingDown:
                raise
            except Exception as err:  # noqa: BLE001 - one model's files must not stop the others' updates
                log.exception("model %s: update failed", name)
                self.versions.refusals.append(f"{name}: {err!r}")
        self.registry.route()

    async def _sync_model(self, name: str, versions: list[int], forced: bool) -> None:
        loop = asyncio.get_running_loop()
        for number in versions:
            self.registry.entry(name, number)
        entries = self.table[name]
        try:
            serving = await loop.run_in_executor(None, read_serving_config, self.repo / name)
            settings = self._settings(serving)
        except (RepositoryError, ConfigError) as err:
            self._serving_refused(name, entries, str(err))
            return
        self._serving_errors.pop(name, None)
        policy = serving.version_policy or self.policy
        wanted: set[int] = set()
        if (name, 0) not in self.unloaded:
            candidates = []
            for number in versions:
                entry = entries[number]
                if entry.refused is not None and not forced:
                    now = await loop.run_in_executor(None, version_state, self.repo, name, number)
                    if now == entry.refused:
                        continue  # refused and unchanged since: not tried again, pinned or not
                entry.refused = None
                candidates.append(number)
            pinned = {number for (model, number) in self.pinned if model == name and number in candidates}
            candidates = [n for n in candidates if (name, n) not in self.unloaded]
            while True:  # a refused version drops out, and the policy picks among the rest
                wanted = set(policy.select(candidates)) | pinned
                todo = sorted((n for n in wanted if self._needs_load(entries[n], settings, forced)), reverse=True)
                refused = [n for n in todo if not await self.versions.load(entries[n], settings, serving)]
                if not refused:
                    break
                candidates = [n for n in candidates if n not in refused]
                pinned -= set(refused)
        # Only now, with their replacements serving, do versions leave: a removed newest version
        # (a rollback) keeps its calls until the older one is loaded.
        for number in [n for n in entries if n not in versions]:
            self.versions.forget(entries[number], "its folder left the repository")
        for number, entry in entries.items():
            if number in wanted or number not in versions:
                continue
            why = (
                "unloaded by UnloadModel" if (name, 0) in self.unloaded or (name, number) in self.unloaded
                else f"not in the version policy {policy}"
            )  # fmt: skip
            if entry.engine is not None:
                self.versions.unload(entry, why)
            elif entry.refused is None and entry.state == UNAVAILABLE:
                self.registry.set_state(entry, UNAVAILABLE, why)

    def _serving_refused(self, name: str, entries: dict[int, Version], error: str) -> None:
        """serving.json is broken: versions not loaded say why; loaded ones keep their settings.
        Logged and counted once per error, not on every poll."""
        for entry in entries.values():
            if entry.engine is None and entry.state == UNAVAILABLE:
                self.registry.set_state(entry, UNAVAILABLE, f"refused: {error}")
        self.versions.refusals.append(f"{name}: {error}")
        if self._serving_errors.get(name) != error:
            self._serving_errors[name] = error
            self.metrics.reloads.labels(result="refused", model=name).inc()
            log.error("model %s: %s; its loaded versions keep their settings", name, error)

    @staticmethod
    def _needs_load(entry: Version, settings: BatchSettings, forced: bool) -> bool:
        """Not loaded, or loaded with settings that serving.json has since changed and LoadModel asks to apply."""
        return entry.engine is None or (forced and entry.settings != settings)

    def _settings(self, serving: ServingConfig) -> BatchSettings:
        """The flags, overridden by the model's serving.json, checked against the request limits."""
        overrides = {
            key: getattr(serving, key) for key in ("max_batch_rows", "max_batch_delay_ms", "max_queue_rows", "background_share", "warmup_batch_sizes")
            if getattr(serving, key) is not None
        }  # fmt: skip
        settings = dataclasses.replace(self.batch, **overrides)
        limits = self.limits
        if not settings.max_batch_rows <= limits.max_request_rows <= settings.max_queue_rows:
            raise ConfigError(
                f"serving.json: limits must satisfy max_batch_rows <= --max-request-rows <= max_queue_rows, got "
                f"{settings.max_batch_rows}, {limits.max_request_rows}, {settings.max_queue_rows}"
            )
        if limits.max_interpolation_steps > settings.max_queue_rows:
            raise ConfigError(f"serving.json: max_queue_rows {settings.max_queue_rows} is below --max-interpolation-steps")
        return settings

    # Model control.

    async def load(self, name: str, version: int = 0) -> list[Status]:
        """LoadModel: serve the model (the versions its policy keeps, or also the one named) from the
        repository now, trying refused versions again and applying a changed serving.json;
        LoadFailed, with the reasons, if any version it tried was refused."""
        found = await asyncio.get_running_loop().run_in_executor(None, scan, self.repo)
        if name not in found:
            raise ModelNotFound(f"model {name!r} is not in the repository {self.repo} (have {', '.join(found) or 'none'})")
        if version and version not in found[name]:
            raise ModelNotFound(f"model {name!r} has no version {version} in the repository; it has {found[name]}")
        if self.only is not None:
            self.only.add(name)
        if version:
            self.unloaded -= {(name, 0), (name, version)}
            self.pinned.add((name, version))
        else:
            self.unloaded = {u for u in self.unloaded if u[0] != name}
        refused = await self.sync(force=name, model=name)
        entries = self.table.get(name, {})
        if refused or not any(v.state == READY for v in ([entries[version]] if version in entries else entries.values())):
            serving = ", ".join(f"v{v.version}" for v in entries.values() if v.state == READY) or "nothing"
            raise LoadFailed(f"{'; '.join(refused) or 'nothing could be loaded'} (serving: {serving})")
        return self.statuses(name)

    async def unload(self, name: str, version: int = 0) -> list[Status]:
        """UnloadModel: stop serving the model (or one version) and wait until its calls in flight
        have finished and it is closed. It stays unloaded until LoadModel names it."""
        if name not in self.table or (version and version not in self.table[name]):
            raise self.registry.missing(name, version)
        self.unloaded.add((name, version))
        self.pinned = {p for p in self.pinned if p[0] != name or (version and p[1] != version)}
        await self.sync(model=name)
        tasks = [v.retiring for v in self.table.get(name, {}).values() if v.retiring is not None]
        await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))  # a caller that leaves stops no retirement
        return self.statuses(name)

    async def close(self) -> None:
        """Shutting down: close every engine; calls still waiting get Closed."""
        self.versions.closed = True
        async with self._lock:
            retiring = [v.retiring for versions in self.table.values() for v in versions.values() if v.retiring]
            for task in retiring:
                task.cancel()  # its engine closes all the same
            await asyncio.gather(*retiring, return_exceptions=True)
            await asyncio.gather(*(engine.close() for engine in self.engines()))
