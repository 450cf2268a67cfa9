"""The benchmarked steps: ours (the library as training runs it) and references of the same size.

"Ours" is the engine's own training step: a `Trainer` built on the objective (Accelerate, the engine's
parameter groups and fused AdamW), timed through `Trainer._train_batch`, the code `fit()` runs per batch:
the objective's hooks, forward, backward, lr / weight-decay update, gradient-norm clipping, the
non-finite check and the optimizer step. The references are plain loops as their libraries document
them, with the same optimizer implementation as ours (fused or foreach AdamW, whichever ours has):

- backbone: forward + backward of our ViT vs `timm.create_model` of the same config (no optimizer);
- supervised: our `supervised` objective vs `timm.create_model` (same architecture and weights,
  `backbone.timm_spec()`) + cross-entropy with the same smoothing + AdamW;
- mae: our `mae` objective vs `transformers.ViTMAEForPreTraining` of the same size (never downloaded),
  with the same weights (HF's, converted by `ssl_vit.interop.mae_weights`), mask ratio and norm-pix loss;
- deit: our `deit` objective (hard distillation) vs timm's distilled ViT + the same loss, same teacher;
- dino: our `dino` objective vs lightly's DINO loop (timm ViT + `DINOProjectionHead` + `DINOLoss`, a
  momentum teacher, the last layer's gradients cancelled in the first epoch), the same weights and views;
- mocov3: our `mocov3` objective vs a MoCo v3 loop built from lightly's parts (timm ViT + `MoCoProjectionHead`
  projector / predictor with BN, `update_momentum`, `cosine_schedule`) and the paper's Algorithm 1 loss;
- simmim: our `simmim` objective vs lightly's SimMIM loop (its examples' model on `MaskedVisionTransformerTIMM`
  wrapping a timm ViT, a linear decoder, L1 on the masked patches), the same weights and masks;
- ijepa: our `ijepa` objective alone (no comparable reference loop), for its images/s next to MAE's on the
  same backbone and batch (the "ijepa/ours / mae/ours" cross ratio);
- eval: feature extraction (`ssl_vit.eval.features.pool_features` in inference mode) vs timm inference.

Every case can compute its loss on a fixed batch (`Case.loss`): ours and its reference give the same
loss from the same weights, which tests/bench checks. Linear-path twins (`WorkloadConfig.twins`): where
ours computes its linear layers through oneDNN (`ssl_vit.ops.linear`), the references are also timed on
that path (`mae/hf+onednn`) and ours without it (`mae/ours-plain`), so every headline ratio has a
like-for-like twin. Every step runs on a fixed random batch already on the device: this measures the
model and the optimizer, not the data pipeline (`tools/benchmark.py data` measures that).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset

from ssl_vit.bench.timing import Case
from ssl_vit.ops import linear as linear_ops
from ssl_vit.ops.linear import OneDNNLinear, plain_linears

__all__ = [
    "TRAIN_BUILDERS",
    "BenchEnv",
    "WorkloadConfig",
    "backbone_cases",
    "deit_cases",
    "dino_cases",
    "engine_trainer",
    "eval_cases",
    "force_linears",
    "grad_checkpointing_cases",
    "hf_mae_config",
    "ijepa_cases",
    "linear_path",
    "mae_cases",
    "mocov3_cases",
    "scaling_cases",
    "simmim_cases",
    "supervised_cases",
    "train_cases",
]

LABEL_SMOOTHING = 0.1  # the supervised / deit objectives' default, applied to the references too
TWINS = ("auto", "always", "never")


@dataclass
class BenchEnv:
    """Where and in what precision the steps run; `autocast()` is Accelerate's (a no-op for "no")."""

    device: torch.device
    precision: str = "no"
    autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext

    @classmethod
    def create(cls, device: str = "auto", precision: str = "no") -> "BenchEnv":
        """Accelerate picks the device (CUDA when present, unless device='cpu') and the autocast."""
        from accelerate import Accelerator

        if precision not in ("no", "bf16"):
            raise ValueError(f"--precision must be 'no' or 'bf16', got {precision!r} (fp16 needs a loss scaler).")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu or auto.")
        acc = Accelerator(mixed_precision=precision, cpu=device == "cpu")
        return cls(device=acc.device, precision=precision, autocast=acc.autocast)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


@dataclass
class WorkloadConfig:
    """Sizes of the benchmarked steps. Decoder sizes default by image size: 128 x 4 blocks x 4 heads for
    32-64 px (the issue's ViTMAE comparison), the paper's 512 x 8 x 16 above."""

    model: str = "vit_tiny_patch4_32"
    batch_size: int = 64
    eval_batch_size: int = 256
    num_classes: int | None = None  # None: 10 for <= 64 px images, 1000 above
    mask_ratio: float = 0.75
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    seed: int = 0
    teacher: str = "resnet18"  # a timm architecture, randomly initialised, frozen
    onednn_objective: bool = False  # also route the objective's own linears (decoder, ...) through oneDNN
    # Linear-path twins: "auto" (where ours computes with oneDNN: the references on that path too and ours
    # without it), "always" (also where ours is plain: both sides forced onto oneDNN), "never".
    twins: str = "auto"
    dino_out_dim: int | None = None  # None: 4096 for <= 64 px images (the CIFAR config), else 65536
    dino_hidden_dim: int = 2048  # DINO head's MLP (the paper's)
    dino_bottleneck_dim: int = 256
    local_crops: int = 8  # DINO's local views per image (paper: 8), each default_local_crop_size
    moco_hidden_dim: int = 4096  # MoCo v3 projector / predictor hidden width (the paper's)
    moco_out_dim: int = 256  # MoCo v3 projector / predictor output width (the paper's)
    predictor_dim: int | None = None  # I-JEPA predictor width; None: half the backbone's (`_predictor`)
    predictor_depth: int | None = None  # I-JEPA predictor blocks; None: 2 for <= 64 px images, else 6
    overrides: dict[str, Any] = field(default_factory=dict)  # extra create_backbone kwargs (img_size, ...)

    def __post_init__(self) -> None:
        if self.twins not in TWINS:
            raise ValueError(f"twins must be one of {', '.join(TWINS)}, got {self.twins!r}.")


def _img_size(cfg: WorkloadConfig) -> int:
    from ssl_vit.models import create_backbone

    with torch.device("meta"):  # shapes only: nothing is allocated
        return int(create_backbone(cfg.model, **cfg.overrides).patch_embed.img_size[0])


def _classes(cfg: WorkloadConfig) -> int:
    return cfg.num_classes if cfg.num_classes is not None else (10 if _img_size(cfg) <= 64 else 1000)


def _decoder(cfg: WorkloadConfig, img_size: int) -> dict[str, int]:
    small = img_size <= 64
    return {
        "decoder_dim": cfg.decoder_dim or (128 if small else 512),
        "decoder_depth": cfg.decoder_depth or (4 if small else 8),
        "decoder_heads": cfg.decoder_heads or (4 if small else 16),
    }


