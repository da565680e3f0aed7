"""`python -m export --checkpoint runs/digits/best.pt --out models --name digits`"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import warnings
from pathlib import Path

from export.repository import publish
from export.verify import ParityError
from service import commands
from service.commands import Parser, writable_folder
from training.checkpoint import load_model

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def model_name(text: str) -> str:
    """argparse type: a name the server serves as a folder and in URLs (/v2/models/NAME)."""
    if not NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} cannot name a model: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return text


def build_parser() -> Parser:
    """The command's parser: a pure reading of the flags (the docs' commands are checked with it)."""
    parser = Parser(prog="python -m export", description="Export a VAE checkpoint to ONNX.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="best.pt of python -m training")
    parser.add_argument("--out", type=Path, default=Path("models"), help="the model repository")
    parser.add_argument("--name", type=model_name, required=True, help="model name: the folder under --out")
    parser.add_argument("--max-batch-size", type=int, default=256,
                        help="Triton's max_batch_size in each config.pbtxt (recorded in model.json too); this "
                             "project's server batches by its own --max-batch-rows and does not read it")  # fmt: skip
    parser.add_argument("--fp16-decoder", action="store_true", help="also write decoder_fp16.onnx, for GPUs")
    parser.add_argument("--int8-decoder", action="store_true",
                        help="also write decoder_int8.onnx, dynamically quantized for CPUs (pays on large decoders)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # torch.onnx's exporter is chatty at WARNING
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside torch.export
    started = time.perf_counter()
    model, cfg, state = load_model(args.checkpoint)  # CheckpointError, one line, for a file that is none
    writable_folder(args.out, "--out")
    metrics_file = args.checkpoint.parent / "metrics.json"
    run = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    metrics, classes = run.get("test", {}), state.get("classes") or run.get("data", {}).get("classes", [])
    try:
        precisions = tuple(p for p, asked in (("fp16", args.fp16_decoder), ("int8", args.int8_decoder)) if asked)
        folder = publish(model, cfg, args.out, args.name, metrics, args.max_batch_size, precisions, classes, state.get("class_means"))
    except (ParityError, ValueError) as err:
        print(f"export failed, nothing published: {err}", file=sys.stderr)
        return 1
    info = json.loads((folder / "model.json").read_text())
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in info["parity_max_abs_diff"].items())
    print(f"published {folder} in {time.perf_counter() - started:.1f}s (max |onnxruntime - torch|: {diffs})")
    return 0


if __name__ == "__main__":
    commands.run(main, "python -m export")
