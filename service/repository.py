"""The model repository as the server sees it: which models and versions it holds, which versions
a model's policy serves, and its per-model settings (serving.json).

    MODELS/<name>/<version>/{encoder.onnx, decoder.onnx, model.json}   (service.manifest reads it)
    MODELS/<name>/serving.json                                       optional, per model

Everything here reads files and decides; loading sessions is `service.models`' job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.manifest import MANIFEST, ModelSpec, RepositoryError, read_manifest, version_numbers

__all__ = ["ModelSpec", "RepositoryError", "ServingConfig", "VersionPolicy", "load_spec", "scan", "version_state"]

SERVING_FILE = "serving.json"


def scan(repo: Path) -> dict[str, list[int]]:
    """Every model folder of the repository with its versions; a folder with no version folder
    yet (an export in progress) is not a model. Hidden folders are skipped."""
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist")
    try:
        folders = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise RepositoryError(f"{repo}: cannot read the model repository: {err}") from err
    found = {}
    for folder in folders:
        try:
            versions = version_numbers(folder)
        except OSError:
            continue  # unreadable now; seen again on the next scan
        if versions:
            found[folder.name] = versions
    return found


def load_spec(repo: Path, name: str | None = None, version: int | None = None, verify: bool = True) -> ModelSpec:
    """One version of one model, checked: the named model (or the only one), the named version
    (or the newest). For tools that want a single model; the server goes through `scan`."""
    models = scan(repo)
    if name is None:
        if len(models) != 1:
            found = ", ".join(models) or "none"
            raise RepositoryError(f"{repo}: expected exactly one model when no name is given, found {found}")
        name = next(iter(models))
    if name not in models:
        raise RepositoryError(f"model {name!r} not found in {repo} (have {', '.join(models) or 'none'})")
    chosen = models[name][-1] if version is None else version
    if chosen not in models[name]:
        raise RepositoryError(f"{Path(repo) / name}: version {chosen} not found (have {models[name]})")
    return read_manifest(Path(repo) / name / str(chosen), verify)


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are served, as Triton's version_policy: the newest N, all, or the
    ones listed."""

    kind: str = "latest"  # latest | all | specific
    count: int = 1  # latest: how many
    versions: tuple[int, ...] = ()  # specific: which

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest:N`, `all` or `specific:3,5`."""
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                policy = cls("latest", int(arg or 1))
                if policy.count >= 1:
                    return policy
            elif kind == "all" and not arg:
                return cls("all")
            elif kind == "specific":
                versions = tuple(sorted({int(v) for v in arg.split(",")}))
                if versions and min(versions) >= 1:
                    return cls("specific", versions=versions)
        except ValueError:
            pass
        raise ValueError(f"version policy {text!r}: give latest:N (N >= 1), all, or specific:V1,V2")

    def select(self, versions: list[int]) -> list[int]:
        """The versions to serve out of those that can be served, ascending."""
        if self.kind == "all":
            return sorted(versions)
        if self.kind == "specific":
            return sorted(set(versions) & set(self.versions))
        return sorted(versions)[-self.count :]

    def __str__(self) -> str:
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.versions))
        return "all" if self.kind == "all" else f"latest:{self.count}"


@dataclass(frozen=True)
class ServingConfig:
    """MODELS/<name>/serving.json: per-model batching, warm-up and version policy. A field left out
    takes the server's flag."""

    max_batch_rows: int | None = None
    max_batch_delay_ms: float | None = None
    max_queue_rows: int | None = None
    background_share: float | None = None
    warmup_batch_sizes: tuple[int, ...] | None = None
    version_policy: VersionPolicy | None = None
    allow_interface_change: bool = False  # a new version may change image shape, latent size, likelihood, prior


def read_serving_config(model_dir: Path) -> ServingConfig:
    """The model's serving.json, or the defaults when it has none; RepositoryError if it is broken."""
    path = Path(model_dir) / SERVING_FILE
    try:
        raw: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return ServingConfig()
    except (OSError, json.JSONDecodeError) as err:
        raise RepositoryError(f"{path} unreadable: {err}") from err
    if not isinstance(raw, dict):
        raise RepositoryError(f"{path}: expected a JSON object")
    unknown = set(raw) - {f for f in ServingConfig.__dataclass_fields__}
    if unknown:
        raise RepositoryError(f"{path}: unknown settings {sorted(unknown)}")
    if "version_policy" in raw and not isinstance(raw["version_policy"], str):
        raise RepositoryError(f"{path}: version_policy must be a string such as \"latest:1\", got {raw['version_policy']!r}")
    if not isinstance(raw.get("allow_interface_change", False), bool):
        raise RepositoryError(f"{path}: allow_interface_change must be true or false, got {raw['allow_interface_change']!r}")
    try:
        config = ServingConfig(
            max_batch_rows=_positive(raw, "max_batch_rows", int),
            max_batch_delay_ms=_positive(raw, "max_batch_delay_ms", float, zero=True),
            max_queue_rows=_positive(raw, "max_queue_rows", int),
            background_share=_positive(raw, "background_share", float),
            warmup_batch_sizes=tuple(int(n) for n in raw["warmup_batch_sizes"]) if "warmup_batch_sizes" in raw else None,
            version_policy=VersionPolicy.parse(raw["version_policy"]) if "version_policy" in raw else None,
            allow_interface_change=raw.get("allow_interface_change", False),
        )
    except (TypeError, ValueError) as err:
        raise RepositoryError(f"{path}: {err}") from err
    if config.background_share is not None and config.background_share > 1:
        raise RepositoryError(f"{path}: background_share must be in (0, 1], got {config.background_share}")
    if config.warmup_batch_sizes is not None and min(config.warmup_batch_sizes, default=1) < 1:
        raise RepositoryError(f"{path}: warmup_batch_sizes must be positive")
    return config


def _positive(raw: dict[str, Any], key: str, kind: type, zero: bool = False) -> Any:
    if key not in raw:
        return None
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{key} must be a {'non-negative' if zero else 'positive'} number, got {value!r}")
    return kind(value)


def version_state(repo: Path, name: str, version: int) -> tuple[object, ...]:
    """What a version folder holds now, cheaply: model.json's content and each file's size, inode
    and change times (a copy made with `cp -p` keeps the modification time, not the change time).
    A refused version is tried again once this changes (its copy finished, a file was fixed), and
    not before: a broken version, an unreadable one too, is not reloaded on every poll."""
    folder = Path(repo) / name / str(version)
    try:
        stats = [(p.name, p.stat()) for p in folder.iterdir() if p.is_file()]
        manifest = (folder / MANIFEST).read_bytes() if (folder / MANIFEST).is_file() else b""
    except OSError as err:
        return (version, f"unreadable: {err}", ())
    files = tuple(sorted((name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) for name, st in stats))
    return (version, hashlib.sha256(manifest).hexdigest(), files)
