"""model.json, the manifest of one model version: the one module that knows its format.

Export writes it with `write_manifest`, the service reads it with `read_manifest`, and every walk
over a model's version folders goes through `version_numbers`, so writer, reader and scans cannot
disagree. It lives on the serving side because the serving image carries `service/` and not
`export/`; it needs nothing beyond the standard library.

    MODELS/<name>/<version>/{encoder.onnx, decoder.onnx, model.json}
                             + {prior_sample.onnx, prior_density.onnx} for a flow prior
                             + posterior.onnx for a hierarchical model
                             + class_means.npy for a model trained on data with classes
"""

from __future__ import annotations

import functools
import hashlib
import math
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import FailedPrecondition
from service.imaging import Preprocessing, on_black
from service.likelihood import Likelihood, likelihood as make_likelihood

FORMAT = 1  # model.json's layout; a version of another format is refused
ROLES = ("encoder", "decoder")  # the graphs every version has
IMAGE = "image"  # the decoder's second output, the image the client sees (exports before it: parameters alone)
# Reduced-precision decoders, export options served with --decoder-precision: half precision for
# GPUs, dynamically quantized int8 for CPUs (faster only where the decoder's matrices are large).
DECODER_PRECISIONS = {"fp16": "decoder_fp16", "int8": "decoder_int8"}
# The graphs each prior adds: N(0, I) needs none; a flow needs f (eps -> z, for Sample and
# Interpolate) and f^-1 with its log-density (z -> eps, log p(z), for Score and Interpolate).
PRIOR_ROLES: dict[str, tuple[str, ...]] = {"standard": (), "flow": ("prior_sample", "prior_density")}
# The graphs each model family adds: the flat VAE none; the hierarchical VAE (whose latent is its
# groups' standardized noise, so its encoder and decoder are the flat ones) its posterior draw for
# given noise (Score, and Encode's draw). A version without "family" in model.json is a flat VAE.
FAMILY_ROLES: dict[str, tuple[str, ...]] = {"vae": (), "hvae": ("posterior",)}
CLASS_MEANS = "class_means.npy"  # each class's mean latent [K, D] float32, for edits (model.json's "class_means")
MANIFEST = "model.json"


class RepositoryError(FailedPrecondition):
    """The model repository is missing, incomplete or inconsistent; the message says how."""


@dataclass(frozen=True)
class ModelSpec:
    """What the service needs to know about one version, read from its model.json."""

    name: str
    version: int
    folder: Path
    latent_dim: int
    image_shape: tuple[int, int, int]
    likelihood: str
    gaussian_std: float
    dataset: str
    prior: str = "standard"
    metrics: dict[str, float] = field(default_factory=dict)
    precisions: tuple[str, ...] = ()  # the reduced-precision decoders it has (DECODER_PRECISIONS keys)
    prior_graphs: tuple[str, ...] = ()  # the prior's own graphs (PRIOR_ROLES[prior]): none for N(0, I)
    family: str = "vae"  # the model family (FAMILY_ROLES): its graphs and how the engine runs them
    latent_groups: tuple[tuple[int, ...], ...] = ()  # the latent's groups' shapes, in order (a flat VAE: one)
    mixtures: int = 0  # a logistic mixture's components K (0 for the other likelihoods)
    preprocessing: Preprocessing | None = None  # what an image file sent to this model goes through
    classes: tuple[str, ...] = ()  # the training data's class names, when it had classes
    conditional: bool = False  # its graphs take class weights [N, K] after each row's other values
    class_log_prior: tuple[float, ...] = ()  # a conditional model's log p(y), the training set's class frequencies
    class_means_file: str = ""  # class_means.npy when the export wrote it: each class's mean latent, for edits

    @property
    def family_graphs(self) -> tuple[str, ...]:
        """The graphs this version's family adds to the encoder and decoder."""
        return FAMILY_ROLES.get(self.family, ())

    @functools.cached_property
    def distribution(self) -> Likelihood:
        """p(x|z) as the type that computes it (ValueError for a likelihood this server lacks)."""
        return make_likelihood(self.likelihood, self.image_shape[0], self.mixtures, self.gaussian_std)

    @property
    def decoder_channels(self) -> int:
        """Channels of the decoder's output: C, or a logistic mixture's K (1 + 2C)."""
        return self.distribution.param_channels

    def graph(self, role: str) -> Path:
        return self.folder / f"{role}.onnx"

    def decoder(self, precision: str) -> Path:
        """The decoder graph for a precision: fp32 (decoder.onnx) or one the export added."""
        if precision == "fp32":
            return self.graph("decoder")
        if precision not in DECODER_PRECISIONS:
            raise ValueError(f"decoder precision {precision!r}: there are fp32, {', '.join(DECODER_PRECISIONS)}")
        role = DECODER_PRECISIONS[precision]
        if precision not in self.precisions:
            raise RepositoryError(
                f"{self.folder}: --decoder-precision {precision} asked for, but the export wrote no "
                f"{role}.onnx (python -m export --{precision}-decoder)"
            )
        return self.graph(role)

    @property
    def interface(self) -> dict[str, object]:
        """What a client depends on: a new version that changes any of it is another model (the class
        list and whether the class is an input among it)."""
        return {
            "image_shape": self.image_shape, "latent_dim": self.latent_dim, "likelihood": self.likelihood,
            "mixtures": self.mixtures, "prior": self.prior, "family": self.family,
            # a flat VAE's one group is its latent_dim: only a layout that says more is an entry of its own
            "latent_groups": None if self.latent_groups == ((self.latent_dim,),) else self.latent_groups,
            "preprocessing": self.preprocessing.to_json() if self.preprocessing else None,
            "classes": self.classes, "conditional": self.conditional,
        }  # fmt: skip


