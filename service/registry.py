"""What is served and routed: every model version the server knows with its state and reason, and
the routes that take a request's (model_name, model_version) to an engine.

Routing is one dict lookup per call; the table and the routes change only when `service.models`
loads, swaps, unloads or retires a version (through `service.versions`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from service.engine import BatchSettings, Engine
from service.errors import NotFound, Unavailable
from service.metrics import Metrics

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


class ModelNotFound(NotFound):
    """No such model or version in the repository (NOT_FOUND); the message names what exists."""


class ModelUnavailable(Unavailable):
    """The model or version exists but is not serving now: loading, unloading, refused (UNAVAILABLE)."""


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
    graphs: tuple[str, ...] = ()  # the graphs its family adds to the encoder and decoder, once loaded


class Registry:
    """The table of versions by model, and the routes built from it."""

    def __init__(self, metrics: Metrics, default_name: str | None = None) -> None:
        self.metrics = metrics
        self.default_name = default_name  # --default-model, or the only model at start (settle_default)
        self.table: dict[str, dict[int, Version]] = {}
        self.routes: dict[tuple[str, int], Engine] = {}

    def resolve(self, name: str, version: int) -> Engine:
        """The engine that answers (model_name, model_version): "" is the default model, 0 its newest version."""
        engine = self.routes.get((name, version))
        if engine is None:
            raise self.missing(name, version)
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
            self.route()
        return self.default_name

    def missing(self, name: str, version: int) -> Exception:
        """Why (name, version) has no route: NOT_FOUND, or UNAVAILABLE with each version's state."""
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

    def route(self) -> None:
        """Rebuild the routes from the table: each READY version, each model's newest as version 0,
        and the default model's under the empty name."""
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

    def statuses(self, name: str | None = None) -> list[Status]:
        return [
            Status(v.name, v.version, v.state, v.reason, v.engine.spec.family_graphs if v.engine else ())
            for model, versions in sorted(self.table.items()) if name is None or model == name
            for _, v in sorted(versions.items())
        ]  # fmt: skip

    def engines(self) -> list[Engine]:
        return [v.engine for versions in self.table.values() for v in versions.values() if v.engine is not None]

    def entry(self, name: str, number: int) -> Version:
        """The table's entry for a version the repository holds, made UNAVAILABLE if new."""
        entries = self.table.setdefault(name, {})
        if number not in entries:
            entries[number] = Version(name, number)
            self.set_state(entries[number], UNAVAILABLE, "not loaded yet")
        return entries[number]

    def set_state(self, entry: Version, state: str, reason: str = "") -> None:
        entry.state, entry.reason = state, reason
        provider = entry.engine.runtime.provider if entry.engine is not None else ""
        self.metrics.set_state(entry.name, entry.version, state, provider)

    def newest_ready(self, name: str) -> Version | None:
        ready = [v for v in self.table.get(name, {}).values() if v.state == READY and v.engine is not None]
        return max(ready, key=lambda v: v.version, default=None)

    def drop(self, entry: Version) -> None:
        """Take a version out of the table (and its model, once it has none), and out of the routes."""
        versions = self.table.get(entry.name, {})
        if versions.get(entry.version) is entry:
            del versions[entry.version]
            self.metrics.set_state(entry.name, entry.version, None)
        if not versions:
            self.table.pop(entry.name, None)
        self.route()
