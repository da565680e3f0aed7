"""`python -m training --dataset digits --epochs 3 --out runs/digits`: train, evaluate, draw.

`torchrun --nproc_per_node N -m training ...` trains the same run data-parallel on N processes
(`training.distributed`); only rank 0 logs and writes."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from service import commands
from service.commands import Parser, writable_folder
from training.cli import add_data_arguments, check_data, data_options
from training.config import KINDS, LIKELIHOODS, ModelConfig, TrainConfig


def build_parser() -> Parser:
    """The command's parser: a pure reading of the flags (the docs' commands are checked with it)."""
    d, m = TrainConfig(), ModelConfig()
    p = Parser(prog="python -m training", description="Train a VAE, evaluate it, draw its figures.")
    p.add_argument("--out", type=Path, required=True, help="run directory: checkpoints, metrics.json, figures")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    add_data_arguments(p, d)
    p.add_argument("--no-dynamic-binarization", dest="dynamic_binarization", action="store_false")
    p.add_argument("--hflip", action="store_true",
                   help="mirror a random half of each training batch left to right: more data for small folders")  # fmt: skip
    model = p.add_argument_group("model")
    model.add_argument("--latent-dim", type=int, default=m.latent_dim)
    model.add_argument("--widths", type=lambda s: tuple(int(v) for v in s.split(",")), default=m.widths,
                       help="channels per stride-2 conv stage, comma separated (default: stages down to about 4x4, "
                            "32 channels doubling: 8x8 32; 28x28 and 32x32 32,64,128; 64x64 32,64,128,256)")  # fmt: skip
    model.add_argument("--blocks", type=int, default=m.blocks, help="residual blocks per stage")
    model.add_argument("--hidden", type=int, default=m.hidden)
    model.add_argument("--likelihood", choices=LIKELIHOODS, default=m.likelihood,
                       help="p(x|z): bernoulli, gaussian, or logistic-mixture (8-bit pixels, honest bits/dim)")  # fmt: skip
    model.add_argument("--gaussian-std", type=float, default=m.gaussian_std)
    model.add_argument("--mixtures", type=int, default=m.mixtures, help="logistic-mixture: components per pixel")
    model.add_argument("--model", dest="kind", choices=KINDS, default=m.kind,
                       help="vae; ae: the deterministic autoencoder baseline (reconstruction alone); hvae: the "
                            "hierarchical VAE, groups of latents from coarse to fine")  # fmt: skip
    model.add_argument("--groups", default=m.groups,
                       help="hvae: latent groups as factor:count, coarse to fine (8:2 = two groups at 1/8 of the size)")
    model.add_argument("--z-channels", type=int, default=m.z_channels, help="hvae: latent channels per group")
    model.add_argument("--width", type=int, default=m.width, help="hvae: channels of the encoder and the top-down path")
    model.add_argument("--top-prior", type=int, default=m.top_prior,
                       help="hvae: give the top N groups a full-covariance Gaussian prior, fitted to the training "
                            "images' encodings after training (0: their learned priors)")  # fmt: skip
    model.add_argument("--top-prior-scale", type=float, default=m.top_prior_scale,
                       help="hvae: multiply the fitted top prior's standard deviations by this (above 1: samples "
                            "spread wider, at a cost in likelihood)")  # fmt: skip
    model.add_argument("--prior", choices=("standard", "flow"), default=m.prior,
                       help="p(z): N(0, I), or a learned RealNVP flow of N(0, I)")  # fmt: skip
    model.add_argument("--flow-layers", type=int, default=m.flow_layers, help="coupling layers of the flow prior")
    model.add_argument("--flow-hidden", type=int, default=m.flow_hidden, help="hidden units per coupling network")
    model.add_argument("--conditional", action="store_true",
                       help="condition the model on the data's classes (class sub-folders, digits, MNIST): generate a "
                            "class asked for")  # fmt: skip
    model.add_argument("--class-dim", type=int, default=m.class_dim, help="--conditional: the class embedding's size")
    model.add_argument("--class-balance", type=float, default=d.class_balance,
                       help="draw training images of class c with weight n_c^-B: 0 as in the data, 1 every class "
                            "alike (default: 0.5 with --conditional, else 0)")  # fmt: skip
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d.epochs)
    opt.add_argument("--batch-size", type=int, default=d.batch_size)
    opt.add_argument("--lr", type=float, default=d.lr)
    opt.add_argument("--lr-schedule", choices=("cosine", "constant"), default=d.lr_schedule)
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay)
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip)
    opt.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                     help="write no TensorBoard event files into --out")
    opt.add_argument("--ema", type=float, default=d.ema,
                     help="decay of the weights' moving average that is evaluated and exported (default: 0.999 "
                          "for --model hvae, 0: none, otherwise)")  # fmt: skip
    opt.add_argument("--skip-factor", type=float, default=d.skip_factor,
                     help="skip a step whose gradient norm is this many times the run's typical one (default: 10 "
                          "for --model hvae, 0: never, otherwise)")  # fmt: skip
    opt.add_argument("--seed", type=int, default=d.seed)
    opt.add_argument("--device", default=d.device,
                     help="auto, cpu, cuda or cuda:N (under torchrun: cuda is LOCAL_RANK's GPU)")  # fmt: skip
    opt.add_argument("--dist-timeout", type=float, default=d.dist_timeout,
                     help="under torchrun: seconds a rank waits for the others in a collective before the run fails")  # fmt: skip
    loss = p.add_argument_group("loss")
    loss.add_argument("--beta", type=float, default=d.beta, help="weight of the KL term")
    loss.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="KL warm-up length")
    loss.add_argument("--free-bits", type=float, default=d.free_bits, help="nats per latent dimension")
    loss.add_argument("--reconstruction", choices=("pixel", "features", "both"), default=d.reconstruction)
    loss.add_argument("--feature-weight", type=float, default=d.feature_weight)
    loss.add_argument("--feature-checkpoint", help="features.pt from python -m training.features")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--iwae-k", type=int, default=d.iwae_k, help="importance samples for the NLL estimate")
    ev.add_argument("--eval-images", type=int, default=d.eval_images, help="test images to evaluate")
    ev.add_argument("--classifier", help="features.pt from python -m training.features: sample-quality figures")
    ev.add_argument("--quality-samples", type=int, default=d.quality_samples, help="samples scored for sample quality")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path, bool]:
    p = build_parser()
    args = vars(p.parse_args(argv))
    out, resume = args.pop("out"), args.pop("resume")
    model_keys = {"latent_dim", "widths", "blocks", "hidden", "likelihood", "gaussian_std", "mixtures", "kind", "prior",
                  "flow_layers", "flow_hidden", "groups", "z_channels", "width", "top_prior", "top_prior_scale", "class_dim"}  # fmt: skip
    try:
        model_cfg = ModelConfig(**{k: args.pop(k) for k in model_keys})
        cfg = TrainConfig(model=model_cfg, **data_options(args), **args)
    except ValueError as err:
        p.error(str(err))
    return cfg, out, resume


def main(argv: list[str] | None = None) -> None:
    """Train; a mistake of the user's raises a UserError (one line from the command, see run)."""
    cfg, out, resume = parse_args(argv)
    # Under torchrun only rank 0 logs and writes; the others say nothing short of an error.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    check_data(cfg.dataset, cfg.data_dir, cfg.download)
    if rank == 0:
        writable_folder(out, "--out")
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    level = logging.INFO if rank == 0 else logging.ERROR
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {prefix}%(message)s")
    if cfg.dataset == "folder":  # the decoders' process server starts while torch imports
        from training.folder import start_workers

        start_workers()
    from training import distributed  # torch is imported only once the arguments are good
    from training.features import check_classifiers
    from training.train import Stopped, run

    check_classifiers(cfg)  # an hour of training must not end on a --classifier that is no classifier
    dist = distributed.setup(cfg.device, cfg.dist_timeout)
    try:
        metrics = run(cfg, out, resume)
    except Stopped as stop:  # last.pt is written: a restart with --resume continues from that step
        print(f"{prefix}{stop}; {out}/last.pt holds the run to that step: continue with --resume", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except Exception as err:
        if not (dist.active and distributed.is_collective_error(err)):
            raise
        print(
            f"{prefix}training failed: another rank stopped answering ({type(err).__name__}: {err}). A rank that "
            f"died is named in torchrun's summary; one that hangs ends the run after --dist-timeout "
            f"({cfg.dist_timeout:g} s). {out}/last.pt (if written) is whole: restart with --resume",
            file=sys.stderr,
        )  # fmt: skip
        sys.exit(1)
    finally:
        distributed.cleanup()
    if metrics is None:  # a rank other than 0: its share is done
        return
    test = metrics["test"]
    if test["nll"] is None:
        scores = f"reconstruction {test['reconstruction']:.2f} nats (an autoencoder: no ELBO, no NLL)"
    else:
        given, over = (" given the class", " over the classes") if "conditional" in test else ("", "")
        scores = f"-ELBO{given} {-test['elbo']:.2f} nats, NLL{over} (IWAE k={test['iwae_k']}) {test['nll']:.2f} nats"
    figures = len(metrics["figures"])
    print(f"test on {test['images']} images: {scores}; wrote {out}/best.pt, metrics.json and {figures} figures")
    if "conditional" in test:
        from training.evaluate import conditional_line

        print(conditional_line(test))
    if "quality" in test:
        from training.evaluate import quality_lines

        print("\n".join(quality_lines(test["quality"])))


if __name__ == "__main__":
    commands.run(main, "python -m training")
