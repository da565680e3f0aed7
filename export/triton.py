"""NVIDIA Triton model configs for the exported graphs, so the same files can be served by Triton.

Each version folder gets `<role>.config.pbtxt` beside each graph: encoder and decoder, for a
flow prior prior_sample and prior_density, and a family's own graphs (a hierarchical model's posterior).
Triton wants one model per folder (`<repo>/<model>/config.pbtxt`, `<repo>/<model>/<version>/...`),
so `python -m export.triton MODELS/NAME TRITON_REPO` lays out that view with hard links: no copies (copies only across filesystems).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from service import commands
from service.commands import Parser, existing_folder, writable_folder
from service.manifest import FAMILY_ROLES, PRIOR_ROLES, ROLES, version_numbers


def _tensor(name: str, dims: list[int]) -> str:
    """One tensor, its dims without the batch axis. Triton needs non-empty dims, so a tensor that is
    the batch axis alone (prior_density's log_prob [N]) is declared [1] and reshaped to [] for the graph."""
    if not dims:
        return f'  {{ name: "{name}" data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }} }}'
    return f'  {{ name: "{name}" data_type: TYPE_FP32 dims: [ {", ".join(str(d) for d in dims)} ] }}'


def triton_config(model_name: str, role: str, signature: dict[str, dict[str, list[int]]], max_batch_size: int) -> str:
    """config.pbtxt text: platform onnxruntime_onnx, the batch limit, dynamic batching.

    With max_batch_size > 0 Triton adds the batch axis itself, so dims leave out the leading -1.
    """
    inputs = ",\n".join(_tensor(n, dims[1:]) for n, dims in signature["inputs"].items())
    outputs = ",\n".join(_tensor(n, dims[1:]) for n, dims in signature["outputs"].items())
    return (
        f'name: "{model_name}_{role}"\n'
        'platform: "onnxruntime_onnx"\n'
        f'default_model_filename: "{role}.onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
        "instance_group [ { kind: KIND_AUTO count: 1 } ]\n"
    )


def layout(model_dir: Path, triton_repo: Path) -> list[Path]:
    """Build <triton_repo>/<name>_<role>/{config.pbtxt, <version>/<role>.onnx} from every version:
    encoder and decoder, and the flow prior's graphs and a family's own (a hierarchical model's
    posterior) where the newest version has them (older versions without them are left out of
    those Triton models)."""
    name = model_dir.name
    made = []
    versions = [model_dir / str(v) for v in version_numbers(model_dir)]
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no version folders")
    extra = (*PRIOR_ROLES["flow"], *(role for roles in FAMILY_ROLES.values() for role in roles))
    priors = [role for role in extra if (versions[-1] / f"{role}.config.pbtxt").exists()]
    for role in (*ROLES, *priors):
        target = triton_repo / f"{name}_{role}"
        for version in versions:
            if role in priors and not (version / f"{role}.onnx").exists():
                continue  # a version before the flow (or of another family): not a version of this Triton model
            (target / version.name).mkdir(parents=True, exist_ok=True)
            dest = target / version.name / f"{role}.onnx"
            if not dest.exists():
                _link_or_copy(version / f"{role}.onnx", dest)
        # The newest version's config describes the model (Triton has one config per model).
        (target / "config.pbtxt").write_text((versions[-1] / f"{role}.config.pbtxt").read_text())
        made.append(target)
    return made


def _link_or_copy(source: Path, dest: Path) -> None:
    """A hard link, or a copy where the Triton repository is on another filesystem."""
    try:
        os.link(source, dest)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        shutil.copy2(source, dest)


def build_parser() -> Parser:
    """The command's parser: a pure reading of the flags (the docs' commands are checked with it)."""
    parser = Parser(prog="python -m export.triton", description="Lay out a Triton model repository from an exported model.")
    parser.add_argument("model_dir", type=Path, help="MODELS/NAME, as written by python -m export")
    parser.add_argument("triton_repo", type=Path)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not version_numbers(existing_folder(args.model_dir, "model_dir")):
        parser.error(f"{args.model_dir} holds no version folders: give MODELS/NAME, as python -m export writes it")
    writable_folder(args.triton_repo, "triton_repo")
    for path in layout(args.model_dir, args.triton_repo):
        print(path)


if __name__ == "__main__":
    commands.run(main, "python -m export.triton")
