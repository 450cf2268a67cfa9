"""The benchmarked steps: ours (the library as training runs it) and references of the same size.

- backbone: forward + backward of our ViT vs `timm.create_model` of the same config (issue 2's number);
- supervised: our `supervised` objective + the engine's optimizer vs `timm.create_model` (same
  architecture, `backbone.timm_spec()`) + cross-entropy with the same smoothing + plain AdamW;
- mae: our `mae` objective vs `transformers.ViTMAEForPreTraining` built from a config of the same size
  (never downloaded), same mask ratio, norm-pix loss, decoder;
- deit: our `deit` objective (hard distillation, frozen teacher) vs timm's distilled ViT + the same loss;
- eval: feature extraction (`ssl_vit.eval.features.pool_features` in inference mode) vs timm inference.
Every step runs on a fixed random batch already on the device: this measures the model and the
optimizer, not the data pipeline (`tools/benchmark.py data` measures that).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_vit.bench.timing import Case

__all__ = [
    "BenchEnv",
    "backbone_cases",
    "WorkloadConfig",
    "deit_cases",
    "eval_cases",
    "hf_mae_config",
    "mae_cases",
    "scaling_cases",
    "supervised_cases",
    "train_cases",
]

LABEL_SMOOTHING = 0.1  # the supervised / deit objectives' default, applied to the references too


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
    overrides: dict[str, Any] = field(default_factory=dict)  # extra create_backbone kwargs (img_size, ...)


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


def _batch(env: BenchEnv, batch: int, img_size: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, img_size, img_size, generator=gen).to(env.device)  # (B, 3, H, W)
    labels = torch.randint(0, max(classes, 1), (batch,), generator=gen).to(env.device)  # (B,)
    return images, labels


def _our_optimizer(module: nn.Module, cfg: WorkloadConfig, env: BenchEnv) -> torch.optim.Optimizer:
    """The optimizer training builds (the engine's param groups and AdamW settings)."""
    from ssl_vit.engine.config import OptimConfig
    from ssl_vit.engine.optim import build_optimizer, param_groups

    oc = OptimConfig(weight_decay=cfg.weight_decay)
    return build_optimizer(param_groups(module, oc.weight_decay, oc.layer_decay), oc, cfg.lr, env.device.type)


def _plain_adamw(module: nn.Module, cfg: WorkloadConfig) -> torch.optim.Optimizer:
    """A reference's optimizer: torch's AdamW with its defaults, one group, as a plain loop would write it."""
    return torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


def _train_case(
    name: str, group: str, role: str, module: nn.Module, loss_fn: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer, env: BenchEnv, images: int, info: dict[str, Any],
) -> Case:
    """A training step (forward, backward, optimizer step) and its FLOP-counting twin (no optimizer step)."""
    module.train()

    def step() -> None:
        with env.autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward_backward() -> None:
        with env.autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.zero_grad(set_to_none=True)

    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    info = {"trainable_params": params, **info}
    return Case(name, group, role, step, images, forward_backward, info, track=(module, optimizer))


def _maybe_onednn(module: nn.Module, cfg: WorkloadConfig) -> nn.Module:
    if cfg.onednn_objective:
        from ssl_vit.ops.linear import use_onednn_linears

        use_onednn_linears(module)
    return module


# ---------------------------------------------------------------------------------------------------
# Training steps


def supervised_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Our supervised objective vs timm's model + cross-entropy + plain AdamW (same weights at start)."""
    import timm

    from ssl_vit.models import create_backbone
    from ssl_vit.objectives import build_objective

    torch.manual_seed(cfg.seed)
    classes = _classes(cfg)
    backbone = create_backbone(cfg.model, num_classes=classes, **cfg.overrides)
    ours = _maybe_onednn(build_objective("supervised", backbone, label_smoothing=LABEL_SMOOTHING), cfg).to(env.device)
    images, labels = _batch(env, cfg.batch_size, _img_size(cfg), classes, cfg.seed)
    batch = {"pixel_values": images, "labels": labels}
    info = {"model": cfg.model, "num_classes": classes, "batch_size": cfg.batch_size}
    cases = [
        _train_case(
            "supervised/ours", "supervised", "ours", ours, lambda: ours(batch)["loss"],
            _our_optimizer(ours, cfg, env), env, cfg.batch_size, {**info, "impl": "ssl_vit supervised objective"},
        )
    ]
    if reference:
        timm_name, kwargs = backbone.timm_spec()
        ref = timm.create_model(timm_name, pretrained=False, **kwargs)
        ref.load_state_dict(backbone.state_dict())
        ref.to(env.device)
        cases.append(
            _train_case(
                "supervised/timm", "supervised", "reference", ref,
                lambda: F.cross_entropy(ref(images), labels, label_smoothing=LABEL_SMOOTHING),
                _plain_adamw(ref, cfg), env, cfg.batch_size,
                {**info, "impl": f"timm.create_model({timm_name!r}, {kwargs}) + CE + AdamW"},
            )
        )
    return cases


def backbone_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Forward + backward of the bare backbone vs `timm.create_model` of the same config (no loss, no optimizer).

    The measurement issue 2 asks for: the same weights, the same batch, logits.mean().backward().
    """
    import timm

    from ssl_vit.models import create_backbone

    torch.manual_seed(cfg.seed)
    classes = _classes(cfg)
    backbone = create_backbone(cfg.model, num_classes=classes, **cfg.overrides).to(env.device).train()
    images, _ = _batch(env, cfg.batch_size, _img_size(cfg), classes, cfg.seed)
    info = {"model": cfg.model, "num_classes": classes, "batch_size": cfg.batch_size}

    def fwd_bwd(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            with env.autocast():
                out = model(images)  # (B, C)
            out.float().mean().backward()
            model.zero_grad(set_to_none=True)

        return step

    cases = [
        Case("backbone/ours", "backbone", "ours", fwd_bwd(backbone), cfg.batch_size,
             info={**info, "impl": "ssl_vit ViT"}, track=(backbone,))
    ]
    if reference:
        timm_name, kwargs = backbone.timm_spec()
        ref = timm.create_model(timm_name, pretrained=False, **kwargs)
        ref.load_state_dict(backbone.state_dict())
        ref.to(env.device).train()
        cases.append(
            Case("backbone/timm", "backbone", "reference", fwd_bwd(ref), cfg.batch_size,
                 info={**info, "impl": f"timm.create_model({timm_name!r}, {kwargs})"}, track=(ref,))
        )
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
    env: BenchEnv,
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
    return _maybe_onednn(mae, cfg).to(env.device), decoder, img


def mae_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Our MAE objective vs Hugging Face's ViTMAEForPreTraining of the same size."""
    torch.manual_seed(cfg.seed)
    ours, decoder, img = _mae(cfg, env, cfg.mask_ratio, cfg.overrides)
    images, _ = _batch(env, cfg.batch_size, img, 1, cfg.seed)
    batch = {"pixel_values": images}
    info = {"model": cfg.model, "mask_ratio": cfg.mask_ratio, "batch_size": cfg.batch_size, **decoder}
    cases = [
        _train_case(
            "mae/ours", "mae", "ours", ours, lambda: ours(batch)["loss"], _our_optimizer(ours, cfg, env), env,
            cfg.batch_size, {**info, "impl": "ssl_vit mae objective"},
        )
    ]
    if reference:
        from transformers import ViTMAEForPreTraining

        hf = ViTMAEForPreTraining(hf_mae_config(ours.backbone, cfg.mask_ratio, decoder)).to(env.device)
        impl = f"transformers.ViTMAEForPreTraining ({hf.config._attn_implementation})"
        cases.append(
            _train_case(
                "mae/hf", "mae", "reference", hf, lambda: hf(pixel_values=images).loss, _plain_adamw(hf, cfg), env,
                cfg.batch_size, {**info, "impl": impl},
            )
        )
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
    """Our deit objective (hard distillation) vs timm's distilled ViT + the same loss, same frozen teacher."""
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
    ours = build_objective("deit", student, type="hard", teacher=teacher, label_smoothing=LABEL_SMOOTHING)
    ours = _maybe_onednn(ours, cfg).to(env.device)
    images, labels = _batch(env, cfg.batch_size, student.patch_embed.img_size[0], classes, cfg.seed)
    batch = {"pixel_values": images, "labels": labels}
    info = {"model": name, "teacher": cfg.teacher, "num_classes": classes, "batch_size": cfg.batch_size}
    cases = [
        _train_case(
            "deit/ours", "deit", "ours", ours, lambda: ours(batch)["loss"], _our_optimizer(ours, cfg, env), env,
            cfg.batch_size, {**info, "impl": "ssl_vit deit objective (hard)"},
        )
    ]
    if reference:
        timm_name, kwargs = student.timm_spec()
        ref = timm.create_model(timm_name, pretrained=False, **kwargs)
        ref.load_state_dict(student.state_dict())
        ref.set_distilled_training(True)  # train mode returns (class logits, distillation logits)
        ref_teacher = timm.create_model(cfg.teacher, pretrained=False, num_classes=classes).eval().requires_grad_(False)
        ref.to(env.device)
        ref_teacher.to(env.device)

        def ref_loss() -> torch.Tensor:
            cls_logits, dist_logits = ref(images)
            with torch.no_grad():
                teacher_labels = ref_teacher(images).argmax(dim=-1)
            return 0.5 * F.cross_entropy(cls_logits, labels, label_smoothing=LABEL_SMOOTHING) + 0.5 * F.cross_entropy(
                dist_logits, teacher_labels
            )

        ref_case = _train_case(
            "deit/timm", "deit", "reference", ref, ref_loss, _plain_adamw(ref, cfg), env, cfg.batch_size,
            {**info, "impl": f"timm.create_model({timm_name!r}, {kwargs}) distilled training + AdamW"},
        )
        ref_case.track += (ref_teacher,)  # ours holds its teacher as a submodule: count both alike
        cases.append(ref_case)
    return cases


TRAIN_BUILDERS: dict[str, Callable[[WorkloadConfig, BenchEnv, bool], list[Case]]] = {
    "backbone": backbone_cases,
    "supervised": supervised_cases,
    "mae": mae_cases,
    "deit": deit_cases,
}


def train_cases(objectives: list[str], cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """The training cases of each objective asked for, in order."""
    unknown = [o for o in objectives if o not in TRAIN_BUILDERS]
    if unknown:
        raise ValueError(f"unknown objective(s) {unknown}: choose from {', '.join(TRAIN_BUILDERS)}.")
    return [case for o in objectives for case in TRAIN_BUILDERS[o](cfg, env, reference)]


# ---------------------------------------------------------------------------------------------------
# Feature extraction


def eval_cases(cfg: WorkloadConfig, env: BenchEnv, reference: bool = True) -> list[Case]:
    """Frozen features (class token, pre-logits) in inference mode: ours vs timm's model."""
    import timm

    from ssl_vit.eval.features import pool_features
    from ssl_vit.models import create_backbone

    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.model, num_classes=0, **cfg.overrides).to(env.device).eval()
    images, _ = _batch(env, cfg.eval_batch_size, _img_size(cfg), 1, cfg.seed)
    info = {"model": cfg.model, "batch_size": cfg.eval_batch_size}

    def ours() -> None:
        with torch.inference_mode(), env.autocast():
            pool_features(backbone, images, "token")

    cases = [
        Case("eval/ours", "eval", "ours", ours, cfg.eval_batch_size,
             info={**info, "impl": "ssl_vit pool_features"}, track=(backbone,))
    ]
    if reference:
        timm_name, kwargs = backbone.timm_spec()
        ref = timm.create_model(timm_name, pretrained=False, **kwargs)
        ref.load_state_dict(backbone.state_dict())
        ref.to(env.device).eval()

        def theirs() -> None:
            with torch.inference_mode(), env.autocast():
                ref.forward_head(ref.forward_features(images), pre_logits=True)

        cases.append(
            Case("eval/timm", "eval", "reference", theirs, cfg.eval_batch_size,
                 info={**info, "impl": f"timm {timm_name} inference"}, track=(ref,))
        )
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

    Each setting gets two cases: the full training step ("scaling/step/...") and the encoder alone,
    forward + backward of the visible patches ("scaling/encoder/..."), whose cost should follow the
    share of visible patches. The decoder is the first size's at every size, so only the encoder's
    input changes.
    """
    decoder = _decoder(cfg, sizes[0][0])
    settings: list[tuple[int, int, float]] = [(sizes[0][0], sizes[0][1], r) for r in mask_ratios]
    settings += [(img, patch, cfg.mask_ratio) for img, patch in sizes[1:]]
    cases: list[Case] = []
    for img, patch, ratio in settings:
        torch.manual_seed(cfg.seed)
        mae, _, _ = _mae(cfg, env, ratio, {**cfg.overrides, "img_size": img, "patch_size": patch}, decoder)
        images, _ = _batch(env, batch_size, img, 1, cfg.seed)
        batch = {"pixel_values": images}
        tag = f"{img}px/p{patch}/mask{ratio:g}"
        info = {
            "model": cfg.model, "img_size": img, "patch_size": patch, "mask_ratio": ratio, "batch_size": batch_size,
            "patches": mae.num_patches, "visible": mae.num_keep, **decoder,
        }
        step_case = _train_case(
            f"scaling/step/{tag}", "scaling", "ours", mae, lambda m=mae, b=batch: m(b)["loss"],
            _our_optimizer(mae, cfg, env), env, batch_size, info,
        )

        def encoder_step(m: nn.Module = mae, x: torch.Tensor = images) -> None:
            with env.autocast():
                latent = m.encode(x)[0]  # (B, 1 + K, D)
            latent.float().square().mean().backward()
            m.zero_grad(set_to_none=True)

        cases += [step_case, Case(f"scaling/encoder/{tag}", "scaling", "encoder", encoder_step, batch_size, info=info)]
    return cases
