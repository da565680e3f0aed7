"""The models being served: every model of the repository with the versions its policy keeps, each
version's state, and the routes that take a request's (model_name, model_version) to an engine.

`sync()` makes what is served match the repository: a new model folder is loaded, a removed one
drains and unloads, a new version is loaded beside the old one, warmed and checked, and only then
takes the old one's routes; the old one finishes its calls in flight and closes. A version that
cannot be served (broken files, another interface, limits it cannot meet) is refused with its
reason, the older versions keep serving, and it is tried again only once its files change.
`load()` and `unload()` are model control (LoadModel / UnloadModel): an unloaded model stays
unloaded, whatever the repository holds, until it is loaded again.

Routing is one dict lookup per call; everything else runs on a change only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from service.config import ConfigError
from service.engine import BatchSettings, Engine, RequestLimits, load_engine
from service.errors import FailedPrecondition, NotFound, Unavailable
from service.manifest import ModelSpec, RepositoryError, read_manifest
from service.metrics import Metrics
from service.repository import ServingConfig, VersionPolicy, read_serving_config, scan, version_state
from service.runtime import ModelLoadError, RuntimeOptions

log = logging.getLogger(__name__)

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


class ModelNotFound(NotFound):
    """No such model or version in the repository (NOT_FOUND); the message names what exists."""


class ModelUnavailable(Unavailable):
    """The model or version exists but is not serving now: loading, unloading, refused (UNAVAILABLE)."""


class LoadFailed(FailedPrecondition):
    """LoadModel could not bring the model to READY; the message holds the reason (FAILED_PRECONDITION)."""


class ShuttingDown(Exception):
    """The server began to shut down during a load: the pass stops."""


@dataclass(eq=False)
class Version:
    name: str
    version: int
    state: str = UNAVAILABLE
    reason: str = "not loaded yet"
    engine: Engine | None = None
    settings: BatchSettings | None = None  # what its engine was built with
    refused: tuple[object, ...] | None = None  # version_state() when refused: retried once it changes
    retiring: asyncio.Task | None = None


@dataclass(frozen=True)
class Status:
    name: str
    version: int
    state: str
    reason: str


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
    check: Callable[[ModelSpec], None] = lambda spec: None  # raises ConfigError for a version the server cannot serve
    table: dict[str, dict[int, Version]] = field(default_factory=dict)
    routes: dict[tuple[str, int], Engine] = field(default_factory=dict)
    unloaded: set[tuple[str, int]] = field(default_factory=set)  # by UnloadModel: (name, 0) is the whole model
    pinned: set[tuple[str, int]] = field(default_factory=set)  # versions LoadModel named, served beside the policy
    closed: bool = False

    def __post_init__(self) -> None:
        self._lock = asyncio.Lock()
        self._refusals: list[str] = []
        self._serving_errors: dict[str, str] = {}  # model -> the serving.json error last reported

    # The data path: one lookup.

    def resolve(self, name: str, version: int) -> Engine:
        """The engine that answers (model_name, model_version): "" is the default model, 0 its newest version."""
        engine = self.routes.get((name, version))
        if engine is None:
            raise self._missing(name, version)
        return engine

    @property
    def default(self) -> str | None:
        """--default-model, or the only model at start (fixed then: a second model copied in later
        must not take the empty name's calls away from the first)."""
        return self.default_name

    def settle_default(self) -> str | None:
        """At start: with no --default-model, the only model is the default, for good."""
        if self.default_name is None and len(self.table) == 1:
            self.default_name = next(iter(self.table))
            self._route()
        return self.default_name

    def _missing(self, name: str, version: int) -> Exception:
        names = ", ".join(self.table) or "none"
        if not name:
            if self.default is None:
                return ModelNotFound(f"model_name is empty and there is no default model: name one of {names}")
            name = self.default
        versions = self.table.get(name)
        if not versions:
            return ModelNotFound(f"model {name!r} not found; this server has: {names}")
        if version:
            entry = versions.get(version)
            if entry is None:
                return ModelNotFound(f"model {name!r} has no version {version}; it has {sorted(versions)}")
            return ModelUnavailable(f"{name} v{version} is {entry.state}: {entry.reason}")
        why = "; ".join(f"v{v.version} {v.state}: {v.reason}" for v in versions.values())
        return ModelUnavailable(f"model {name!r} has no version ready ({why})")

    def _route(self) -> None:
        routes: dict[tuple[str, int], Engine] = {}
        default = self.default
        for name, versions in self.table.items():
            ready = sorted((v.version, v.engine) for v in versions.values() if v.state == READY and v.engine)
            for number, engine in ready:
                routes[(name, number)] = engine
            if ready:
                routes[(name, 0)] = ready[-1][1]
        if default is not None:
            routes.update({("", number): engine for (name, number), engine in list(routes.items()) if name == default})
        self.routes = routes

    # What is served, and why.

    def statuses(self, name: str | None = None) -> list[Status]:
        return [
            Status(v.name, v.version, v.state, v.reason)
            for model, versions in sorted(self.table.items()) if name is None or model == name
            for _, v in sorted(versions.items())
        ]  # fmt: skip

    def engines(self) -> list[Engine]:
        return [v.engine for versions in self.table.values() for v in versions.values() if v.engine is not None]

    def _set(self, entry: Version, state: str, reason: str = "") -> None:
        entry.state, entry.reason = state, reason
        provider = entry.engine.runtime.provider if entry.engine is not None else ""
        self.metrics.set_state(entry.name, entry.version, state, provider)

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
            self._refusals = []
            try:
                await self._sync(force, model)
            except ShuttingDown:
                pass
            return self._refusals

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
                self._forget(entry, "its model folder left the repository")
        for name, versions in found.items():
            try:
                await self._sync_model(name, versions, force == name)
            except ShuttingDown:
                raise
            except Exception as err:  # noqa: BLE001 - one model's files must not stop the others' updates
                log.exception("model %s: update failed", name)
                self._refusals.append(f"{name}: {err!r}")
        self._route()

    async def _sync_model(self, name: str, versions: list[int], forced: bool) -> None:
        loop = asyncio.get_running_loop()
        entries = self.table.setdefault(name, {})
        for number in versions:
            if number not in entries:
                entries[number] = Version(name, number)
                self._set(entries[number], UNAVAILABLE, "not loaded yet")
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
                refused = [n for n in todo if not await self._load(entries[n], settings, serving)]
                if not refused:
                    break
                candidates = [n for n in candidates if n not in refused]
                pinned -= set(refused)
        # Only now, with their replacements serving, do versions leave: a removed newest version
        # (a rollback) keeps its calls until the older one is loaded.
        for number in [n for n in entries if n not in versions]:
            self._forget(entries[number], "its folder left the repository")
        for number, entry in entries.items():
            if number in wanted or number not in versions:
                continue
            why = (
                "unloaded by UnloadModel" if (name, 0) in self.unloaded or (name, number) in self.unloaded
                else f"not in the version policy {policy}"
            )  # fmt: skip
            if entry.engine is not None:
                self._unload(entry, why)
            elif entry.refused is None and entry.state == UNAVAILABLE:
                self._set(entry, UNAVAILABLE, why)

    def _serving_refused(self, name: str, entries: dict[int, Version], error: str) -> None:
        """serving.json is broken: versions not loaded say why; loaded ones keep their settings.
        Logged and counted once per error, not on every poll."""
        for entry in entries.values():
            if entry.engine is None and entry.state == UNAVAILABLE:
                self._set(entry, UNAVAILABLE, f"refused: {error}")
        self._refusals.append(f"{name}: {error}")
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
            key: getattr(serving, key) for key in ("max_batch_rows", "max_batch_delay_ms", "max_queue_rows", "warmup_batch_sizes")
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

    async def _load(self, entry: Version, settings: BatchSettings, serving: ServingConfig) -> bool:
        """Load one version beside whatever serves, warm and check it, then route to it. False if it
        was refused and does not serve; a failed reload (new settings) leaves the old engine serving."""
        loop = asyncio.get_running_loop()
        name, number = entry.name, entry.version
        replaced = self._newest_ready(name)
        seen = await loop.run_in_executor(None, version_state, self.repo, name, number)  # before loading: a file
        started = time.perf_counter()  # that changes meanwhile is seen as a change, and tried again
        reload = entry.engine is not None
        if not reload:
            self._set(entry, LOADING, "loading and warming up")
        try:
            spec = await loop.run_in_executor(None, read_manifest, self.repo / name / str(number))
            spec = dataclasses.replace(spec, name=name)  # the folder names the model, whatever model.json says
            reference = await loop.run_in_executor(None, self._interface_reference, entry, replaced)
            if reference is not None:
                self._check_interface(spec, reference, serving)
            self.check(spec)
            engine = await loop.run_in_executor(
                None, load_engine, spec, self.options, settings, self.limits, self.metrics, self.executor
            )
        except (RepositoryError, ModelLoadError, ConfigError, TypeError, ValueError, KeyError, AttributeError) as err:
            self._refusals.append(f"{name} v{number}: {err}")
            self.metrics.reloads.labels(result="refused", model=name).inc()
            if reload:
                log.error("model %s v%d: reload with new settings refused, still serving as it was: %s", name, number, err)
                return True
            entry.refused = seen
            self._set(entry, UNAVAILABLE, f"refused: {err}")
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
        self._set(entry, READY)
        self._route()
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

    def _interface_reference(self, entry: Version, replaced: Version | None) -> ModelSpec | None:
        """What a new version must keep: the version it replaces (the newest serving), or when none
        serves (a restart, a model unloaded), the next older version in the repository, so a
        restart cannot slip another interface under a model's name either."""
        if replaced is not None and replaced is not entry and replaced.engine is not None:
            return replaced.engine.spec
        for number in sorted((n for n in self.table.get(entry.name, {}) if n < entry.version), reverse=True):
            try:
                return read_manifest(self.repo / entry.name / str(number), verify=False)
            except RepositoryError:
                continue  # unreadable or broken: the next older one
        return None

    def _newest_ready(self, name: str) -> Version | None:
        ready = [v for v in self.table.get(name, {}).values() if v.state == READY and v.engine is not None]
        return max(ready, key=lambda v: v.version, default=None)

    @staticmethod
    def _check_interface(spec: ModelSpec, served: ModelSpec, serving: ServingConfig) -> None:
        """A client of a model name must not get other shapes silently: a version whose interface
        differs from the one it replaces is refused unless serving.json allows it."""
        changed = {k: (v, spec.interface[k]) for k, v in served.interface.items() if spec.interface[k] != v}
        if changed and not serving.allow_interface_change:
            diff = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise ConfigError(
                f"v{spec.version} changes the interface of v{served.version} ({diff}); export it under another "
                'model name, or set "allow_interface_change": true in serving.json'
            )

    def _unload(self, entry: Version, reason: str) -> None:
        """Stop routing to a version now; it closes once its calls in flight finish."""
        engine, entry.engine, entry.settings = entry.engine, None, None
        self._set(entry, UNLOADING, reason)
        self._route()
        if engine is not None:
            self._retire_later(entry, engine, reason)

    def _forget(self, entry: Version, reason: str) -> None:
        """Its folder is gone: unload it if loaded, then drop it from the table; one still draining
        stays (UNAVAILABLE to its callers) until its retirement drops it."""
        if entry.engine is not None:
            self._unload(entry, reason)
        elif entry.state != UNLOADING:
            self._drop(entry)

    def _drop(self, entry: Version) -> None:
        versions = self.table.get(entry.name, {})
        if versions.get(entry.version) is entry:
            del versions[entry.version]
            self.metrics.set_state(entry.name, entry.version, None)
        if not versions:
            self.table.pop(entry.name, None)
        self._route()

    def _retire_later(self, entry: Version, engine: Engine, reason: str | None = None) -> None:
        """Close `engine` once its calls in flight finish; with a reason, the version leaves service
        (UNAVAILABLE, or out of the table if its folder is gone); without, a reload replaced it."""

        async def retire() -> None:
            try:
                while engine.active_calls:
                    await asyncio.sleep(0.05)
            finally:
                await engine.close()
            log.info("retired v%d of %s", entry.version, entry.name)
            current = self.table.get(entry.name, {}).get(entry.version) is entry
            if reason is None or not current or entry.engine is not None or entry.state != UNLOADING:
                return  # replaced by a reload of itself, loaded again meanwhile, or no longer in the table
            for graph in ("encoder", "decoder", *engine.priors):
                self.metrics.forget_graph(entry.name, entry.version, graph)
            present = (self.repo / entry.name / str(entry.version)).is_dir()
            if present and (self.only is None or entry.name in self.only):
                self._set(entry, UNAVAILABLE, reason)
            else:
                self._drop(entry)

        entry.retiring = asyncio.ensure_future(retire())

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
            raise self._missing(name, version)
        self.unloaded.add((name, version))
        self.pinned = {p for p in self.pinned if p[0] != name or (version and p[1] != version)}
        await self.sync(model=name)
        tasks = [v.retiring for v in self.table.get(name, {}).values() if v.retiring is not None]
        await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))  # a caller that leaves stops no retirement
        return self.statuses(name)

    async def close(self) -> None:
        """Shutting down: close every engine; calls still waiting get Closed."""
        self.closed = True
        async with self._lock:
            retiring = [v.retiring for versions in self.table.values() for v in versions.values() if v.retiring]
            for task in retiring:
                task.cancel()  # its engine closes all the same
            await asyncio.gather(*retiring, return_exceptions=True)
            await asyncio.gather(*(engine.close() for engine in self.engines()))
