"""What more training time buys: each run's validation ELBO in bits/dim against its training
minutes, several runs on the same axes, with the test NLL (IWAE) where the run ends.

`python -m training.curves --runs runs/twemoji runs/twemoji-hvae --out curves.png` reads each run's
metrics.json (its per-epoch history, seconds and validation -ELBO; its test figures), or, for a run
stopped before its end (no metrics.json), the history kept in its last.pt.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from service import commands
from service.commands import Parser, UserError, writable_folder
from training import checkpoint
from training.config import TrainConfig, from_dict
from training.likelihoods import for_model


def curve(metrics: dict[str, Any]) -> tuple[list[float], list[float], float | None]:
    """(training minutes at each epoch's end, validation -ELBO in bits/dim, test NLL in bits/dim)."""
    cfg = from_dict(TrainConfig, metrics["config"])
    m = cfg.model
    c, h, w = m.image_shape
    spec = for_model(m).spec
    minutes, bits, elapsed = [], [], 0.0
    for record in metrics["history"]:
        elapsed += record["seconds"] / 60
        minutes.append(elapsed)
        bits.append(float(spec.bits_per_dim(record["val"]["neg_elbo"], c * h * w)))
    test = metrics.get("test", {}).get("nll_bits_per_dim")
    return minutes, bits, test


def run_metrics(run: Path) -> dict[str, Any]:
    """A run's metrics.json; for a run stopped before it wrote one, its last.pt's config and history
    (no test figures)."""
    try:
        return json.loads((run / "metrics.json").read_text())
    except FileNotFoundError:
        pass
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--runs {run}: metrics.json unreadable ({err})") from None
    if not (run / "last.pt").is_file():
        raise UserError(f"--runs {run}: neither metrics.json nor last.pt (not a run folder of python -m training)")
    state = checkpoint.read(run / "last.pt", checkpoint.CHECKPOINT, ("config", "history"))
    return {"config": state["config"], "history": state["history"]}


def axis_top(values: list[float]) -> float:
    """The bits/dim axis's top: twice the median, so a run that diverged (thousands of bits/dim)
    does not flatten every other curve; inf with nothing finite to show."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.inf
    return min(finite[-1] * 1.02, 2 * finite[len(finite) // 2])


def write_curves(runs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    curves = [(run, *curve(run_metrics(run))) for run in runs]
    shown = [b for _, _, bits, test in curves for b in (*bits, test) if b is not None and math.isfinite(b)]
    top = axis_top(shown)
    for run, minutes, bits, test in curves:
        past = max((b for b in bits if b > top), default=None)
        cut = f" (up to {past:,.0f} past the axis)" if past is not None else ""
        line = ax.plot(minutes, bits, label=f"{run.name}: validation -ELBO{cut}")[0]
        if test is not None and math.isfinite(test) and minutes:
            ax.plot([minutes[-1]], [test], "o", color=line.get_color(), label=f"{run.name}: test NLL (IWAE) {test:.3f}")
    if top < math.inf:
        bottom = min(shown)
        ax.set_ylim(bottom - 0.05 * (top - bottom), top)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("bits/dim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def build_parser() -> Parser:
    parser = Parser(prog="python -m training.curves", description=commands.summary(__doc__))
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders (a metrics.json, or a stopped run's last.pt)")
    parser.add_argument("--out", type=Path, required=True, help="the .png to write")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    writable_folder(args.out.parent, "--out")
    print(write_curves(args.runs, args.out))


if __name__ == "__main__":
    commands.run(main, "python -m training.curves")
