"""Samples of several trained runs side by side, in one figure.

`python -m training.compare --runs runs/digits runs/digits-flow runs/digits-ae --out compare.png`
draws, from each run's best.pt, samples decoded from its prior (N(0, I), or the flow for a
flow-prior VAE); an autoencoder gets two panels, from N(0, I) and from the Gaussian fitted to its
training codes. Every panel uses the same seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from service import commands
from service.commands import Parser, writable_folder
from training.checkpoint import load_model
from training.figures import image_grid


def checkpoint_of(run: Path) -> Path:
    """A run folder's best.pt, or the checkpoint file named."""
    return run / "best.pt" if run.is_dir() else run


def panels(run: Path, n: int, seed: int, temperature: float) -> list[tuple[str, torch.Tensor]]:
    """(title, images) for one run folder (or a checkpoint file)."""
    model, cfg, _ = load_model(checkpoint_of(run))
    name = run.name if run.is_dir() else run.parent.name
    m = cfg.model

    def draw(source: str) -> torch.Tensor:
        return model.sample(n, temperature, torch.Generator().manual_seed(seed), source)

    if m.kind == "ae":
        return [(f"{name}\nAE, z ~ N(0, I)", draw("prior")), (f"{name}\nAE, z ~ fitted Gaussian", draw("fitted"))]
    if m.kind == "hvae":
        return [(f"{name}\nhierarchical VAE ({len(model.group_dims)} groups)", draw("prior"))]
    prior = f"flow prior ({m.flow_layers} layers)" if m.prior == "flow" else "N(0, I) prior"
    return [(f"{name}\nVAE, {prior}", draw("prior"))]


def write_compare(runs: list[Path], out: Path, n: int = 36, seed: int = 0, temperature: float = 1.0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [panel for run in runs for panel in panels(run, n, seed, temperature)]
    cols = max(1, round(n**0.5))
    fig, axes = plt.subplots(1, len(items), figsize=(3.2 * len(items), 3.8), squeeze=False)
    for ax, (title, images) in zip(axes[0], items):
        ax.imshow(image_grid(images, cols=cols), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"samples, temperature {temperature:g}, seed {seed}", fontsize=10)
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
    parser.add_argument("--temperature", type=float, default=1.0)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for run in args.runs:
        if not checkpoint_of(run).is_file():
            parser.error(f"--runs {run}: no {checkpoint_of(run)}; give run folders of python -m training, or best.pt files")
    writable_folder(args.out.parent, "--out")
    write_compare(args.runs, args.out, args.n, args.seed, args.temperature)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    commands.run(main, "python -m training.compare")
