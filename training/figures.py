"""The pictures a person looks at to judge a VAE: samples, reconstructions, interpolations,
latent traversals and the loss curves, written as PNG files. An autoencoder gets the same, its
samples.png decoded from z ~ N(0, I), plus samples_fitted.png from the Gaussian fitted to its codes.
A conditional model's samples.png draws classes from p(y), samples_by_class.png has a row per class,
and its reconstructions and paths are given their images' classes (a path between two classes walks
their class weights too). A model with classes (conditional, or with its class means) gets edits.png:
test images moved to another class, strength 0 to 1 from left to right. A model with several latent
groups (the hierarchical VAE) gets groups.png: what each group carries (`group_resampling`)."""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from service.imaging import grid
from training.conditioning import edit
from training.model import VAE

FIGURES = (
    "samples.png",
    "reconstructions.png",
    "interpolation_linear.png",
    "interpolation_slerp.png",
    "traversals.png",
    "loss_curves.png",
)


def image_grid(images: torch.Tensor, cols: int) -> Image.Image:
    """[N, C, H, W] in [0, 1] -> one picture (grey or colour), drawn as the client draws its grids."""
    return grid(images.detach().float().cpu().numpy(), cols)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of rows a, b [N, D] at fractions t [S]: [N, S, D]; a straight line
    for (anti)parallel pairs, where no unique great circle exists."""
    a_n = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b_n = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    omega = torch.arccos((a_n * b_n).sum(-1, keepdim=True).clamp(-1.0, 1.0)).unsqueeze(1)
    sin = torch.sin(omega)
    t = t.view(1, -1, 1)
    curved = (torch.sin((1 - t) * omega) * a.unsqueeze(1) + torch.sin(t * omega) * b.unsqueeze(1)) / sin.clamp_min(1e-6)
    return torch.where(sin.abs() < 1e-6, lerp(a, b, t.view(-1)), curved)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(1, -1, 1)
    return a.unsqueeze(1) * (1 - t) + b.unsqueeze(1) * t


@torch.no_grad()
def write_figures(
    model: VAE, test_images: torch.Tensor, history: list[dict[str, Any]], out: Path, seed: int = 0,
    test_labels: torch.Tensor | None = None, class_means: torch.Tensor | None = None,
) -> list[Path]:  # fmt: skip
    """The figures of a run; `test_labels` the test images' classes, which a conditional model needs,
    and with them (and a conditional model, or `class_means`) its edits."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    paths = []

    def save(img: Image.Image, name: str) -> None:
        img.save(out / name)
        paths.append(out / name)

    save(image_grid(model.sample(64, generator=gen), cols=8), "samples.png")
    if model.cfg.kind == "ae":
        fitted = model.sample(64, generator=torch.Generator().manual_seed(seed), source="fitted")
        save(image_grid(fitted, cols=8), "samples_fitted.png")
    y: torch.Tensor | None = None
    if model.conditional:
        if test_labels is None:
            raise ValueError("a conditional model's figures need the test images' labels")
        per_class = torch.arange(model.cfg.classes).repeat_interleave(8)
        save(image_grid(model.sample(len(per_class), generator=torch.Generator().manual_seed(seed), y=per_class), cols=8),
             "samples_by_class.png")  # fmt: skip
        y = torch.nn.functional.one_hot(test_labels, model.cfg.classes).float()  # class weights: paths mix them

    # Up to two rows of 16 inputs, each above its reconstructions; fewer for a small test split.
    cols = min(16, len(test_images))
    rows = min(2, len(test_images) // cols)
    x = test_images[: rows * cols]
    y_x = None if y is None else y[: rows * cols]
    mu, _ = model.encode(x, y_x)
    recon = model.mean_image(model.decode(mu, y_x))
    pairs = torch.stack([x.view(rows, cols, *x.shape[1:]), recon.view(rows, cols, *x.shape[1:])], dim=1)
    save(image_grid(pairs.reshape(-1, *x.shape[1:]), cols=cols), "reconstructions.png")

    steps = torch.linspace(0, 1, 10, device=mu.device)  # on the model's device: a CUDA run draws these too
    n_paths = max(1, min(6, len(mu) // 2))  # pairs of test images; one image alone walks to z = 0
    a = mu[:n_paths]
    b = mu[n_paths : 2 * n_paths] if len(mu) >= 2 else torch.zeros_like(a)
    y_path = None
    if y_x is not None:  # the classes' weights walk from a's class to b's along the same steps
        y_b = y_x[n_paths : 2 * n_paths] if len(mu) >= 2 else y_x[:n_paths]
        y_path = lerp(y_x[:n_paths], y_b, steps).reshape(-1, y_x.shape[1])
    for name, path_fn in (("linear", lerp), ("slerp", slerp)):
        z = path_fn(a, b, steps).reshape(-1, mu.shape[1])
        save(image_grid(model.mean_image(model.decode(z, y_path)), cols=len(steps)), f"interpolation_{name}.png")

    # Traverse the 8 most used latent dimensions from -3 to 3, starting at one test image's encoding.
    all_mu, _ = model.encode(test_images[:500], None if y is None else y[:500])
    dims = all_mu.var(dim=0).argsort(descending=True)[:8]
    values = torch.linspace(-3, 3, 9, device=mu.device)
    z = mu[0].repeat(len(dims), len(values), 1)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    y_trav = None if y is None else y[:1].expand(len(dims) * len(values), -1)
    save(image_grid(model.mean_image(model.decode(z.view(-1, mu.shape[1]), y_trav)), cols=len(values)), "traversals.png")

    if len(model.group_dims) > 1:
        kept = group_resampling(model, x[:8], None if y_x is None else y_x[:8], torch.Generator().manual_seed(seed))
        cells = torch.cat([x[:8].unsqueeze(1), kept], dim=1)
        save(image_grid(cells.reshape(-1, *x.shape[1:]), cols=cells.shape[1]), "groups.png")

    if test_labels is not None and model.cfg.kind != "ae" and (model.conditional or class_means is not None):
        save(edit_paths(model, test_images, test_labels, class_means), "edits.png")

    save_loss_curves(history, out / "loss_curves.png")
    paths.append(out / "loss_curves.png")
    return paths


@torch.no_grad()
def group_resampling(
    model: VAE, x: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """What each latent group carries, as VDVAE shows it: per image, its encoding u for the first L
    groups (coarse to fine) and prior noise for the others, L = 0 (a sample from the prior) to every
    group (the reconstruction): [N, groups + 1, C, H, W]. Where a picture keeps its image's shape
    from some L on, the groups above carry it and the priors below fill in what the image needs."""
    u, _ = model.encode(x, y)
    noise = torch.randn(u.shape, generator=generator).to(u.device)  # drawn on the CPU: the same on any device
    edges = [0, *accumulate(model.group_dims)]
    z = torch.stack([torch.cat([u[:, :e], noise[:, e:]], dim=1) for e in edges], dim=1)
    y_rows = None if y is None else y.repeat_interleave(len(edges), dim=0)
    images = model.mean_image(model.decode(z.flatten(0, 1), y_rows))
    return images.view(len(x), len(edges), *images.shape[1:])


@torch.no_grad()
def edit_paths(model: VAE, x: torch.Tensor, labels: torch.Tensor, class_means: torch.Tensor | None, rows: int = 8) -> Image.Image:
    """Edit paths: per row, a test image, then its edits to the next class (of those with test
    images) at strengths 0 to 1 (`training.conditioning.edit`); the first image of each class in turn."""
    present = labels.unique().tolist()
    firsts = [int(torch.nonzero(labels == c).flatten()[0]) for c in present]
    picked = torch.tensor((firsts * rows)[:rows], device=x.device)
    source = labels[picked]
    target = torch.tensor([present[(present.index(c) + 1) % len(present)] for c in source.tolist()], device=x.device)
    strengths = torch.linspace(0, 1, 6).tolist()
    edits = [edit(model, x[picked], source, target, s, class_means) for s in strengths]
    cells = torch.stack([x[picked], *edits], dim=1)  # [rows, 1 + strengths, C, H, W]
    return image_grid(cells.reshape(-1, *x.shape[1:]), cols=1 + len(strengths))


def save_loss_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    titles = {"neg_elbo": "-ELBO (nats)", "recon": "reconstruction (nats)", "kl": "KL (nats)"}
    panels = [(k, t) for k, t in titles.items() if history and k in history[0]["train"]]  # an autoencoder: recon only
    fig, axes = plt.subplots(1, len(panels), figsize=(13 * len(panels) / 3, 3.6), squeeze=False)
    axes = axes[0]
    for ax, (key, title) in zip(axes, panels):
        ax.plot(epochs, [h["train"][key] for h in history], label="train")
        ax.plot(epochs, [h["val"][key] for h in history], label="validation")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
