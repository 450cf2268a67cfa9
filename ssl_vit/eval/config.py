"""Config schemas of the evaluation recipes (kNN, linear probe, fine-tune) and their own groups.

The shared groups (`model`, `data`, `train`, `optim`, `supervised`) keep their meaning; the eval
groups below add what only evaluation reads. Defaults are the small built-in-data runs; the papers'
settings live in `recipes/configs/*_imagenet.yaml` (checked against the published values by
tests/recipes/test_paper_configs.py); the small-image ones in `*_cifar10.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ssl_vit.accepts import at_least, each, non_negative, positive, setting

from ssl_vit.config import ConfigError
from ssl_vit.data.config import DataConfig
from ssl_vit.engine.config import OptimConfig, TrainConfig
from ssl_vit.models.config import ModelConfig
from ssl_vit.objectives.supervised import SupervisedConfig

__all__ = [
    "FeaturesConfig",
    "FinetuneEvalConfig",
    "KNNConfig",
    "KNNEvalConfig",
    "LinearProbeEvalConfig",
    "ProbeConfig",
    "translate_seeds_flag",
]


@dataclass
class FeaturesConfig:
    """How frozen features are computed (kNN and the linear probe's fast path)."""

    # "token": the class token (timm's `forward_head(pre_logits=True)` of a class-token backbone;
    # MAE's and DINO's choice). "avg": the mean of the patch tokens after the final norm.
    pool: Literal["token", "avg"] = "token"
    # Images per process per forward pass.
    batch_size: int = setting(256, at_least(1), 'images per feature pass')
    # Features are cached here as safetensors, keyed by checkpoint + data + transform + pooling, so
    # several probes of one checkpoint compute them once. null: no cache.
    cache_dir: Optional[str] = "outputs/feature_cache"
    # Precision of the feature pass; None: as `accelerate launch` was configured ("no" on CPU).
    # In YAML write "no" quoted (a bare no is the boolean false).
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None


@dataclass
class KNNConfig:
    """DINO's weighted kNN (Caron et al. 2021; facebookresearch/dino eval_knn.py)."""

    ks: list[int] = setting([10, 20, 100, 200], each(at_least(1)), 'neighbour counts')
    # The k whose accuracy is the headline `top1` (DINO reports k=20).
    report_k: int = setting(20, at_least(1), 'the k of the headline top-1')
    temperature: float = setting(0.07, positive(), 'kNN vote temperature')
    # Memory is O(query_chunk * train_chunk): bounded however large the training set is.
    query_chunk: int = setting(256, at_least(1))
    train_chunk: int = setting(65536, at_least(1))


@dataclass
class ProbeConfig:
    """The linear probe (MAE protocol: BatchNorm without affine + Linear on frozen features)."""

    # "features": train on cached features, no augmentation (fast, the usual small-scale variant).
    # "augment": the paper's path: augmented images through the frozen backbone (eval mode) each step.
    mode: Literal["features", "augment"] = "features"
    # Base learning rates to sweep (each scaled like optim.blr: lr = blr * batch / 256). Empty: only
    # optim.blr. On cached features all heads train together in one pass; the best is reported.
    lrs: list[float] = setting([], each(positive()), 'base lrs to sweep')


def _probe_optim() -> OptimConfig:
    # MAE linear probe: blr 0.1, no weight decay, 10 warmup epochs (of 90), with LARS at batch 16384.
    # At small batches SGD + momentum: LARS steps are relative to |w| (trust ratio 0.001), so a
    # few thousand small-batch steps barely move a freshly initialised head (tests/eval/test_linear_probe.py).
    return OptimConfig(name="sgd", blr=0.1, weight_decay=0.0, warmup_epochs=10.0, momentum=0.9)


def _probe_train() -> TrainConfig:
    return TrainConfig(epochs=90, batch_size=256)


def _finetune_optim() -> OptimConfig:
    # MAE fine-tune (ViT-B): AdamW blr 5e-4, betas (0.9, 0.999), wd 0.05, layer decay 0.65, 5 warmup epochs.
    return OptimConfig(name="adamw", blr=5e-4, weight_decay=0.05, betas=(0.9, 0.999), warmup_epochs=5.0,
                       min_lr=1e-6, layer_decay=0.65)


@dataclass
class KNNEvalConfig:
    """`recipes/knn.py`."""

    output_dir: str = "outputs/knn"
    # A run's output_dir, a backbone.safetensors, a timm state dict, an imported MAE/DeiT checkpoint,
    # or "random" (a randomly initialised `model.*`: the floor every pretraining must beat).
    checkpoint: str = "random"
    seed: int = setting(0, non_negative())
    # Repeat with these seeds and report mean and std (null: [seed]). `--seeds 0 1 2` works too.
    # kNN itself is deterministic; seeds change the backbone only for checkpoint=random.
    seeds: Optional[list[int]] = setting(None, each(non_negative()))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)


@dataclass
class LinearProbeEvalConfig:
    """`recipes/linear_probe.py`: `train.epochs`, `train.batch_size` (the probe's batch) and `optim.*`."""

    output_dir: str = "outputs/linear_probe"
    checkpoint: str = "random"
    seed: int = setting(0, non_negative())
    seeds: Optional[list[int]] = setting(None, each(non_negative()))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=_probe_train)
    optim: OptimConfig = field(default_factory=_probe_optim)


@dataclass
class FinetuneEvalConfig:
    """`recipes/finetune.py`: the shared engine with the `supervised` objective on a loaded backbone.

    Set `model.global_pool=avg` (+ fc_norm), `model.drop_path_rate`, `optim.layer_decay`,
    `supervised.mixup/cutmix/label_smoothing`, `train.ema`; RandAugment and random erasing come with
    the data pipeline's `supervised` transform.
    """

    output_dir: str = "outputs/finetune"
    checkpoint: str = "random"
    seed: int = setting(0, non_negative())
    seeds: Optional[list[int]] = setting(None, each(non_negative()))
    model: ModelConfig = field(default_factory=lambda: ModelConfig(drop_path_rate=0.1))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, batch_size=64))
    optim: OptimConfig = field(default_factory=_finetune_optim)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)


def translate_seeds_flag(argv: list[str]) -> list[str]:
    """`--seeds 0 1 2` (argparse style) -> `seeds=[0, 1, 2]` (a config override), other args kept."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--seeds" or arg.startswith("--seeds="):
            values = [arg.split("=", 1)[1]] if "=" in arg else []
            i += 1
            while i < len(argv) and not argv[i].startswith("-") and "=" not in argv[i]:
                values.append(argv[i])
                i += 1
            values = [v for chunk in values for v in chunk.replace(",", " ").split()]
            if not values or not all(v.lstrip("-").isdigit() for v in values):
                raise ConfigError(f"--seeds needs integers, e.g. --seeds 0 1 2 (got {values or 'nothing'}).")
            out.append(f"seeds=[{', '.join(values)}]")
            continue
        out.append(arg)
        i += 1
    return out