def _predictor(cfg: WorkloadConfig, backbone: nn.Module, img_size: int) -> dict[str, int]:
    """I-JEPA's predictor for the benchmark, narrow and shallow like MAE's decoder (`_decoder`).

    Width: half the backbone's (the paper's ViT-H/14 predictor is 384 of 1280), rounded down to a multiple
    of 4 (sin-cos positions) and of the backbone's heads, which the predictor keeps (the official default).
    Depth: 2 blocks for <= 64 px images, 6 above (MAE's decoder: 4 and 8; the paper's ViT-H: 12).
    """
    import math

    heads = backbone.blocks[0].attn.num_heads
    unit = math.lcm(4, heads)
    dim = cfg.predictor_dim or max(unit, backbone.embed_dim // 2 // unit * unit)
    return {"predictor_dim": dim, "predictor_depth": cfg.predictor_depth or (2 if img_size <= 64 else 6)}


def _random_views(env: BenchEnv, batch: int, n: int, size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """`n` random views of a batch: n x (B, 3, size, size), on the device."""
    return [torch.randn(batch, 3, size, size, generator=gen).to(env.device) for _ in range(n)]


def _batch(env: BenchEnv, batch: int, img_size: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, img_size, img_size, generator=gen).to(env.device)  # (B, 3, H, W)
    labels = torch.randint(0, max(classes, 1), (batch,), generator=gen).to(env.device)  # (B,)
    return images, labels


# ---------------------------------------------------------------------------------------------------
# Linear paths


def _onednn_possible(env: BenchEnv) -> bool:
    """oneDNN's linear path computes only fp32 CPU tensors, in a torch built with it, when not forced off."""
    return (
        env.device.type == "cpu"
        and env.precision == "no"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and linear_ops._forced() is not False
    )


def linear_path(module: nn.Module, env: BenchEnv) -> str:
    """The path `module`'s trainable linear layers compute with in `env`: "plain", "onednn" or "mixed"."""
    if not _onednn_possible(env):
        return "plain"
    trainable = [m for m in module.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    onednn = sum(type(m) is OneDNNLinear for m in trainable)
    return "plain" if onednn == 0 else "onednn" if onednn == len(trainable) else "mixed"


def force_linears(module: nn.Module, path: str) -> nn.Module:
    """Every linear layer of `module` onto `path` ("plain": `nn.Linear`, "onednn": `OneDNNLinear`), in place."""
    if path == "plain":
        return plain_linears(module)
    if path != "onednn":
        raise ValueError(f"path must be 'plain' or 'onednn', got {path!r}.")
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear  # same parameters and keys: ssl_vit.ops.linear's own conversion
    return module


def _twin_variants(path: str, cfg: WorkloadConfig, env: BenchEnv) -> tuple[list[str], list[str]]:
    """(ours' twins, the reference's twins): forced linear paths that make every ratio like-for-like."""
    if cfg.twins == "never" or not _onednn_possible(env):
        return [], []
    ours = (["plain"] if path != "plain" else []) + (["onednn"] if path == "mixed" or (path == "plain" and cfg.twins == "always") else [])
    refs = ["onednn"] if path != "plain" or cfg.twins == "always" else []
    return ours, refs


def _variant_name(group: str, impl: str, variant: str) -> str:
    return f"{group}/{impl}" + {"": "", "plain": "-plain", "onednn": "+onednn"}[variant]


# ---------------------------------------------------------------------------------------------------
# Ours: the engine's training step


class _Samples(Dataset):
    """The samples of one (CPU) batch: what the trainer's loader holds (its batch size, `_fixed_batch`)."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = tree_map(lambda t: t.cpu() if torch.is_tensor(t) else t, batch)
        self.size = next(t for t in torch.utils._pytree.tree_leaves(self.batch) if torch.is_tensor(t)).shape[0]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Any:
        return tree_map(lambda t: t[i] if torch.is_tensor(t) else t, self.batch)


def engine_trainer(
    objective: nn.Module, batch: dict[str, Any], env: BenchEnv, cfg: WorkloadConfig, *, grad_checkpointing: bool = False
) -> Any:
    """A `Trainer` on `objective` as a training run builds it, ready for `_train_batch(batch)`.

    Its config is the engine's defaults with lr `cfg.lr`, weight decay `cfg.weight_decay`, no warm-up,
    no trackers or checkpoints, and a schedule long enough never to end; its output folder is a
    temporary one, removed with the trainer.
    """
    from ssl_vit.config import PretrainConfig
    from ssl_vit.engine import Trainer

    out = tempfile.mkdtemp(prefix="ssl_vit_bench_")
    run = PretrainConfig(output_dir=out, seed=cfg.seed)
    samples = _Samples(batch)
    run.train = dataclasses.replace(
        run.train, epochs=10**6, batch_size=len(samples), mixed_precision=env.precision, report_to=[],
        save_every=0, resume="never", log_every=10**9, eval_every=0, vis_every=0, grad_checkpointing=grad_checkpointing,
    )
    run.optim = dataclasses.replace(run.optim, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_epochs=0.0)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")  # "log_with=[]: no trackers installed"
        trainer = Trainer(run, objective, DataLoader(samples, batch_size=len(samples)))
        trainer._begin()  # the session state `fit()` starts with (the progress bar goes to the void)
    weakref.finalize(trainer, shutil.rmtree, out, True)
    if trainer.accelerator.device != env.device:
        raise RuntimeError(
            f"the trainer runs on {trainer.accelerator.device}, the benchmark on {env.device}: with --device cpu on a "
            f"GPU machine set ACCELERATE_USE_CPU=1 too."
        )
    return trainer


def _no_grad_loss(fn: Callable[[], torch.Tensor], *modules: nn.Module, eval_mode: bool = False) -> Callable[[], torch.Tensor]:
    """`fn()` without gradients (optionally in eval mode, the modules' modes restored): a case's `loss`."""

    def loss() -> torch.Tensor:
        modes = [m.training for m in modules]
        if eval_mode:
            for m in modules:
                m.eval()
        try:
            with torch.no_grad():
                return fn().detach().float()
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    return loss


def _ours_cases(
    group: str, objective: nn.Module, batch: dict[str, Any], check_batch: dict[str, Any], env: BenchEnv,
    cfg: WorkloadConfig, images: int, info: dict[str, Any], *, eval_check: bool = False,
) -> tuple[list[Case], torch.optim.Optimizer, str]:
    """Ours (and its linear-path twins): each a Trainer's `_train_batch` on its own copy of the objective.

    Returns (cases, the default case's optimizer, its linear path).
    """
    objective = objective.to(env.device)
    path = linear_path(objective, env)
    twins, _ = _twin_variants(path, cfg, env)
    copies = {"": objective, **{v: force_linears(copy.deepcopy(objective), v) for v in twins}}  # before any step
    cases, optimizer = [], None
    for variant, module in copies.items():
        trainer = engine_trainer(module, batch, env, cfg)
        optimizer = optimizer or trainer.optimizer.optimizer

        def step(t: Any = trainer) -> None:
            t._train_batch(batch)

        params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        lin = linear_path(module, env)
        cases.append(Case(
            _variant_name(group, "ours", variant), group, "ours", step, images,
            info={**info, "trainable_params": params, "linear": lin, "impl": info.get("impl", "ssl_vit") + " + Trainer"},
            track=(trainer.unwrapped, trainer.optimizer.optimizer), linear=lin, variant=variant,
            loss=_no_grad_loss(lambda t=trainer: t.model(check_batch)["loss"], module, eval_mode=eval_check),
        ))
    return cases, optimizer, path


# ---------------------------------------------------------------------------------------------------
# References


def _matching_adamw(params: Any, cfg: WorkloadConfig, like: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """torch's AdamW for a reference loop, one group, the same implementation (fused / foreach) as `like`."""
    fused = bool(like.defaults.get("fused"))
    return torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(like.defaults["betas"]), eps=like.defaults["eps"],
        fused=fused or None, foreach=None if fused else like.defaults.get("foreach"),
    )


def _optimizer_impl(optimizer: torch.optim.Optimizer) -> str:
    return "fused" if optimizer.defaults.get("fused") else "foreach" if optimizer.defaults.get("foreach") else "default"


def _ref_variants(path: str, cfg: WorkloadConfig, env: BenchEnv) -> list[str]:
    return [""] + _twin_variants(path, cfg, env)[1]


def _variant_cases(
    group: str, impl: str, role: str, module: nn.Module,
    make: Callable[[nn.Module], tuple[Callable[[], Any], Callable[[], torch.Tensor], tuple[Any, ...]]],
    variants: list[str], env: BenchEnv, images: int, info: dict[str, Any], rebuild: Callable[[], nn.Module] | None = None,
) -> list[Case]:
    """`module` as it is (variant "") and on each forced linear path of `variants`, each made into a Case by
    `make(module)` -> (step, loss on the check batch, track). A twin is `rebuild()` (default: a deep copy of
    `module`; all are taken before any step) with its linear layers forced onto the path."""
    rebuild = rebuild or (lambda: copy.deepcopy(module))
    copies = {v: module if v == "" else force_linears(rebuild(), v) for v in variants}
    cases = []
    for variant, m in copies.items():
        step, loss, track = make(m)
        lin = linear_path(m, env)
        params = sum(p.numel() for p in m.parameters() if p.requires_grad)
        cases.append(Case(
            _variant_name(group, impl, variant), group, role, step, images,
            info={**info, "trainable_params": params, "linear": lin}, track=track, linear=lin, variant=variant, loss=loss,
        ))
    return cases


def _reference_cases(
    group: str, impl: str, reference: nn.Module, make: Callable[[nn.Module], tuple[Any, Any, tuple[Any, ...]]],
    path: str, env: BenchEnv, cfg: WorkloadConfig, images: int, info: dict[str, Any],
    rebuild: Callable[[], nn.Module] | None = None,
) -> list[Case]:
    """The reference (and its twin on ours' linear path, when ours has one)."""
    return _variant_cases(group, impl, "reference", reference, make, _ref_variants(path, cfg, env), env, images, info, rebuild)


def _optimized_step(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, env: BenchEnv) -> Callable[[], None]:
    """A plain loop's step: forward (autocast), backward, optimizer step, zero_grad."""

    def step() -> None:
        with env.autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _maybe_onednn(module: nn.Module, cfg: WorkloadConfig) -> nn.Module:
    if cfg.onednn_objective:
        from ssl_vit.ops.linear import use_onednn_linears

        use_onednn_linears(module)
    return module


def _match_trainable(ref: nn.Module, ours: nn.Module) -> nn.Module:
    """Freeze the parameters of `ref` that are frozen (or buffers) in `ours` under the same name (fixed
    sin-cos positions, MoCo v3's random patch projection): the same trainable set on both sides."""
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    for name, p in ref.named_parameters():
        p.requires_grad_(name in trainable)
    return ref


def _timm_twin(backbone: nn.Module) -> tuple[nn.Module, str, dict[str, Any]]:
    """timm's own model of the backbone's architecture, with its weights."""
    import timm

    timm_name, kwargs = backbone.timm_spec()
    ref = timm.create_model(timm_name, pretrained=False, **kwargs)
    ref.load_state_dict(backbone.state_dict())
    return ref, timm_name, kwargs


# ---------------------------------------------------------------------------------------------------
# Training steps


def supervised_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Our supervised objective vs timm's model + cross-entropy + AdamW (same weights at start)."""
    from ssl_vit.models import create_backbone
    from ssl_vit.objectives import build_objective

    torch.manual_seed(cfg.seed)
    classes = _classes(cfg)
    backbone = create_backbone(cfg.model, num_classes=classes, **cfg.overrides)
    ours = _maybe_onednn(build_objective("supervised", backbone, label_smoothing=LABEL_SMOOTHING), cfg)
    images, labels = _batch(env, cfg.batch_size, _img_size(cfg), classes, cfg.seed)
    batch = {"pixel_values": images, "labels": labels}
    info = {"model": cfg.model, "num_classes": classes, "batch_size": cfg.batch_size}
    ref = _timm_twin(backbone) if reference else None  # copied before any step
    cases, optimizer, path = _ours_cases(
        "supervised", ours, batch, batch, env, cfg, cfg.batch_size, {**info, "impl": "ssl_vit supervised objective"}
    )
    if ref is not None:
        model, timm_name, kwargs = ref

        def make(m: nn.Module) -> tuple[Any, Any, tuple[Any, ...]]:
            m.to(env.device).train()
            opt = _matching_adamw(m.parameters(), cfg, optimizer)

            def loss_fn() -> torch.Tensor:
                return F.cross_entropy(m(images), labels, label_smoothing=LABEL_SMOOTHING)

            return _optimized_step(loss_fn, opt, env), _no_grad_loss(loss_fn, m), (m, opt)

        impl = f"timm.create_model({timm_name!r}, {kwargs}) + CE + AdamW ({_optimizer_impl(optimizer)})"
        cases += _reference_cases("supervised", "timm", model, make, path, env, cfg, cfg.batch_size, {**info, "impl": impl})
    return cases


def backbone_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Forward + backward of the bare backbone vs `timm.create_model` of the same config (no loss, no optimizer).

    The same weights, the same batch, logits.mean().backward().
    """
    from ssl_vit.models import create_backbone

    torch.manual_seed(cfg.seed)
    classes = _classes(cfg)
    backbone = create_backbone(cfg.model, num_classes=classes, **cfg.overrides)
    images, _ = _batch(env, cfg.batch_size, _img_size(cfg), classes, cfg.seed)
    info = {"model": cfg.model, "num_classes": classes, "batch_size": cfg.batch_size}
    path = linear_path(backbone, env)

    def make(m: nn.Module) -> tuple[Any, Any, tuple[Any, ...]]:
        m.to(env.device).train()

        def step() -> None:
            with env.autocast():
                out = m(images)  # (B, C)
            out.float().mean().backward()
            m.zero_grad(set_to_none=True)

        return step, _no_grad_loss(lambda: m(images).float().mean(), m), (m,)

    ref = _timm_twin(backbone) if reference else None
    ours_twins, _ = _twin_variants(path, cfg, env)
    cases = _variant_cases("backbone", "ours", "ours", backbone, make, ["", *ours_twins], env, cfg.batch_size,
                           {**info, "impl": "ssl_vit ViT"})
    if ref is not None:
        model, timm_name, kwargs = ref
        cases += _reference_cases("backbone", "timm", model, make, path, env, cfg, cfg.batch_size,
                                  {**info, "impl": f"timm.create_model({timm_name!r}, {kwargs})"})
    return cases


def hf_mae_config(backbone: nn.Module, mask_ratio: float, decoder: dict[str, int]) -> Any:
    """A `transformers.ViTMAEConfig` with our backbone's and decoder's sizes (norm-pix loss, eps 1e-6)."""
    from transformers import ViTMAEConfig

    block = backbone.blocks[0]
    return ViTMAEConfig(
        hidden_size=backbone.embed_dim,
        num_hidden_layers=len(backbone.blocks),
        num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features,
        decoder_hidden_size=decoder["decoder_dim"],
        decoder_num_hidden_layers=decoder["decoder_depth"],
        decoder_num_attention_heads=decoder["decoder_heads"],
        decoder_intermediate_size=4 * decoder["decoder_dim"],
        image_size=backbone.patch_embed.img_size[0],
        patch_size=backbone.patch_embed.patch_size[0],
        mask_ratio=mask_ratio,
        norm_pix_loss=True,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        attn_implementation="sdpa",
    )


def _mae(
    cfg: WorkloadConfig,
    mask_ratio: float,
    overrides: dict[str, Any],
    decoder: dict[str, int] | None = None,
) -> tuple[nn.Module, dict[str, int], int]:
    from ssl_vit.models import create_backbone
    from ssl_vit.objectives import build_objective

    backbone = create_backbone(cfg.model, num_classes=0, pos_embed="sincos", **overrides)
    img = backbone.patch_embed.img_size[0]
    decoder = decoder or _decoder(cfg, img)
    mae = build_objective("mae", backbone, mask_ratio=mask_ratio, norm_pix_loss=True, **decoder)
    return _maybe_onednn(mae, cfg), decoder, img


def mae_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Our MAE objective vs Hugging Face's ViTMAEForPreTraining of the same size, with the same weights."""
    torch.manual_seed(cfg.seed)
    ours, decoder, img = _mae(cfg, cfg.mask_ratio, cfg.overrides)
    images, _ = _batch(env, cfg.batch_size, img, 1, cfg.seed)
    batch = {"pixel_values": images}  # fresh masks every step, as in training (both sides)
    noise = torch.rand(cfg.batch_size, ours.num_patches, generator=torch.Generator().manual_seed(cfg.seed + 1))
    check = {"pixel_values": images, "noise": noise.to(env.device)}  # one mask for the loss check
    info = {"model": cfg.model, "mask_ratio": cfg.mask_ratio, "batch_size": cfg.batch_size, **decoder}
    hf = None
    if reference:
        from transformers import ViTMAEForPreTraining

        from ssl_vit.interop.mae_weights import hf_vitmae_to_ours

        hf = ViTMAEForPreTraining(hf_mae_config(ours.backbone, cfg.mask_ratio, decoder))
        backbone_sd, decoder_sd = hf_vitmae_to_ours(hf.state_dict())  # the same weights on both sides
        ours.load_state_dict({**{f"backbone.{k}": v for k, v in backbone_sd.items()}, **decoder_sd})
    cases, optimizer, path = _ours_cases("mae", ours, batch, check, env, cfg, cfg.batch_size, {**info, "impl": "ssl_vit mae objective"})
    if hf is not None:

        def make(m: nn.Module) -> tuple[Any, Any, tuple[Any, ...]]:
            m.to(env.device).train()
            opt = _matching_adamw(m.parameters(), cfg, optimizer)
            step = _optimized_step(lambda: m(pixel_values=images).loss, opt, env)
            return step, _no_grad_loss(lambda: m(pixel_values=images, noise=check["noise"]).loss, m), (m, opt)

        impl = f"transformers.ViTMAEForPreTraining ({hf.config._attn_implementation}) + AdamW ({_optimizer_impl(optimizer)})"
        cases += _reference_cases("mae", "hf", hf, make, path, env, cfg, cfg.batch_size, {**info, "impl": impl})
    return cases


def _distilled_name(model: str) -> str | None:
    """deit_<size>_distilled_<rest> for vit_<size>_<rest>, when the registry knows it."""
    from ssl_vit.models import list_backbones

    if "distilled" in model:
        return model
    _, size, rest = model.split("_", 2)
    name = f"deit_{size}_distilled_{rest}"
    return name if name in list_backbones() else None


def deit_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Our deit objective (hard distillation) vs timm's distilled ViT + the same loss, the same frozen teacher."""
    import timm

    from ssl_vit.models import create_backbone
    from ssl_vit.objectives import build_objective

    name = _distilled_name(cfg.model)
    if name is None:
        raise ValueError(
            f"no distilled backbone for {cfg.model}: benchmark deit with a size that has one (tiny, small, base)."
        )
    torch.manual_seed(cfg.seed)
    classes = _classes(cfg)
    student = create_backbone(name, num_classes=classes, **cfg.overrides)
    teacher = timm.create_model(cfg.teacher, pretrained=False, num_classes=classes)
    ref = None
    if reference:  # copies before any step: the same student and teacher weights
        model, timm_name, kwargs = _timm_twin(student)
        ref_teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        ref = nn.ModuleDict({"student": model, "teacher": ref_teacher})
    ours = build_objective("deit", student, type="hard", teacher=teacher, label_smoothing=LABEL_SMOOTHING)
    ours = _maybe_onednn(ours, cfg)
    images, labels = _batch(env, cfg.batch_size, student.patch_embed.img_size[0], classes, cfg.seed)
    batch = {"pixel_values": images, "labels": labels}
    info = {"model": name, "teacher": cfg.teacher, "num_classes": classes, "batch_size": cfg.batch_size}
    cases, optimizer, path = _ours_cases("deit", ours, batch, batch, env, cfg, cfg.batch_size, {**info, "impl": "ssl_vit deit objective (hard)"})
    if ref is not None:

        def make(m: nn.Module) -> tuple[Any, Any, tuple[Any, ...]]:
            student_ref, teacher_ref = m["student"], m["teacher"]
            m.to(env.device)
            student_ref.train()
            student_ref.set_distilled_training(True)  # train mode returns (class logits, distillation logits)
            opt = _matching_adamw(student_ref.parameters(), cfg, optimizer)

            def loss_fn() -> torch.Tensor:
                cls_logits, dist_logits = student_ref(images)
                with torch.no_grad():
                    teacher_labels = teacher_ref(images).argmax(dim=-1)
                return 0.5 * F.cross_entropy(cls_logits, labels, label_smoothing=LABEL_SMOOTHING) + 0.5 * F.cross_entropy(
                    dist_logits, teacher_labels
                )

            return _optimized_step(loss_fn, opt, env), _no_grad_loss(loss_fn), (student_ref, opt, teacher_ref)

        impl = f"timm.create_model({timm_name!r}, {kwargs}) distilled training + AdamW ({_optimizer_impl(optimizer)})"
        cases += _reference_cases("deit", "timm", ref, make, path, env, cfg, cfg.batch_size, {**info, "impl": impl})
    return cases


def _dino_views(env: BenchEnv, cfg: WorkloadConfig, img: int, local: int, seed: int) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    b = cfg.batch_size
    return {"global_crops": _random_views(env, b, 2, img, gen), "local_crops": _random_views(env, b, cfg.local_crops, local, gen)}


def dino_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Our dino objective vs lightly's DINO loop (its examples/pytorch/dino.py on a timm ViT), the same weights.

    lightly's loop runs the backbone once per view (2 global + local crops), as its example does; ours runs
    one pass per crop size (the official MultiCropWrapper). Both: the momentum teacher, the centre, the
    teacher temperature 0.04, the last layer frozen in the first epoch (1 step here).
    """
    from ssl_vit.models import create_backbone
    from ssl_vit.objectives import build_objective
    from ssl_vit.objectives.dino import default_local_crop_size

    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.model, num_classes=0, dynamic_img_size=True, **cfg.overrides)
    img, patch = backbone.patch_embed.img_size[0], backbone.patch_embed.patch_size[0]
    out_dim = cfg.dino_out_dim or (4096 if img <= 64 else 65536)
    local = default_local_crop_size(img, patch)
    head = {"out_dim": out_dim, "hidden_dim": cfg.dino_hidden_dim, "bottleneck_dim": cfg.dino_bottleneck_dim}
    ours = build_objective("dino", backbone, local_crops=cfg.local_crops, warmup_teacher_temp_epochs=0.0, **head)
    # lightly's timm ViT resamples the local crops' positions as timm does: ours too here, so both sides
    # compute the same loss (DINO's own resampling costs the same).
    ours.backbone.pos_embed_resample = ours.teacher["backbone"].pos_embed_resample = "timm"
    ours = _maybe_onednn(ours, cfg)
    batch = _dino_views(env, cfg, img, local, cfg.seed)
    info = {"model": cfg.model, "batch_size": cfg.batch_size, "views": 2 + cfg.local_crops, "local_size": local, **head}
    ref = _lightly_dino(ours, head) if reference else None  # copies before any step
    cases, optimizer, path = _ours_cases(
        "dino", ours, batch, batch, env, cfg, cfg.batch_size, {**info, "impl": "ssl_vit dino objective"}, eval_check=True
    )
    if ref is not None:
        from lightly.utils.scheduler import cosine_schedule

        views = [*batch["global_crops"], *batch["local_crops"]]
        total = 10**6  # as the trainer's schedule: never ends

        def make(m: nn.Module) -> tuple[Any, Any, tuple[Any, ...]]:
            m.to(env.device).train()
            student, teacher, criterion = m["student"], m["teacher"], m["criterion"]
            teacher.eval()
            opt = _matching_adamw([p for p in student.parameters() if p.requires_grad], cfg, optimizer)
            state = {"step": 0}

            def outputs(loss_module: nn.Module) -> torch.Tensor:
                teacher_out = [teacher(v) for v in batch["global_crops"]]
                student_out = [student(v) for v in views]
                return loss_module(teacher_out, student_out, epoch=state["step"])

            def step() -> None:
                _lightly_momentum_update(student, teacher, cosine_schedule(state["step"], total, 0.996, 1.0))
                with env.autocast():
                    loss = outputs(criterion)
                loss.backward()
                student["head"].cancel_last_layer_gradients(current_epoch=state["step"])
                opt.step()
                opt.zero_grad(set_to_none=True)
                state["step"] += 1

            # The check leaves the loss's centre untouched (lightly's DINOLoss updates it in forward).
            check = _no_grad_loss(lambda: outputs(copy.deepcopy(criterion)), student)
            return step, check, (student, opt, teacher, criterion)

        impl = f"lightly DINO (timm ViT + DINOProjectionHead + DINOLoss, one pass per view) + AdamW ({_optimizer_impl(optimizer)})"
        cases += _reference_cases(
            "dino", "lightly", ref, make, path, env, cfg, cfg.batch_size, {**info, "impl": impl},
            rebuild=lambda: _lightly_dino(ours, head),  # ours has taken no step yet: the same weights
        )
    return cases


class _Student(nn.Sequential):
    """backbone then head, as lightly's example composes them; `["backbone"]` / `["head"]` index them."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.add_module("backbone", backbone)
        self.add_module("head", head)

    def __getitem__(self, key: Any) -> nn.Module:
        return getattr(self, key) if isinstance(key, str) else super().__getitem__(key)


def _lightly_momentum_update(student: _Student, teacher: _Student, momentum: float) -> None:
    """lightly's examples' EMA of the teacher: `update_momentum` on the backbone and on the head."""
    from lightly.models.utils import update_momentum

    update_momentum(student["backbone"], teacher["backbone"], m=momentum)
    update_momentum(student["head"], teacher["head"], m=momentum)


def _lightly_dino(ours: nn.Module, head: dict[str, int]) -> nn.ModuleDict:
    """lightly's DINO parts with our objective's weights: student (timm ViT + head), teacher, loss.

    Built afresh for each copy: lightly's head uses `torch.nn.utils.weight_norm`, which cannot be deep-copied.
    """
    from lightly.loss import DINOLoss

    student = _lightly_student(ours, head)
    teacher = _lightly_student(ours, head).requires_grad_(False)  # lightly's example: a copy of the student
    criterion = DINOLoss(output_dim=head["out_dim"], warmup_teacher_temp_epochs=0, teacher_temp=ours.teacher_temp,
                         student_temp=ours.student_temp, center_momentum=ours.center_momentum)
    return nn.ModuleDict({"student": student, "teacher": teacher, "criterion": criterion})


def _lightly_student(ours: nn.Module, head: dict[str, int]) -> nn.Module:
    from lightly.models.modules.heads import DINOProjectionHead

    backbone, _, _ = _timm_twin(ours.backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # lightly's head uses torch.nn.utils.weight_norm
        projection = DINOProjectionHead(
            ours.backbone.embed_dim, head["hidden_dim"], head["bottleneck_dim"], head["out_dim"], batch_norm=False,
            freeze_last_layer=1, norm_last_layer=True,
        )
    names = {f"layers.{i}.{p}": f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    names["last_layer.weight_g"] = "last_layer.parametrizations.weight.original0"
    names["last_layer.weight_v"] = "last_layer.parametrizations.weight.original1"
    ours_head = ours.head.state_dict()
    projection.load_state_dict({k: ours_head[v] for k, v in names.items()})
    return _Student(backbone, projection)


def mocov3_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Our mocov3 objective vs a MoCo v3 loop from lightly's parts on a timm ViT, the same weights and views.

    lightly ships no MoCo v3 example; its parts are the paper's: `MoCoProjectionHead(batch_norm=True)` as
    the 3-layer projector and the 2-layer predictor, a momentum teacher (a copy of backbone + projector,
    `update_momentum` with `cosine_schedule` from 0.99 to 1), the query encoder trained by AdamW. The loss
    is the paper's Algorithm 1, ctr(q1, k2) + ctr(q2, k1) with ctr = 2T * CE(q . k / T): lightly's
    `NTXentLoss(memory_bank_size=0)` is SimCLR's loss (same-view negatives too, tests/objectives/
    test_mocov3.py), not MoCo v3's. lightly's loop runs the encoders once per view, as its examples do;
    ours runs the backbone once on both views. lightly's last BN keeps an affine (the paper's has none):
    frozen at its init (1, 0), the same function and the same trainable parameters; the random patch
    projection and the sin-cos positions are frozen on both sides.
    """
    from ssl_vit.models import create_backbone
    from ssl_vit.objectives import build_objective

    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.model, num_classes=0, pos_embed="sincos", **cfg.overrides)
    img = backbone.patch_embed.img_size[0]
    head = {"hidden_dim": cfg.moco_hidden_dim, "out_dim": cfg.moco_out_dim}
    ours = _maybe_onednn(build_objective("mocov3", backbone, **head), cfg)
    views = _random_views(env, cfg.batch_size, 2, img, torch.Generator().manual_seed(cfg.seed))
    batch = {"views": views}
    info = {"model": cfg.model, "batch_size": cfg.batch_size, "views": 2, **head}
    ref = _lightly_mocov3(ours) if reference else None  # copies before any step
    cases, optimizer, path = _ours_cases(
        "mocov3", ours, batch, batch, env, cfg, cfg.batch_size, {**info, "impl": "ssl_vit mocov3 objective"}
    )
    if ref is not None:
        from lightly.utils.scheduler import cosine_schedule

        total, t = 10**6, ours.temperature  # as the trainer's schedule: never ends

        def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # the paper's Algorithm 1
            logits = F.normalize(q.float(), dim=1) @ F.normalize(k.float(), dim=1).T  # (B, B)
            return F.cross_entropy(logits / t, torch.arange(q.shape[0], device=q.device)) * (2 * t)

        def make(m: nn.Module) -> tuple[Any, Any, tuple[Any, ...]]:
            m.to(env.device).train()  # the teacher too: its BN normalises with batch statistics (paper, lightly)
            student, predictor, teacher = m["student"], m["predictor"], m["teacher"]
            opt = _matching_adamw([p for p in [*student.parameters(), *predictor.parameters()] if p.requires_grad], cfg, optimizer)
            state = {"step": 0}

            def loss_fn() -> torch.Tensor:
                q1, q2 = (predictor(student(v)) for v in views)  # (B, C) each
                with torch.no_grad():
                    k1, k2 = (teacher(v) for v in views)
                return ctr(q1, k2) + ctr(q2, k1)

            def step() -> None:
                _lightly_momentum_update(student, teacher, cosine_schedule(state["step"], total, ours.base_momentum, 1.0))
                with env.autocast():
                    loss = loss_fn()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                state["step"] += 1

            return step, _no_grad_loss(loss_fn, m), (student, opt, teacher, predictor)

        impl = (f"lightly MoCo v3 parts (timm ViT + MoCoProjectionHead projector / predictor, momentum teacher, "
                f"Algorithm 1 loss, one pass per view) + AdamW ({_optimizer_impl(optimizer)})")
        cases += _reference_cases("mocov3", "lightly", ref, make, path, env, cfg, cfg.batch_size, {**info, "impl": impl})
    return cases


def _lightly_mocov3(ours: nn.Module) -> nn.ModuleDict:
    """lightly's MoCo v3 parts with our objective's weights: student (timm ViT + projector), predictor, teacher."""
    backbone, _, _ = _timm_twin(ours.backbone)
    student = _Student(_match_trainable(backbone, ours.backbone), _lightly_moco_head(ours.projector))
    teacher = copy.deepcopy(student).requires_grad_(False)  # lightly's examples: a copy of the student
    return nn.ModuleDict({"student": student, "predictor": _lightly_moco_head(ours.predictor), "teacher": teacher})


def _lightly_moco_head(mlp: nn.Sequential) -> nn.Module:
    """`MoCoProjectionHead(batch_norm=True)` with the weights of our MoCo v3 MLP (Linear, BN, ReLU ..., Linear, BN);
    its last BN's affine, which ours has not, frozen at (1, 0)."""
    from lightly.models.modules.heads import MoCoProjectionHead

    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    head = MoCoProjectionHead(
        linears[0].in_features, linears[0].out_features, linears[-1].out_features, num_layers=len(linears), batch_norm=True
    )
    last = f"{len(head.layers) - 1}"
    missing, unexpected = head.layers.load_state_dict(mlp.state_dict(), strict=False)
    if unexpected or set(missing) != {f"{last}.weight", f"{last}.bias"}:
        raise RuntimeError(f"lightly's MoCo head does not match ours: missing {missing}, unexpected {unexpected}.")
    head.layers[-1].requires_grad_(False)
    return head


def _simmim_mask_patch_size(backbone: nn.Module) -> int:
    """The paper's mask patch, 2 ViT patches wide (32 px over 16-px patches), or 1 patch where 2 do not tile the image."""
    img, patch = backbone.patch_embed.img_size[0], backbone.patch_embed.patch_size[0]
    return 2 * patch if img % (2 * patch) == 0 else patch


def simmim_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Our simmim objective vs lightly's SimMIM loop (its examples/pytorch/simmim.py on a timm ViT), the same
    weights and masks.

    Ours: the paper's masks (squares 2 patches wide where they tile the image, ratio 0.6, the objective's
    defaults), drawn once by the objective (`make_masks`) and handed in with the batch as its data pipeline
    does in training. lightly's loop: `MaskedVisionTransformerTIMM` (our timm twin, our mask token, lightly's
    init skipped) encodes every token with the masked ones replaced by the mask token, the encoded masked
    tokens alone go through `nn.Linear(dim, patch**2 * 3)` and `nn.L1Loss` compares them with
    `patchify`'s masked patches. It is fed our mask as `idx_mask` (`_simmim_idx_mask`) instead of drawing
    `random_token_mask` (per-patch masks at 0.75, not the paper's squares at 0.6).

    Where they agree (the paper's formulation): the mask token replaces the patch embedding before the
    position embedding on both sides (lightly's `preprocess` and ours, as microsoft/SimMIM), and lightly's
    mean L1 over the masked pixels is the official sum / (count + 1e-5) / channels up to that epsilon.
    Where they differ, without changing the loss: ours decodes every token (1x1 conv + pixel shuffle, the
    official head) and weighs the pixels by the mask, lightly decodes the masked tokens only; our head's
    weights are permuted into lightly's `patchify` order (`_lightly_simmim_decoder`). lightly's example
    shifts `idx_mask` by 1 for the class token; the reference shifts by the backbone's prefix tokens.
    """
    from ssl_vit.models import create_backbone
    from ssl_vit.objectives import build_objective

    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.model, num_classes=0, **cfg.overrides)
    img = backbone.patch_embed.img_size[0]
    mask_patch_size = _simmim_mask_patch_size(backbone)
    ours = _maybe_onednn(build_objective("simmim", backbone, mask_patch_size=mask_patch_size), cfg)
    images, _ = _batch(env, cfg.batch_size, img, 1, cfg.seed)
    mask = ours.make_masks(images, generator=torch.Generator().manual_seed(cfg.seed + 1))  # (B, N) bool
    batch = {"pixel_values": images, "mask": mask}  # the masks come with the batch, as from the data pipeline
    info = {
        "model": cfg.model, "batch_size": cfg.batch_size, "mask_patch_size": mask_patch_size,
        "mask_ratio": ours.mask_ratio, "patches": mask.shape[1], "masked_patches": int(mask[0].sum()),
    }
    ref = _lightly_simmim(ours) if reference else None  # copies before any step
    cases, optimizer, path = _ours_cases(
        "simmim", ours, batch, batch, env, cfg, cfg.batch_size, {**info, "impl": "ssl_vit simmim objective"}
    )
    if ref is not None:
        idx_mask = _simmim_idx_mask(mask, ours.num_prefix_tokens)

        def make(m: nn.Module) -> tuple[Any, Any, tuple[Any, ...]]:
            m.to(env.device).train()
            opt = _matching_adamw([p for p in m.parameters() if p.requires_grad], cfg, optimizer)
            criterion = nn.L1Loss()  # lightly's example: "L1 loss as paper suggestion"

            def loss_fn() -> torch.Tensor:
                predictions, targets = m(images, idx_mask)
                return criterion(predictions, targets)

            return _optimized_step(loss_fn, opt, env), _no_grad_loss(loss_fn, m), (m, opt)

        impl = (f"lightly SimMIM (MaskedVisionTransformerTIMM + linear decoder on the masked tokens, L1Loss, "
                f"our masks) + AdamW ({_optimizer_impl(optimizer)})")
        cases += _reference_cases("simmim", "lightly", ref, make, path, env, cfg, cfg.batch_size, {**info, "impl": impl})
    return cases


def _simmim_idx_mask(mask: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Our patch mask (B, N) bool -> lightly's `idx_mask` (B, K): the masked tokens' positions in the sequence
    with the prefix tokens in front (SimMIM's masks have the same count per sample)."""
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"lightly's idx_mask needs the same number of masked patches per sample, got {counts.tolist()}.")
    return mask.nonzero()[:, 1].view(mask.shape[0], -1) + num_prefix_tokens  # nonzero: row-major, ascending


class _LightlySimMIM(nn.Module):
    """lightly's examples/pytorch/simmim.py model on `MaskedVisionTransformerTIMM`, given `idx_mask` rather
    than drawing it: returns (the decoded masked tokens, their patches), both (B, K, patch**2 * 3)."""

    def __init__(self, backbone: nn.Module, decoder: nn.Linear, patch_size: int, num_prefix_tokens: int) -> None:
        super().__init__()
        self.backbone, self.decoder = backbone, decoder
        self.patch_size, self.num_prefix_tokens = patch_size, num_prefix_tokens

    def forward(self, images: torch.Tensor, idx_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from lightly.models import utils

        x_encoded = self.backbone.encode(images=images, idx_mask=idx_mask)  # every token, masked ones replaced
        x_out = self.decoder(utils.get_at_index(x_encoded, idx_mask))
        patches = utils.patchify(images, self.patch_size)
        return x_out, utils.get_at_index(patches, idx_mask - self.num_prefix_tokens)


def _lightly_simmim(ours: nn.Module) -> _LightlySimMIM:
    """lightly's SimMIM model with our objective's weights: our timm twin, mask token and (permuted) head."""
    from lightly.models.modules import MaskedVisionTransformerTIMM

    vit, _, _ = _timm_twin(ours.backbone)
    encoder = MaskedVisionTransformerTIMM(
        vit=_match_trainable(vit, ours.backbone), mask_token=nn.Parameter(ours.mask_token.detach().clone()),
        weight_initialization="skip", pos_embed_initialization="skip",  # keep our weights and positions
    )
    return _LightlySimMIM(encoder, _lightly_simmim_decoder(ours), ours.patch_size, ours.num_prefix_tokens)


def _lightly_simmim_decoder(ours: nn.Module) -> nn.Linear:
    """Our head (1x1 conv to C * p * p channels, pixel shuffle: channel c*p*p + i*p + j is pixel (c, i, j)) as
    lightly's `nn.Linear(dim, p**2 * C)` in `patchify`'s order ((i * p + j) * C + c)."""
    conv = ours.decoder[0]
    p, c, d = ours.patch_size, ours.in_chans, conv.in_channels
    linear = nn.Linear(d, p * p * c)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.view(c, p, p, d).permute(1, 2, 0, 3).reshape(p * p * c, d))
        linear.bias.copy_(conv.bias.view(c, p, p).permute(1, 2, 0).reshape(-1))
    return linear


def ijepa_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Our ijepa objective's step alone: no reference (lightly's I-JEPA is not a comparable loop).

    The same backbone and batch as `mae_cases` (sin-cos positions, `cfg.batch_size` images), so the
    report's "ijepa/ours / mae/ours" cross ratio compares the two steps' images/s. The predictor is
    `_predictor`'s (half the backbone's width; 2 blocks for <= 64 px images, 6 above). The masks are
    I-JEPA's own multi-block masks (paper defaults: 4 target blocks, a 0.85-1 context block less the
    targets), fresh every step as in training; `info` records one draw's context and target patches
    (MAE's encoder sees `(1 - mask_ratio)` of the patches; I-JEPA's context encoder the context block, its
    target encoder every patch). `reference` is accepted and ignored.
    """
    from ssl_vit.models import create_backbone
    from ssl_vit.objectives import build_objective
    from ssl_vit.objectives.masking import multiblock_masks

    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.model, num_classes=0, pos_embed="sincos", **cfg.overrides)
    img = backbone.patch_embed.img_size[0]
    predictor = _predictor(cfg, backbone, img)
    ours = _maybe_onednn(build_objective("ijepa", backbone, **predictor), cfg)
    images, _ = _batch(env, cfg.batch_size, img, 1, cfg.seed)
    context_ids, target_ids = multiblock_masks(
        cfg.batch_size, ours.grid_size, generator=torch.Generator().manual_seed(cfg.seed + 1), **ours.mask_args
    )
    check = {"pixel_values": images, "context_ids": context_ids, "target_ids": target_ids}  # one mask for the loss
    info = {
        "model": cfg.model, "batch_size": cfg.batch_size, **predictor, "patches": ours.num_patches,
        "num_targets": target_ids.shape[1], "context_patches": context_ids.shape[1],
        "target_patches": target_ids.shape[1] * target_ids.shape[2],
    }
    cases, _, _ = _ours_cases(
        "ijepa", ours, {"pixel_values": images}, check, env, cfg, cfg.batch_size, {**info, "impl": "ssl_vit ijepa objective"}
    )
    return cases


TRAIN_BUILDERS: dict[str, Callable[[WorkloadConfig, BenchEnv, bool], list[Case]]] = {
    "backbone": backbone_cases,
    "supervised": supervised_cases,
    "mae": mae_cases,
    "deit": deit_cases,
    "dino": dino_cases,
    "mocov3": mocov3_cases,
    "simmim": simmim_cases,
    "ijepa": ijepa_cases,
}


def train_cases(objectives: list[str], cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """The training cases of each objective asked for, in order."""
    unknown = [o for o in objectives if o not in TRAIN_BUILDERS]
    if unknown:
        raise ValueError(f"unknown objective(s) {unknown}: choose from {', '.join(TRAIN_BUILDERS)}.")
    return [case for o in objectives for case in TRAIN_BUILDERS[o](cfg, env, reference)]


# ---------------------------------------------------------------------------------------------------
# Activation (gradient) checkpointing


def grad_checkpointing_cases(cfg: WorkloadConfig, env: BenchEnv, objectives: list[str]) -> list[Case]:
    """Ours with `train.grad_checkpointing` off and on (`<objective>/ours+ckpt`), the same weights and batch.

    Objectives: supervised and/or mae. Both trainers are built the way a run builds them, so the
    checkpointed case runs what `train.grad_checkpointing=true` runs (timm's per-block checkpointing
    inside the backbone's `forward_features`, MAE's visible-token path included). `flops_fn` is the
    trainer's forward + backward alone: with the gradients already allocated, its peak above the
    tracked tensors is the activations' memory.
    """
    from ssl_vit.models import create_backbone
    from ssl_vit.objectives import build_objective

    cases: list[Case] = []
    for objective in objectives:
        torch.manual_seed(cfg.seed)
        if objective == "supervised":
            classes = _classes(cfg)
            module = build_objective(
                "supervised", create_backbone(cfg.model, num_classes=classes, **cfg.overrides), label_smoothing=LABEL_SMOOTHING
            )
            images, labels = _batch(env, cfg.batch_size, _img_size(cfg), classes, cfg.seed)
            batch: dict[str, Any] = {"pixel_values": images, "labels": labels}
            check = batch
        elif objective == "mae":
            module, _, img = _mae(cfg, cfg.mask_ratio, cfg.overrides)
            images, _ = _batch(env, cfg.batch_size, img, 1, cfg.seed)
            noise = torch.rand(cfg.batch_size, module.num_patches, generator=torch.Generator().manual_seed(cfg.seed + 1))
            batch = {"pixel_values": images, "noise": noise.to(env.device)}  # one mask: the two cases compare
            check = batch
        else:
            raise ValueError(f"grad checkpointing is measured for supervised and mae, not {objective!r}.")
        module = module.to(env.device)
        copies = {False: module, True: copy.deepcopy(module)}
        for ckpt, m in copies.items():
            trainer = engine_trainer(m, batch, env, cfg, grad_checkpointing=ckpt)

            def step(t: Any = trainer, b: dict[str, Any] = batch) -> None:
                t._train_batch(b)

            def forward_backward(t: Any = trainer, b: dict[str, Any] = batch) -> None:
                t.accelerator.backward(t.model(b)["loss"])  # into the gradients as they are (no optimizer step)

            name = f"{objective}/ours" + ("+ckpt" if ckpt else "")
            info = {"model": cfg.model, "batch_size": cfg.batch_size, "grad_checkpointing": ckpt}
            cases.append(Case(
                name, objective, "ours", step, cfg.batch_size, flops_fn=forward_backward, info=info,
                track=(trainer.unwrapped, trainer.optimizer.optimizer), linear=linear_path(m, env),
                variant="ckpt" if ckpt else "",
                loss=_no_grad_loss(lambda t=trainer, b=check: t.model(b)["loss"], m),
            ))
    return cases


# ---------------------------------------------------------------------------------------------------
# Feature extraction


def eval_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Frozen features (class token, pre-logits) in inference mode: ours vs timm's model."""
    from ssl_vit.eval.features import pool_features
    from ssl_vit.models import create_backbone

    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.model, num_classes=0, **cfg.overrides).eval()
    images, _ = _batch(env, cfg.eval_batch_size, _img_size(cfg), 1, cfg.seed)
    info = {"model": cfg.model, "batch_size": cfg.eval_batch_size}
    path = linear_path(backbone, env)
    ref = _timm_twin(backbone) if reference else None

    def make_ours(m: nn.Module) -> tuple[Any, Any, tuple[Any, ...]]:
        m.to(env.device)

        def ours() -> torch.Tensor:
            with torch.inference_mode(), env.autocast():
                return pool_features(m, images, "token")

        return ours, lambda: ours().float().square().mean(), (m,)

    ours_twins, _ = _twin_variants(path, cfg, env)
    cases = _variant_cases("eval", "ours", "ours", backbone, make_ours, ["", *ours_twins], env, cfg.eval_batch_size,
                           {**info, "impl": "ssl_vit pool_features"})
    if ref is not None:
        model, timm_name, _ = ref

        def make(m: nn.Module) -> tuple[Any, Any, tuple[Any, ...]]:
            m.to(env.device).eval()

            def theirs() -> torch.Tensor:
                with torch.inference_mode(), env.autocast():
                    return m.forward_head(m.forward_features(images), pre_logits=True)

            return theirs, lambda: theirs().float().square().mean(), (m,)

        cases += _reference_cases("eval", "timm", model, make, path, env, cfg, cfg.eval_batch_size,
                                  {**info, "impl": f"timm {timm_name} inference"})
    return cases


