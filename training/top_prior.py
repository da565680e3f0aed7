"""Fit a trained hierarchical VAE's top prior (`--top-prior`) to its training images, and write the
refitted checkpoint: training does not depend on it, so a run trained without the flag, or with
another number of groups, gets the same model as a run trained with it.

python -m training.top_prior --checkpoint runs/twemoji-hvae/best.pt --groups 6 --scale 1.15 --out runs/twemoji-hvae/best-top6.pt
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from service import commands
from service.commands import Parser, UsageError, writable_folder
from training import checkpoint
from training.cli import check_data
from training.data import load_data
from training.families import build
from training.train import fit_top_prior, fitted_extras

log = logging.getLogger(__name__)


def build_parser() -> Parser:
    """The command's parser: a pure reading of the flags (the docs' commands are checked with it)."""
    parser = Parser(prog="python -m training.top_prior", description=commands.summary(__doc__))
    parser.add_argument("--checkpoint", type=Path, required=True, help="a hierarchical VAE's best.pt")
    parser.add_argument("--groups", type=int, required=True, help="the top groups to fit (0: back to the learned priors)")
    parser.add_argument("--scale", type=float, default=1.0, help="the fitted standard deviations times this (--top-prior-scale)")
    parser.add_argument("--out", type=Path, required=True, help="the refitted checkpoint")
    parser.add_argument("--data-dir", help="overrides the data directory stored in the checkpoint")
    return parser


def refit(path: Path, groups: int, out: Path, data_dir: str | None = None, scale: float = 1.0) -> None:
    state = checkpoint.load(path)
    model, cfg = checkpoint.model_from_state(state, source=path)
    if cfg.model.kind != "hvae" or cfg.conditional:
        raise UsageError(f"{path}: a top prior is fitted to an unconditional hierarchical VAE, not this {cfg.model.kind}"
                         f"{' (conditional)' if cfg.conditional else ''}")  # fmt: skip
    try:
        cfg.model = replace(cfg.model, top_prior=groups, top_prior_scale=scale)
    except ValueError as err:
        raise UsageError(str(err)) from None
    cfg.data_dir = data_dir or cfg.data_dir
    check_data(cfg.dataset, cfg.data_dir, cfg.download)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("top_")}
    model = build(cfg.model)
    unfitted = {k: v for k, v in model.state_dict().items() if k.startswith("top_")}  # the new fit's, identity
    model.load_state_dict(weights | unfitted)
    model.eval()
    data = load_data(cfg)
    if groups:
        model.set_top_prior(fit_top_prior(model, data))
    keep = {k: v for k, v in state.items() if k not in ("format", "config", "model", "classes", "class_means")}
    checkpoint.save(out, model, cfg, **keep, **fitted_extras(model, data))
    log.info("wrote %s: %s's weights, the top %d groups' prior fitted to %d training images", out, path, groups, len(data.train))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    writable_folder(args.out.parent, "--out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    refit(args.checkpoint, args.groups, args.out, args.data_dir, args.scale)


if __name__ == "__main__":
    commands.run(main, "python -m training.top_prior")
