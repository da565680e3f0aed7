"""Reading the model repository: the one place on the serving side that parses model.json.

MODELS/<name>/<version>/{encoder.onnx, decoder.onnx, model.json}; the highest integer version is
served unless one is asked for. Graph files are checked against the sha256 in model.json, so a
torn copy or a swapped file is refused at start rather than served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("encoder", "decoder")
FORMAT = 1  # model.json's layout; export writes it, and a version of another format is refused


class RepositoryError(RuntimeError):
    """The model repository is missing, incomplete or inconsistent; the message says how."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: int
    folder: Path
    latent_dim: int
    image_shape: tuple[int, int, int]
    likelihood: str
    gaussian_std: float
    dataset: str
    metrics: dict[str, float] = field(default_factory=dict)
    has_fp16_decoder: bool = False

    def graph(self, role: str) -> Path:
        return self.folder / f"{role}.onnx"


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (graphs can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pick_model(repo: Path, name: str | None) -> Path:
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist")
    if name:
        folder = repo / name
        if not folder.is_dir():
            raise RepositoryError(f"model {name!r} not found in {repo}")
        return folder
    candidates = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    with_versions = [p for p in candidates if any(v.name.isdigit() for v in p.iterdir())]
    if len(with_versions) != 1:
        found = ", ".join(p.name for p in with_versions) or "none"
        raise RepositoryError(f"{repo}: expected exactly one model when no name is given, found {found}")
    return with_versions[0]


def load_spec(repo: Path, name: str | None = None, version: int | None = None, verify: bool = True) -> ModelSpec:
    """The model to serve, checked: files present, fields sane, graph hashes matching."""
    try:
        model_dir = _pick_model(Path(repo), name)
        versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    except OSError as err:
        raise RepositoryError(f"{repo}: cannot read the model repository: {err}") from err
    if not versions:
        raise RepositoryError(f"{model_dir}: no version folders")
    chosen = version if version is not None else versions[-1]
    if chosen not in versions:
        raise RepositoryError(f"{model_dir}: version {chosen} not found (have {versions})")
    folder = model_dir / str(chosen)
    try:
        info: dict[str, Any] = json.loads((folder / "model.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RepositoryError(f"{folder}/model.json unreadable: {err}") from err
    if info.get("format") != FORMAT:
        raise RepositoryError(
            f"{folder}/model.json: format {info.get('format')!r}; this server reads format {FORMAT} (export it again, "
            "or run a server of the version that wrote it)"
        )
    try:
        shape = tuple(int(s) for s in info["image_shape"])
        spec = ModelSpec(
            name=str(info["name"]),
            version=int(info["version"]),
            folder=folder,
            latent_dim=int(info["latent_dim"]),
            image_shape=shape,  # type: ignore[arg-type]
            likelihood=str(info["likelihood"]),
            gaussian_std=float(info.get("gaussian_std", 0.1)),
            dataset=str(info.get("dataset", "")),
            metrics={k: float(v) for k, v in info.get("metrics", {}).items() if isinstance(v, int | float)},
            has_fp16_decoder="decoder_fp16" in info["graphs"],
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise RepositoryError(f"{folder}/model.json is missing or has a bad field: {err!r}") from err
    if len(spec.image_shape) != 3 or spec.latent_dim < 1 or spec.likelihood not in ("bernoulli", "gaussian"):
        raise RepositoryError(f"{folder}/model.json: bad image_shape, latent_dim or likelihood")
    if spec.version != chosen:
        raise RepositoryError(f"{folder}/model.json says version {spec.version}, its folder says {chosen}")
    for role in (*ROLES, "decoder_fp16") if spec.has_fp16_decoder else ROLES:
        path = spec.graph(role)
        try:
            expected = info["graphs"][role].get("sha256")
            if not path.is_file():
                raise RepositoryError(f"{path} is missing")
            if not expected:  # an unchecked graph could be torn or swapped: never serve one
                raise RepositoryError(f"{path}: model.json gives no sha256 for it")
            if verify and sha256(path) != expected:
                raise RepositoryError(f"{path}: sha256 does not match model.json (a torn or replaced file)")
        except (KeyError, AttributeError, OSError) as err:
            raise RepositoryError(f"{path}: cannot check it against model.json: {err!r}") from err
    return spec


def latest_version(repo: Path, name: str) -> int | None:
    """The highest version folder of a model, without reading anything else (cheap enough to poll)."""
    try:
        return max((int(p.name) for p in (Path(repo) / name).iterdir() if p.is_dir() and p.name.isdigit()), default=None)
    except OSError:
        return None


def version_state(repo: Path, name: str, version: int) -> tuple[object, ...]:
    """What a version folder holds now, cheaply: model.json's content and each file's size, inode
    and change times (a copy made with `cp -p` keeps the modification time, not the change time).
    A refused version is tried again once this changes (its copy finished, a file was fixed), and
    not before: a broken version, an unreadable one too, is not reloaded on every poll."""
    folder = Path(repo) / name / str(version)
    try:
        stats = [(p.name, p.stat()) for p in folder.iterdir() if p.is_file()]
        manifest = (folder / "model.json").read_bytes() if (folder / "model.json").is_file() else b""
    except OSError as err:
        return (version, f"unreadable: {err}", ())
    files = tuple(sorted((name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) for name, st in stats))
    return (version, hashlib.sha256(manifest).hexdigest(), files)