# ---------------------------------------------------------------------------------------------------
# Scaling of the MAE step with mask ratio and image size


def scaling_cases(
    cfg: WorkloadConfig,
    env: BenchEnv,
    mask_ratios: list[float],
    sizes: list[tuple[int, int]],
    batch_size: int,
) -> list[Case]:
    """MAE steps for every mask ratio at the first size, and every size at cfg.mask_ratio.

    Each setting gets two cases: the full training step through the engine ("scaling/step/...") and
    the encoder alone, forward + backward of the visible patches ("scaling/encoder/..."), whose cost
    should follow the share of visible patches. The decoder is the first size's at every size, so only
    the encoder's input changes.
    """
    decoder = _decoder(cfg, sizes[0][0])
    settings: list[tuple[int, int, float]] = [(sizes[0][0], sizes[0][1], r) for r in mask_ratios]
    settings += [(img, patch, cfg.mask_ratio) for img, patch in sizes[1:]]
    cases: list[Case] = []
    for img, patch, ratio in settings:
        torch.manual_seed(cfg.seed)
        mae, _, _ = _mae(cfg, ratio, {**cfg.overrides, "img_size": img, "patch_size": patch}, decoder)
        mae = mae.to(env.device)
        images, _ = _batch(env, batch_size, img, 1, cfg.seed)
        batch = {"pixel_values": images}
        tag = f"{img}px/p{patch}/mask{ratio:g}"
        info = {
            "model": cfg.model, "img_size": img, "patch_size": patch, "mask_ratio": ratio, "batch_size": batch_size,
            "patches": mae.num_patches, "visible": mae.num_keep, **decoder,
        }
        trainer = engine_trainer(mae, batch, env, cfg)
        lin = linear_path(mae, env)
        step_case = Case(
            f"scaling/step/{tag}", "scaling", "ours", lambda t=trainer, b=batch: t._train_batch(b), batch_size,
            info=info, track=(trainer.unwrapped, trainer.optimizer.optimizer), linear=lin,
        )

        def encoder_step(m: nn.Module = mae, x: torch.Tensor = images) -> None:
            with env.autocast():
                latent = m.encode(x)[0]  # (B, 1 + K, D)
            latent.float().square().mean().backward()
            m.zero_grad(set_to_none=True)

        cases += [step_case, Case(f"scaling/encoder/{tag}", "scaling", "encoder", encoder_step, batch_size, info=info, linear=lin)]
    return cases