def with_classes(rows: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    """A graph's input rows for a conditional model: each row flattened, then its class weights y
    [N, K] (`export.graphs`: the graphs of every family pack them so); the rows as they are when y
    is None (an unconditional model)."""
    if y is None:
        return rows
    return np.concatenate([rows.reshape(len(rows), -1), y], axis=1, dtype=np.float32)


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (graphs can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_numbers(model_dir: Path) -> list[int]:
    """A model's version folders (integer names), ascending; none when the folder is missing.
    Hidden staging folders and anything else are not versions."""
    try:
        return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.name.isdigit() and p.is_dir())
    except FileNotFoundError:
        return []


def write_manifest(
    folder: Path, *, name: str, version: int, latent_dim: int, image_shape: tuple[int, ...], likelihood: str,
    gaussian_std: float, dataset: str, graphs: dict[str, dict[str, Any]], prior: str = "standard", family: str = "vae",
    latent_groups: list[list[int]] | None = None,
    preprocessing: dict[str, Any] | None = None, mixtures: int = 0, classes: list[str] | None = None, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """Write folder/model.json for the graphs already in `folder`: `graphs` maps each role to its
    signature, and the file name and sha256 are added here. `preprocessing` (Preprocessing.to_json)
    must make images of `image_shape`; `mixtures` is a logistic mixture's K. `extra` (metrics,
    provenance) is kept as given."""
    mismatch = preprocessing is not None and _preprocessing_mismatch(Preprocessing.from_json(preprocessing), image_shape)
    if mismatch:
        raise ValueError(mismatch)
    make_likelihood(likelihood, image_shape[0], mixtures, gaussian_std)  # ValueError: no such likelihood, or bad mixtures
    typed = {
        **({"preprocessing": preprocessing} if preprocessing is not None else {}),
        **({"mixtures": mixtures} if mixtures else {}), **({"classes": list(classes)} if classes is not None else {}),
    }  # fmt: skip
    info = {
        "format": FORMAT, "name": name, "version": version, "latent_dim": latent_dim,
        "image_shape": list(image_shape), "likelihood": likelihood, "gaussian_std": gaussian_std,
        "dataset": dataset, "prior": prior, "family": family, "latent_groups": latent_groups or [[latent_dim]],
        "graphs": {
            role: {"file": f"{role}.onnx", "sha256": sha256(folder / f"{role}.onnx"), **signature}
            for role, signature in graphs.items()
        },
        **typed,
        **extra,
    }  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    return info


def derive_manifest(source: Path, folder: Path, drop: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
    """model.json for `folder`, whose graph files are already there, from the version in `source`:
    the graphs in `drop` left out (with their parity figures) and the fields in `changes` replaced.
    Hashes are computed anew from folder's files; the class means come along, copied."""
    info: dict[str, Any] = json.loads((Path(source) / MANIFEST).read_text())
    info.pop("format")
    if "class_means" in info and not (Path(folder) / CLASS_MEANS).exists():
        shutil.copyfile(Path(source) / CLASS_MEANS, Path(folder) / CLASS_MEANS)
    info["graphs"] = {
        role: {k: v for k, v in graph.items() if k not in ("file", "sha256")}
        for role, graph in info["graphs"].items() if role not in drop
    }  # fmt: skip
    if isinstance(info.get("parity_max_abs_diff"), dict):
        info["parity_max_abs_diff"] = {k: v for k, v in info["parity_max_abs_diff"].items() if k.split(".")[0] not in drop}
    return write_manifest(Path(folder), **(info | changes))


def _preprocessing_mismatch(prep: Preprocessing, image_shape: tuple[int, ...]) -> str | None:
    """Why `prep` cannot feed graphs of `image_shape` (the writer's and the reader's one check), or None."""
    made, taken = (prep.channels, *prep.size), tuple(int(v) for v in image_shape)
    if made == taken:
        return None
    return f"preprocessing makes {'x'.join(map(str, made))} images, the graphs take {'x'.join(map(str, taken))}"


def _preprocessing(info: dict[str, Any]) -> Preprocessing | None:
    """model.json's preprocessing; for a version exported before it was written, the bundled sets'
    rule (`service.imaging.on_black`)."""
    if "preprocessing" in info:
        return Preprocessing.from_json(info["preprocessing"])
    return on_black(info["image_shape"])


def _check_class_means(spec: ModelSpec, entry: Any, verify: bool) -> None:
    """class_means.npy is [K, D], one mean latent per class, and (with verify) its sha256 matches."""
    path = spec.folder / spec.class_means_file
    if not path.is_file() or not isinstance(entry, dict) or not entry.get("sha256"):
        raise RepositoryError(f"{path}: missing, or {MANIFEST} gives no sha256 for it")
    if verify and sha256(path) != entry["sha256"]:
        raise RepositoryError(f"{path}: sha256 does not match {MANIFEST} (a torn or replaced file)")
    if list(entry.get("shape", [])) != [len(spec.classes), spec.latent_dim]:
        raise RepositoryError(f"{path}: shape {entry.get('shape')}; one mean latent per class, [{len(spec.classes)}, {spec.latent_dim}]")


def read_manifest(folder: Path, verify: bool = True) -> ModelSpec:
    """One version, checked: files present, fields sane, graph hashes matching (with verify), so a
    torn copy or a swapped file is refused rather than served."""
    folder = Path(folder)
    try:
        info: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RepositoryError(f"{folder}/{MANIFEST} unreadable: {err}") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise RepositoryError(
            f"{folder}/{MANIFEST}: format {found!r}; this server reads format {FORMAT} (export it again, "
            "or run a server of the version that wrote it)"
        )
    if not isinstance(info.get("graphs"), dict):
        raise RepositoryError(f"{folder}/{MANIFEST}: 'graphs' must map each graph to its file and sha256")
    try:
        spec = ModelSpec(
            name=str(info["name"]),
            version=int(info["version"]),
            folder=folder,
            latent_dim=int(info["latent_dim"]),
            image_shape=tuple(int(s) for s in info["image_shape"]),  # type: ignore[arg-type]
            likelihood=str(info["likelihood"]),
            gaussian_std=float(info.get("gaussian_std", 0.1)),
            dataset=str(info.get("dataset", "")),
            prior=str(info.get("prior", "standard")),
            metrics={k: float(v) for k, v in info.get("metrics", {}).items() if isinstance(v, int | float)},
            precisions=tuple(p for p, role in DECODER_PRECISIONS.items() if role in info["graphs"]),
            prior_graphs=PRIOR_ROLES.get(str(info.get("prior", "standard")), ()),
            family=str(info.get("family", "vae")),
            latent_groups=tuple(tuple(int(s) for s in g) for g in info.get("latent_groups", [[info["latent_dim"]]])),
            mixtures=int(info.get("mixtures", 0)),
            preprocessing=_preprocessing(info),
            classes=tuple(str(c) for c in info.get("classes", [])),
            conditional=bool(info.get("conditional", False)),
            class_log_prior=tuple(float(v) for v in info.get("class_log_prior", [])),
            class_means_file=str(info["class_means"]["file"]) if "class_means" in info else "",
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise RepositoryError(f"{folder}/{MANIFEST} is missing or has a bad field: {err!r}") from err
    if len(spec.image_shape) != 3 or spec.latent_dim < 1:
        raise RepositoryError(f"{folder}/{MANIFEST}: bad image_shape or latent_dim")
    if sum(math.prod(g) for g in spec.latent_groups) != spec.latent_dim or any(min(g, default=0) < 1 for g in spec.latent_groups):
        raise RepositoryError(f"{folder}/{MANIFEST}: latent_groups {spec.latent_groups} do not make latent_dim {spec.latent_dim}")
    try:
        spec.distribution
    except ValueError as err:
        raise RepositoryError(f"{folder}/{MANIFEST}: {err}") from None
    mismatch = spec.preprocessing is not None and _preprocessing_mismatch(spec.preprocessing, spec.image_shape)
    if mismatch:
        raise RepositoryError(f"{folder}/{MANIFEST}: {mismatch}")
    if spec.prior not in PRIOR_ROLES:
        served = " and ".join(PRIOR_ROLES)
        raise RepositoryError(f"{folder}/{MANIFEST}: prior {spec.prior!r}; this server serves the priors {served}")
    unlisted = [role for role in spec.prior_graphs if role not in info["graphs"]]
    if unlisted:  # served without them, a flow model would be sampled and scored under N(0, I)
        needs, missing = " and ".join(spec.prior_graphs), ", ".join(unlisted)
        raise RepositoryError(f"{folder}/{MANIFEST}: prior {spec.prior!r} needs {needs}; it does not list {missing}")
    classes = len(spec.classes)
    if spec.conditional and (classes < 2 or len(spec.class_log_prior) != classes):
        raise RepositoryError(f"{folder}/{MANIFEST}: a conditional model needs its classes and their class_log_prior, one each")
    if spec.class_means_file:
        _check_class_means(spec, info["class_means"], verify)
    if spec.family not in FAMILY_ROLES:
        served = " and ".join(FAMILY_ROLES)
        raise RepositoryError(f"{folder}/{MANIFEST}: family {spec.family!r}; this server serves the families {served}")
    unlisted = [role for role in spec.family_graphs if role not in info["graphs"]]
    if unlisted:
        raise RepositoryError(f"{folder}/{MANIFEST}: a {spec.family} model needs {', '.join(unlisted)}; it does not list it")
    if folder.name.isdigit() and spec.version != int(folder.name):
        raise RepositoryError(f"{folder}/{MANIFEST} says version {spec.version}, its folder says {folder.name}")
    for role in (*ROLES, *spec.prior_graphs, *spec.family_graphs, *(DECODER_PRECISIONS[p] for p in spec.precisions)):
        path = spec.graph(role)
        try:
            expected = info["graphs"][role].get("sha256")
            if not path.is_file():
                raise RepositoryError(f"{path} is missing")
            if not expected:  # an unchecked graph could be torn or swapped: never serve one
                raise RepositoryError(f"{path}: {MANIFEST} gives no sha256 for it")
            if verify and sha256(path) != expected:
                raise RepositoryError(f"{path}: sha256 does not match {MANIFEST} (a torn or replaced file)")
        except (KeyError, AttributeError, TypeError, OSError) as err:
            raise RepositoryError(f"{path}: cannot check it against {MANIFEST}: {err!r}") from err
    return spec
