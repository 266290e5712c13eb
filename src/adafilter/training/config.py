"""``TrainConfig``: every option of a training run, with the paper's recipe as defaults.

Precedence: dataclass defaults < config file (``--config``, TOML or YAML) < CLI flags. The
effective configuration is saved with every run (``config.json``, ``summary.json`` and the
checkpoint).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import AdaFilterError
from ..tuner.config import AdaFilterConfig

AMP_MODES = ("off", "bf16", "fp16")

# Named option sets (``--preset``): applied over the defaults, under a config file and flags.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's published settings (Implementation Details): SGD, momentum 0.9, lr 0.01
    # (network) / 0.1 (gate), batch 64, 110 epochs, x0.1 after 30/60/90; the policy heads'
    # bias is not published: 0 (PyTorch initialises biases around 0); no BN recalibration.
    "paper": {
        "epochs": 110,
        "batch_size": 64,
        "lr": 0.01,
        "gate_lr": 0.1,
        "momentum": 0.9,
        "milestones": [30, 60, 90],
        "gate_optimizer": "sgd",
        "precise_bn": 0,
        "adafilter": {
            "gate_bias_init": 0.0,
            "ste": "identity",
            "gate_noise": 0.0,
            "policy_cost": 0.0,
        },
    },
}
GATE_OPTIMIZERS = ("sgd", "adam")


@dataclass
class TrainConfig:
    """A training run (defaults: the paper's Implementation Details).

    Attributes:
        method: A name in :data:`adafilter.methods.METHODS`.
        dataset: A name in :data:`adafilter.data.DATASETS`.
        data_root: The dataset's directory.
        backbone: A name in :data:`adafilter.backbones.BACKBONES`.
        out: Output directory of the run.
        weights: Backbone weights: ``None`` (random init), ``"pretrained"`` or a file.
        epochs: Total epochs (paper: 110).
        batch_size: Global batch size, split across DDP ranks (paper: 64).
        resolution: Input size; ``None`` uses the backbone's default.
        seed: Seeds model init, shuffling (per epoch) and random policies.
        lr: Network learning rate (paper: 0.01).
        gate_lr: Gate learning rate: 0.01 with the default Adam gate optimizer (the paper: 0.1
            with SGD, ``--preset paper``); unused by methods without a trained gate.
        momentum: SGD momentum for both groups (paper: 0.9).
        weight_decay: L2 weight decay of SGD. The paper does not state it; 5e-4 is our default.
            L2-SP sets it to 0 for the parameters its penalty covers.
        milestones: Epochs after which both learning rates are multiplied by ``gamma``
            (paper: 30, 60, 90): epoch 31 runs at 0.1x, epoch 61 at 0.01x, epoch 91 at 0.001x.
        gamma: Decay factor (0.1).
        workers: DataLoader worker processes per rank.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: ``"off"``, ``"bf16"`` or ``"fp16"`` autocast on CUDA (fp16 adds a GradScaler);
            ignored with a warning on CPU.
        channels_last: Use the channels-last memory format for model and inputs.
        cuda_graphs: Capture the training step's forward and backward as a CUDA graph and
            replay it (single process, CUDA only; ignored with a warning otherwise); speed
            figures: the README's speed table.
        compile: Train through ``torch.compile(model)`` (timm's ``--torchcompile``); an
            AdaFilter model then runs its capturable path (no host reads), which
            ``torch.compile`` captures whole. Evaluation stays eager. Takes precedence over
            ``cuda_graphs``.
        compile_backend: The ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` traces
            without generating code, for tests).
        augment: Training augmentation: ``"resized-crop"`` (RandomResizedCrop + flip, the
            ImageNet recipe; the paper states none), ``"random-crop"`` (resize to R*256/224,
            random R crop + flip: the fine-grained transfer recipe), ``"pad-crop"`` (the whole
            image, padded
            random crop + flip: the CIFAR recipe, for small images such as 28-32 px, where
            RandomResizedCrop's 8% crops erase the object) or ``"none"``. Evaluation uses
            the matching centre crop (``data.transforms``).
        subset_per_class: Keep at most this many images per class in both splits (quick runs).
        train_per_class: Keep at most this many training images per class (the evaluation
            split stays whole): few-shot regimes such as Caltech-256-30.
        gate_backbone: Feature extractor of the ``cnn-gate`` method.
        gate_weights: Its weights (``None``, ``"pretrained"`` or a file).
        l2sp_alpha: L2-SP weight of ``||w - w0||^2`` over the pretrained parameters.
        l2sp_beta: L2-SP weight of ``||w||^2`` over the new head.
        random_p: Probability of the fine-tuned filter for ``random-policy``.
        adafilter: Overrides of :class:`adafilter.AdaFilterConfig` fields (e.g. ``embed_dim``).
        precise_bn: Before every evaluation (and so before the final checkpoint), recompute
            every BN's running statistics exactly over this many training batches (training
            images through the evaluation transform, train mode, no gradients; each gated BN
            branch from the examples routed to it). 0 turns it off.
        choose_bn_stats: At every evaluation, score the validation split with the running
            BN statistics and with precise BN's, and keep whichever scores higher (ties: precise
            BN); the metrics record the choice. Needs ``precise_bn > 0`` and
            ``val_fraction > 0``. Where the target is close to the pretraining data the running
            statistics (still partly the pretrained network's) were worth up to 15 points; where
            it is not, precise BN was (docs/studies.md, Imagewoof).
        bn_momentum: Override the backbone's BN momentum for fine-tuning (``None`` keeps it:
            0.1 for torchvision ResNets, as the paper's ResNet-50; 0.01 for TF-ported
            EfficientNets such as Lite0).
        eval_every: Evaluate after epoch 1, every N epochs and the final epoch.
        checkpoint_every: Also write the checkpoint every N optimizer steps inside an epoch
            (0: only at epoch ends), for epochs longer than a scheduler's notice; a run resumed
            from such a checkpoint continues exactly as the uninterrupted run.
        val_fraction: Hold out this share of each class's training images as a validation
            split (stratified, seeded), evaluated beside the test split; 0 turns it off.
        gate_optimizer: ``"adam"`` (default) or ``"sgd"`` (the paper: SGD with momentum at
            ``gate_lr``) for the gate's parameters; the network always trains with SGD. Why
            Adam is the default: the README's gate diagnosis.
        download: Fetch missing data and pretrained weights from their public sources into
            the cache directory (``$ADAFILTER_HOME``, default ``~/.cache/adafilter``).
        quiet: Print nothing but warnings and errors.
        tensorboard: Also write TensorBoard event files to ``<out>/tensorboard`` (losses,
            accuracies, learning rates, each gated layer's share of fine-tuned filters and the
            gate's decision-change rate per epoch); needs ``pip install
            'adafilter[tensorboard]'``.
        resume: Continue from ``<out>/checkpoint.pt`` if it exists.
    """

    method: str = "adafilter"
    dataset: str = ""
    data_root: str = ""
    backbone: str = "resnet50"
    out: str = ""
    weights: str | None = None
    epochs: int = 110
    batch_size: int = 64
    resolution: int | None = None
    seed: int = 0
    lr: float = 0.01
    gate_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [30, 60, 90])
    gamma: float = 0.1
    workers: int = 4
    device: str = "auto"
    amp: str = "off"
    channels_last: bool = False
    cuda_graphs: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    augment: str = "resized-crop"
    subset_per_class: int | None = None
    train_per_class: int | None = None
    gate_backbone: str = "resnet18"
    gate_weights: str | None = None
    l2sp_alpha: float = 0.01
    l2sp_beta: float = 0.01
    random_p: float = AdaFilterConfig.random_p  # defined once, in AdaFilterConfig
    adafilter: dict[str, Any] = field(default_factory=dict)
    precise_bn: int = 16
    choose_bn_stats: bool = False
    bn_momentum: float | None = None
    eval_every: int = 1
    checkpoint_every: int = 0
    val_fraction: float = 0.0
    gate_optimizer: str = "adam"
    download: bool = False
    quiet: bool = False
    tensorboard: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.milestones, str):
            self.milestones = parse_int_list(self.milestones, "milestones")
        self.milestones = sorted(int(m) for m in self.milestones)
        if self.precise_bn < 0:
            raise AdaFilterError(f"precise_bn must be >= 0 batches, got {self.precise_bn!r}")
        if self.choose_bn_stats and (self.precise_bn <= 0 or self.val_fraction <= 0):
            raise AdaFilterError(
                "choose_bn_stats compares running and precise BN statistics on validation: "
                f"it needs precise_bn > 0 and val_fraction > 0 (got {self.precise_bn!r} and "
                f"{self.val_fraction!r})"
            )
        if self.bn_momentum is not None and not 0.0 < self.bn_momentum <= 1.0:
            raise AdaFilterError(f"bn_momentum must be in (0, 1], got {self.bn_momentum!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise AdaFilterError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        from ..data.transforms import AUGMENTATIONS

        if self.augment not in AUGMENTATIONS:
            raise AdaFilterError(
                f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}"
            )
        if self.gate_optimizer not in GATE_OPTIMIZERS:
            raise AdaFilterError(
                f"gate_optimizer must be one of {', '.join(GATE_OPTIMIZERS)}, "
                f"got {self.gate_optimizer!r}"
            )
        for name in ("epochs", "batch_size", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise AdaFilterError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.checkpoint_every < 0:
            raise AdaFilterError(
                f"checkpoint_every must be >= 0 steps (0 = off), got {self.checkpoint_every!r}"
            )
        if self.workers < 0:
            raise AdaFilterError(f"workers must be >= 0, got {self.workers!r}")
        if self.resolution is not None and int(self.resolution) < 8:
            raise AdaFilterError(f"resolution must be >= 8, got {self.resolution!r}")
        if self.amp not in AMP_MODES:
            raise AdaFilterError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if any(m < 1 for m in self.milestones):
            raise AdaFilterError(f"milestones must be positive epochs, got {self.milestones}")
        if not 0.0 <= self.random_p <= 1.0:
            raise AdaFilterError(f"random_p must be in [0, 1], got {self.random_p!r}")
        for name in ("lr", "gate_lr", "weight_decay", "l2sp_alpha", "l2sp_beta"):
            if float(getattr(self, name)) < 0:
                raise AdaFilterError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "configuration") -> TrainConfig:
        """Build from a mapping, rejecting unknown keys (dashes are read as underscores)."""
        return cls(**_normalise_keys(values, source))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def _normalise_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    known = {f.name for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        k = str(key).replace("-", "_")
        if k not in known:
            raise AdaFilterError(
                f"unknown option {key!r} in {source}; valid options: {', '.join(sorted(known))}"
            )
        out[k] = value
    return out


def parse_int_list(text: str, name: str) -> list[int]:
    """Parse ``"30,60,90"`` (empty string: no milestones)."""
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise AdaFilterError(
            f"{name} must be comma-separated integers like 30,60,90, got {text!r}"
        ) from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file of :class:`TrainConfig` keys.

    Args:
        path: The file. A ``[train]`` table, if present, is used instead of the top level.

    Returns:
        The options with keys normalised to field names.

    Raises:
        AdaFilterError: Missing or unparsable file, unknown key.
    """
    path = Path(path)
    if not path.is_file():
        raise AdaFilterError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise AdaFilterError(f"config file {str(path)!r} must end in .toml, .yaml or .yml")
    except AdaFilterError:
        raise
    except Exception as e:
        msg = " ".join(str(e).split())
        raise AdaFilterError(f"cannot parse config file {str(path)!r}: {msg}") from None
    if not isinstance(data, dict):
        raise AdaFilterError(f"config file {str(path)!r} must hold a mapping of options")
    if isinstance(data.get("train"), dict):
        data = data["train"]
    return _normalise_keys(data, f"config file {str(path)!r}")
