"""The data flags, shared by `python -m training` and `python -m training.features`, so a folder is
read the same way by both (`training.evaluate` reads it as the checkpoint's config says)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from service.commands import UsageError, existing_folder
from service.imaging import parse_size
from training.config import FITS, TrainConfig
from training.data import DATASETS, MIRRORS, MissingData, check_idx, idx_folder

DATA_KEYS = (
    "dataset", "data_dir", "download", "val_fraction", "test_fraction", "image_size", "channels", "fit", "background",
    "strict", "cache_dir",
)  # fmt: skip


def add_data_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None) -> None:
    d = defaults or TrainConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                      help="a bundled set, or folder: a folder of images (--data-dir, --image-size)")  # fmt: skip
    data.add_argument("--data-dir", help="the folder of images (folder), or of the four IDX files (mnist, fashion-mnist)")
    data.add_argument("--no-download", dest="download", action="store_false", help="never try to download data")
    data.add_argument("--val-fraction", type=float, default=d.val_fraction)
    data.add_argument("--test-fraction", type=float, default=d.test_fraction, help="folders: share of images held out for test")
    data.add_argument("--image-size", type=parse_size, help="folders: S or HxW, the model's image size")
    data.add_argument("--channels", type=int, choices=(1, 3), default=d.channels, help="folders: 3 (RGB) or 1 (grey)")
    data.add_argument("--fit", choices=FITS, default=d.fit,
                      help="folders: crop (shorter side to size, centre crop) or pad (longer side, padded)")  # fmt: skip
    data.add_argument("--background", default=d.background, help="folders: colour under transparency (white, black, #RRGGBB)")
    data.add_argument("--strict", action="store_true", help="folders: the first unreadable file fails the run")
    data.add_argument("--cache-dir", help="folders: where decoded pixels are cached (default $VAE_CACHE_DIR, else "
                      "$XDG_CACHE_HOME/vae-serve/folders, else ~/.cache/vae-serve/folders)")


def data_options(args: dict[str, Any]) -> dict[str, Any]:
    """Take the data flags out of parsed arguments (vars(namespace)), as TrainConfig fields. Folders
    are made absolute, so the checkpoint's config finds its data from any working directory.
    ValueError for flags that cannot work together; whether the data is there is `check_data`'s."""
    options = {key: args.pop(key) for key in DATA_KEYS}
    if options["dataset"] != "folder" and options["image_size"] is not None:
        raise ValueError(f"--image-size is for --dataset folder; {options['dataset']} has its own size")
    for key in ("data_dir", "cache_dir"):
        if options[key]:
            options[key] = str(Path(options[key]).expanduser().resolve())
    return options


def check_data(dataset: str, data_dir: str | None, download: bool) -> None:
    """After parsing, before any work: a folder that is not there, or a bundled set's files missing
    where nothing may be downloaded, is a UsageError saying so."""
    if dataset == "folder" and data_dir:
        existing_folder(Path(data_dir), "--data-dir")
    if dataset in MIRRORS and not download:
        try:
            check_idx(dataset, idx_folder(dataset, data_dir))
        except MissingData as err:
            raise UsageError(str(err)) from None
