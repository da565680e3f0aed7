"""Samples of several trained runs side by side, in one figure.

`python -m training.compare --runs runs/digits runs/digits-flow runs/digits-ae --out compare.png`
draws, from each run's best.pt, samples decoded from its prior (N(0, I), or the flow for a
flow-prior VAE); an autoencoder gets two panels, from N(0, I) and from the Gaussian fitted to its
training codes. Every panel uses the same seed; `--temperature 1 0.8 0.5` draws a row per
temperature (the prior's noise scaled by it), the same noise in every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from service import commands
from service.commands import Parser, writable_folder
from training.checkpoint import load_model
from training.figures import image_grid


def checkpoint_of(run: Path) -> Path:
    """A run folder's best.pt, or the checkpoint file named."""
    return run / "best.pt" if run.is_dir() else run


def panels(run: Path, n: int, seed: int, temperatures: Sequence[float] = (1.0,)) -> list[tuple[str, list[torch.Tensor]]]:
    """(title, images at each temperature) for one run folder (or a checkpoint file)."""
    model, cfg, _ = load_model(checkpoint_of(run))
    name = run.name if run.is_dir() else run.parent.name
    m = cfg.model

    def draw(source: str) -> list[torch.Tensor]:
        return [model.sample(n, t, torch.Generator().manual_seed(seed), source) for t in temperatures]

    if m.kind == "ae":
        return [(f"{name}\nAE, z ~ N(0, I)", draw("prior")), (f"{name}\nAE, z ~ fitted Gaussian", draw("fitted"))]
    if m.kind == "hvae":
        return [(f"{name}\nhierarchical VAE ({len(model.group_dims)} groups)", draw("prior"))]
    prior = f"flow prior ({m.flow_layers} layers)" if m.prior == "flow" else "N(0, I) prior"
    return [(f"{name}\nVAE, {prior}", draw("prior"))]


def write_compare(
    runs: list[Path], out: Path, n: int = 36, seed: int = 0, temperatures: Sequence[float] = (1.0,)
) -> Path:
    """A column per panel, a row per temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [panel for run in runs for panel in panels(run, n, seed, temperatures)]
    cols = max(1, round(n**0.5))
    rows = len(temperatures)
    fig, axes = plt.subplots(rows, len(items), figsize=(3.2 * len(items), 0.6 + 3.2 * rows), squeeze=False)
    for column, (title, drawn) in enumerate(items):
        for row, images in enumerate(drawn):
            ax = axes[row][column]
            ax.imshow(image_grid(images, cols=cols), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(title if rows == 1 else f"{title}\ntemperature {temperatures[row]:g}", fontsize=9)
            ax.axis("off")
    what = f"temperature {temperatures[0]:g}" if rows == 1 else "a row per temperature, the same noise"
    fig.suptitle(f"samples, {what}, seed {seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def build_parser() -> Parser:
    """The command's parser: a pure reading of the flags (the docs' commands are checked with it)."""
    parser = Parser(prog="python -m training.compare", description=commands.summary(__doc__))
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders (or best.pt files)")
    parser.add_argument("--out", type=Path, default=Path("compare.png"))
    parser.add_argument("--n", type=int, default=36, help="samples per panel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0], help="one or more: a row of panels each")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for run in args.runs:
        if not checkpoint_of(run).is_file():
            parser.error(f"--runs {run}: no {checkpoint_of(run)}; give run folders of python -m training, or best.pt files")
    writable_folder(args.out.parent, "--out")
    if any(t <= 0 for t in args.temperature):
        parser.error(f"--temperature must be positive, got {' '.join(map(str, args.temperature))}")
    write_compare(args.runs, args.out, args.n, args.seed, args.temperature)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    commands.run(main, "python -m training.compare")
