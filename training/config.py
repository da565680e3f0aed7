"""The two configs: what the model is (saved in every checkpoint) and how it is trained."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from service.imaging import FITS, parse_color
from service.likelihood import LIKELIHOODS

RECONSTRUCTIONS = ("pixel", "features", "both")
KINDS = ("vae", "ae", "hvae")
PRIORS = ("standard", "flow")


@dataclass
class ModelConfig:
    """Enough to rebuild the network: the architecture follows from the image shape and these."""

    image_shape: tuple[int, int, int] = (1, 28, 28)
    latent_dim: int = 16
    # Channels of each stride-2 conv stage; None: as many stages as bring the image to about 4x4
    # (8x8: 1, 28x28 and 32x32: 3, 64x64: 4), 32 channels doubling per stage up to 256.
    widths: tuple[int, ...] | None = None
    blocks: int = 0  # residual 3x3 blocks per stage, on both sides
    hidden: int = 256  # width of the fully connected layer between the convs and the latent
    likelihood: str = "bernoulli"  # p(x|z): bernoulli (logits), gaussian (mean, fixed std) or logistic-mixture
    gaussian_std: float = 0.1
    mixtures: int = 5  # components of the discretized logistic mixture (logistic-mixture only)
    kind: str = "vae"  # vae, or ae: a deterministic autoencoder (the code is mu), trained on reconstruction alone
    prior: str = "standard"  # p(z): standard N(0, I), or flow: a learned invertible map of N(0, I)
    flow_layers: int = 4  # affine coupling layers of the flow prior
    flow_hidden: int = 64  # hidden units of each coupling's network
    # hvae: latent groups as factor:count, coarse to fine (8:2 = two groups at 1/8 of the image's size)
    groups: str = "8:2,4:2,2:1"
    z_channels: int = 8  # hvae: latent channels per group
    width: int = 64  # hvae: channels of the encoder's and the top-down path's state
    # hvae: how many groups, from the top, get a full-covariance Gaussian prior over their
    # standardized latents, fitted to the training images' encodings after training (0: none). Their
    # learned priors are diagonal given the groups above: they cannot draw the spatially correlated
    # layouts the posteriors encode (docs/training.md).
    top_prior: int = 0
    # hvae: the fitted top prior's standard deviations times this. The moment-matched Gaussian draws
    # too close to its mean: wider draws hold together more often, at a cost in likelihood.
    top_prior_scale: float = 1.0
    # A conditional model's classes (`--conditional`: set from the data): the class conditions the
    # prior, the decoder and the posterior (Sohn et al. 2015). 0: unconditional.
    classes: int = 0
    class_dim: int = 16  # the class embedding's size

    @property
    def group_factors(self) -> list[tuple[int, int]]:
        """`groups` parsed, coarse to fine: [(factor, count)]."""
        pairs = [tuple(int(v) for v in part.split(":")) for part in self.groups.split(",")]
        return sorted(pairs, key=lambda p: -p[0])  # type: ignore[return-value]

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """The channels of each stride-2 stage: `widths`, or the default for the image size."""
        if self.widths is not None:
            return self.widths
        size, stages = max(self.image_shape[1:]), 1
        while -(-size // 2**stages) > 4:
            stages += 1
        return tuple(min(32 * 2**i, 256) for i in range(stages))

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(s) for s in self.image_shape)  # type: ignore[assignment]
        self.widths = None if self.widths is None else tuple(int(w) for w in self.widths)
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {self.image_shape}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {self.likelihood!r}")
        if self.mixtures < 1:
            raise ValueError(f"mixtures must be >= 1, got {self.mixtures}")
        if self.latent_dim < 1 or self.widths == ():
            raise ValueError("latent_dim must be >= 1 and widths non-empty")
        if self.kind not in KINDS:
            raise ValueError(f"model must be one of {KINDS}, got {self.kind!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.kind == "hvae":
            try:
                factors = self.group_factors
            except ValueError:
                raise ValueError(f"--groups {self.groups!r}: expected factor:count pairs, e.g. 8:2,4:2,2:1") from None
            if not factors or any(f < 1 or n < 1 for f, n in factors) or len({f for f, _ in factors}) != len(factors):
                raise ValueError(f"--groups {self.groups!r}: each factor once, factors and counts >= 1")
            if self.z_channels < 1 or self.width < 8 or self.prior != "standard":
                raise ValueError("a hierarchical VAE needs --z-channels >= 1, --width >= 8 and its own prior (no --prior flow)")
            if not 0 <= self.top_prior <= (count := sum(n for _, n in factors)):
                raise ValueError(f"--top-prior {self.top_prior}: a number of groups from 0 to the {count} of --groups")
            if not self.top_prior_scale > 0:
                raise ValueError(f"--top-prior-scale {self.top_prior_scale}: a factor above 0")
        elif self.top_prior:
            raise ValueError("--top-prior fits a prior to a hierarchical VAE's top groups: --model hvae")
        if self.classes and (self.classes < 2 or self.class_dim < 1):
            raise ValueError(f"a conditional model needs at least 2 classes and --class-dim >= 1, got {self.classes} and {self.class_dim}")
        if self.classes and (self.kind == "ae" or self.prior != "standard"):
            raise ValueError("--conditional conditions a VAE's N(0, I) prior on the class: --model vae or hvae, no --prior flow")
        if self.kind == "ae" and self.prior != "standard":
            raise ValueError("an autoencoder has no prior to learn: --prior flow needs --model vae")
        if self.prior == "flow" and (self.latent_dim < 2 or self.flow_layers < 1 or self.flow_hidden < 1):
            raise ValueError("the flow prior needs latent_dim >= 2, flow_layers >= 1 and flow_hidden >= 1")


@dataclass
class TrainConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # folders only: the bundled sets have their own test splits
    # A folder's pixels (training.folder): what export writes into model.json as the preprocessing.
    image_size: tuple[int, int] | None = None  # (H, W); None: a folder needs it, the bundled sets have theirs
    channels: int = 3
    fit: str = "crop"  # crop: shorter side resized and centre-cropped; pad: longer side resized, padded
    background: str = "white"  # what transparency is composited onto (white, black, #RRGGBB)
    strict: bool = False  # folders: the first unreadable file fails the run
    cache_dir: str | None = None  # where a folder's decoded pixels are cached (training.folder.default_cache_dir)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.0
    beta: float = 1.0
    warmup_epochs: float = 0.0  # KL weight ramps linearly from 0 to beta over this many epochs
    # nats per latent dimension below which KL is not penalised: 0.1 by default, so that no flags are
    # needed to keep latent units active (with 0, digits under a flow prior collapsed: docs/training.md)
    free_bits: float = 0.1
    reconstruction: str = "pixel"  # pixel | features | both
    feature_weight: float = 1.0
    feature_checkpoint: str | None = None
    dynamic_binarization: bool = True  # only for bernoulli models
    hflip: bool = False  # mirror a random half of each training batch (augmentation; never the test images)
    seed: int = 0
    device: str = "auto"
    # Under torchrun: seconds a collective waits for the other ranks before the run fails (a hung rank)
    dist_timeout: float = 300.0
    iwae_k: int = 1000
    eval_images: int = 1000
    grad_clip: float = 0.0
    # The weights' exponential moving average, used for validation, the best checkpoint, evaluation
    # and export: its decay per step; None: 0.999 for a hierarchical VAE, off (0) otherwise.
    ema: float | None = None
    # A step whose gradient norm is over this many times the run's typical norm (a moving average of
    # log norms, which every step updates, skipped or not) is skipped; None: 10 for a hierarchical
    # VAE, off (0) otherwise.
    skip_factor: float | None = None
    tensorboard: bool = True  # TensorBoard event files in --out (training.board)
    conditional: bool = False  # condition the model on the data's classes (ModelConfig.classes)
    # How training batches draw classes: an image of class c is drawn with weight n_c^-balance, so
    # class c gets a share of the batches proportional to n_c^(1 - balance) (0: as in the data, 1:
    # every class alike). None: 0.5 for a conditional model, 0 otherwise.
    class_balance: float | None = None
    classifier: str | None = None  # features.pt of training.features: sample-quality metrics at the end of a run
    quality_samples: int = 10_000  # samples scored for the Frechet distance and the class statistics
    model: ModelConfig = field(default_factory=ModelConfig)

    @property
    def ema_decay(self) -> float:
        return self.ema if self.ema is not None else (0.999 if self.model.kind == "hvae" else 0.0)

    @property
    def balance(self) -> float:
        if self.class_balance is not None:
            return self.class_balance
        return 0.5 if self.conditional else 0.0

    @property
    def skip_above(self) -> float:
        return self.skip_factor if self.skip_factor is not None else (10.0 if self.model.kind == "hvae" else 0.0)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if self.ema is not None and not 0.0 <= self.ema < 1.0:
            raise ValueError(f"--ema {self.ema}: a decay in [0, 1) (0: no moving average)")
        if self.skip_factor is not None and self.skip_factor != 0 and self.skip_factor <= 1:
            raise ValueError(f"--skip-factor {self.skip_factor}: above 1 (0: no skipping)")
        if self.conditional and (self.model.kind == "ae" or self.model.prior != "standard"):
            raise ValueError("--conditional conditions a VAE's N(0, I) prior on the class: --model vae or hvae, no --prior flow")
        if self.conditional and self.model.top_prior:
            raise ValueError("--top-prior is fitted to every image's encoding alike, not per class: leave it out with --conditional")
        if self.conditional and self.model.class_dim < 1:
            raise ValueError(f"--class-dim {self.model.class_dim}: the class embedding needs at least 1 value")
        if self.class_balance is not None and not 0.0 <= self.class_balance <= 1.0:
            raise ValueError(f"--class-balance {self.class_balance}: a power in [0, 1] (0: classes as in the data, 1: alike)")
        if self.image_size is not None:
            self.image_size = tuple(int(v) for v in self.image_size)  # type: ignore[assignment]
        if self.dataset == "folder" and (not self.data_dir or self.image_size is None):
            raise ValueError("--dataset folder needs --data-dir DIR and --image-size S (or HxW)")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        parse_color(self.background)  # ValueError with the colours it reads
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")
        if not (0 <= self.test_fraction < 1 and 0 <= self.val_fraction < 1 and self.test_fraction + self.val_fraction < 1):
            raise ValueError("val_fraction and test_fraction must lie in [0, 1) and leave images to train on")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {self.reconstruction!r}")
        if self.reconstruction != "pixel" and not self.feature_checkpoint:
            raise ValueError("feature-map reconstruction needs --feature-checkpoint (train one with training.features)")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be a positive number of seconds, got {self.dist_timeout}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}")


def to_dict(config: Any) -> dict[str, Any]:
    return asdict(config)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config, ignoring keys a newer version may have added."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})
