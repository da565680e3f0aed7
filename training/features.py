"""A small classifier CNN whose middle-layer activations serve as a perceptual reconstruction loss.

No pretrained network can be downloaded here, so the project trains its own on the same data:
`python -m training.features --dataset digits --out DIR` writes DIR/features.pt. The same network
is the judge of sample quality (`training.quality`): its penultimate activations for the Frechet
distance, its class probabilities for the class statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from service import commands
from service.commands import Parser, writable_folder
from training.checkpoint import CheckpointError, read
from training.cli import add_data_arguments, check_data, data_options
from training.config import TrainConfig
from training.data import Dataset, load_data, load_dataset, shape_of

log = logging.getLogger(__name__)

# (epochs, batch size) by dataset: the 1,200 training digits need many more, smaller steps than
# MNIST's 54,000 images to train the classifier well (30 epochs of 32: 98% test accuracy; 5 of 128: 87%).
# A folder's classes (a few thousand images, colour): many epochs of mid-sized batches.
SCHEDULES = {"digits": (30, 32), "folder": (30, 64)}
CLASSIFIER = "a classifier of this project (the features.pt that python -m training.features writes)"
DEFAULT_SCHEDULE = (5, 128)


class FeatureNet(nn.Module):
    """conv -> conv(stride 2) = the feature maps compared; then conv(stride 2) until the map is 4x4
    or smaller -> pool -> classes. The pool averages what each position sees, so the stages grow
    the receptive field to the whole digit first: one stage for 8x8 digits, two for 28x28 MNIST
    (whose classifier with one stage, seeing 9-pixel patches, stopped at 92% test accuracy)."""

    def __init__(self, image_shape: tuple[int, int, int], classes: int = 10, width: int = 32) -> None:
        super().__init__()
        c, size = image_shape[0], max(image_shape[1:])
        self.image_shape = tuple(image_shape)
        self.front = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()
        )
        stages: list[nn.Module] = []
        size = (size + 1) // 2
        while not stages or size > 4:
            stages += [nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU()]
            size = (size + 1) // 2
        self.back = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.front(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer: the pooled activations the class logits are read from, [N, 2 * width]."""
        return self.back[:-1](self.front(x))

    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate activations and class logits in one pass."""
        h = self.embed(x)
        return h, self.back[-1](h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(self.front(x))


def feature_distance(net: FeatureNet, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared distance between the middle-layer activations of x and x_hat, summed per example: [N]."""
    with torch.no_grad():
        target = net.features(x)
    return (net.features(x_hat) - target).pow(2).flatten(1).sum(dim=1)


def load_feature_net(path: str | Path, device: torch.device | str = "cpu") -> FeatureNet:
    """A frozen FeatureNet from a features.pt file (loaded without unpickling arbitrary objects)."""
    state = read(path, CLASSIFIER, ("image_shape", "classes", "width", "model"))  # on the CPU, like checkpoints
    net = FeatureNet(tuple(state["image_shape"]), state["classes"], state["width"])
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as err:  # one saved before the layout gained its stages (images over 8x8)
        raise CheckpointError(
            f"{path} holds a classifier of another layout than this version's FeatureNet; train it again "
            f"with python -m training.features --dataset {state.get('dataset', 'NAME')} ({err})"
        ) from err
    net.to(device)
    net.eval().requires_grad_(False)
    return net


def check_classifiers(cfg: TrainConfig) -> None:
    """Before a run trains: --classifier and --feature-checkpoint must each be a classifier of this
    project, for images of the run's shape. Training would otherwise find out only when it first
    uses them (the classifier, after the last epoch)."""
    for flag, path in (("--classifier", cfg.classifier), ("--feature-checkpoint", cfg.feature_checkpoint)):
        if path:
            check_classifier(path, flag, shape_of(cfg))


def check_classifier(path: str | Path, flag: str, shape: tuple[int, ...]) -> None:
    """CheckpointError, naming `flag`, unless `path` is a classifier of images of `shape`."""
    try:
        net = load_feature_net(path)
    except CheckpointError as err:
        raise CheckpointError(f"{flag}: {err}") from err.__cause__
    if net.image_shape != tuple(shape):
        raise CheckpointError(
            f"{flag} {path} judges images of shape {list(net.image_shape)}, this run's are {list(shape)}: train one "
            f"on this data with python -m training.features"
        )


def train_feature_net(
    dataset: str, out: Path, epochs: int | None = None, data_dir: str | None = None, seed: int = 0, width: int = 32,
    batch_size: int | None = None, data: Dataset | None = None,
) -> dict[str, float]:  # fmt: skip
    """Train the classifier; epochs and batch size default to the dataset's schedule (`SCHEDULES`).
    `data` is the dataset already loaded (a folder, with its classes); else the bundled `dataset`."""
    default_epochs, default_batch = SCHEDULES.get(dataset, DEFAULT_SCHEDULE)
    epochs = default_epochs if epochs is None else epochs
    batch_size = default_batch if batch_size is None else batch_size
    torch.manual_seed(seed)
    data = data or load_dataset(dataset, Path(data_dir) if data_dir else None, seed=seed)
    if not data.classes:
        raise ValueError(f"{dataset}: no classes to learn (a folder needs its images in one sub-folder per class)")
    classes = len(data.classes)
    net = FeatureNet(data.image_shape, classes, width)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(data.train), generator=gen).split(batch_size):
            loss = F.cross_entropy(net(data.train.batch(idx)), data.train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            accuracy = (net(data.test.unit()).argmax(1) == data.test.labels).float().mean().item()
        log.info("feature net epoch %d: test accuracy %.4f", epoch + 1, accuracy)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "image_shape": list(data.image_shape), "classes": classes, "width": width, "model": net.state_dict(),
        "dataset": dataset, "test_accuracy": accuracy, "class_names": data.classes,
    }  # fmt: skip
    torch.save(state, out / "features.pt")
    return {"test_accuracy": accuracy}


def build_parser() -> Parser:
    """The command's parser: a pure reading of the flags (the docs' commands are checked with it)."""
    parser = Parser(prog="python -m training.features", description=commands.summary(__doc__))
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, help="default: 30 for digits and folders, 5 otherwise")
    parser.add_argument("--batch-size", type=int, help="default: 32 for digits, 64 for folders, 128 otherwise")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = TrainConfig(**data_options(args), seed=args["seed"])
    except ValueError as err:
        parser.error(str(err))
    check_data(cfg.dataset, cfg.data_dir, cfg.download)
    writable_folder(args["out"], "--out")
    data = load_data(cfg) if cfg.dataset == "folder" else None
    result = train_feature_net(
        cfg.dataset, args["out"], args["epochs"], cfg.data_dir, cfg.seed, args["width"], args["batch_size"], data
    )
    print(f"wrote {args['out'] / 'features.pt'} (test accuracy {result['test_accuracy']:.4f})")


if __name__ == "__main__":
    commands.run(main, "python -m training.features")
