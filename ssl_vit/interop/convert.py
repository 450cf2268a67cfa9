"""Import checkpoints users already have into this suite's backbone (timm's VisionTransformer keys).

Formats read (detected from the keys, see `FORMATS`): this suite's own `backbone.safetensors`;
timm state dicts and timm Hub folders (`model.safetensors` + `config.json`); facebookresearch/deit and
facebookresearch/mae `.pth` files (`{"model": state_dict, ...}`, with DeiT's `dist_token`/`head_dist`
and MAE's decoder); Hugging Face `ViTModel`/`ViTForImageClassification`, `DeiTModel`/
`DeiTForImageClassification(WithTeacher)` and `ViTMAEModel`/`ViTMAEForPreTraining` weights.
Files are read with safetensors or `torch.load(weights_only=True)` only (see `safe_load`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssl_vit.interop.hf_vit import hf_encoder_to_timm, is_hf_vit
from ssl_vit.interop.safe_load import load_tensors

__all__ = [
    "FORMATS",
    "ImportInfo",
    "UnknownCheckpointError",
    "build_backbone",
    "infer_arch",
    "save_ours",
    "spec_for_arch",
    "to_backbone_state_dict",
]

FORMATS = {
    "ssl_vit": "this suite's backbone.safetensors + backbone.json",
    "timm": "a timm VisionTransformer state dict (.pth/.bin/.safetensors) or timm Hub folder",
    "deit": "facebookresearch/deit checkpoint ({'model': state_dict}, optional dist_token/head_dist)",
    "mae": "facebookresearch/mae checkpoint ({'model': state_dict}, with the MAE decoder when pretrained)",
    "hf-vit": "Hugging Face ViTModel / ViTForImageClassification",
    "hf-deit": "Hugging Face DeiTModel / DeiTForImageClassification(WithTeacher)",
    "hf-vitmae": "Hugging Face ViTMAEModel / ViTMAEForPreTraining",
}

# Weight files looked for in a folder, in order of preference.
_WEIGHT_FILES = (
    "backbone.safetensors",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_pytorch_model.bin",
)
# Keys of facebookresearch/mae's decoder (models_mae.py).
_MAE_DECODER = re.compile(r"^(mask_token|decoder_(embed|pos_embed|blocks|norm|pred))")


class UnknownCheckpointError(ValueError):
    """A checkpoint whose layout is none of FORMATS."""


@dataclass
class ImportInfo:
    """What `to_backbone_state_dict` found in a checkpoint.

    `spec` rebuilds the backbone: `create_backbone(**spec)`; `arch` is what the weights (and any config
    next to them) say about the architecture; `decoder_state_dict` is the MAE decoder in the MAE
    objective's keys when one was present and could be converted.
    """

    format: str
    source: str
    spec: dict[str, Any]
    arch: dict[str, Any]
    has_mae_decoder: bool = False
    decoder_state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The input normalisation recorded with the weights (our run config or timm's), else None."""
        cfg = self.metadata.get("config") or {}
        for source in (cfg.get("data") or {}, self.metadata.get("pretrained_cfg") or {}):
            if source.get("mean") and source.get("std"):
                return tuple(source["mean"]), tuple(source["std"])
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        d = asdict(self)
        d.pop("decoder_state_dict")
        d.pop("metadata")
        d["decoder_converted"] = self.decoder_state_dict is not None
        return json.loads(json.dumps(d, default=str))


# ---------------------------------------------------------------------------------------------------
# Finding and reading the files


def _resolve(path: Path) -> tuple[Path, dict[str, Any] | None, Path | None]:
    """(weights file, JSON config next to it or None, that config's path)."""
    if path.is_dir():
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                weights = path / name
                break
        else:
            raise FileNotFoundError(
                f"no weights in folder {path}: looked for {', '.join(_WEIGHT_FILES)}. Pass the weights file itself."
            )
    elif path.is_file():
        weights = path
    else:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # `<stem>.json` beside `<stem>.safetensors` is this suite's own metadata (backbone.json,
    # backbone_ema.json); config.json is Hugging Face's or timm's.
    for cfg_path in (weights.with_suffix(".json"), weights.parent / "config.json"):
        if cfg_path.is_file() and cfg_path != weights:
            try:
                return weights, json.loads(cfg_path.read_text()), cfg_path
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path} is not valid JSON ({e}); fix or remove it") from None
    return weights, None, None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _unwrap(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict inside a training checkpoint, and the key it was under."""
    for key in ("model", "state_dict", "module"):
        if _is_tensor_dict(obj.get(key)):
            sd = obj[key]
            break
    else:
        key = None
        sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not sd:
        raise UnknownCheckpointError(
            f"no tensors found (top-level keys: {', '.join(list(obj)[:12])}): expected a state dict or a "
            f"checkpoint with one under 'model' or 'state_dict'"
        )
    for wrapper in ("module.", "_orig_mod."):  # DistributedDataParallel / torch.compile prefixes
        if all(k.startswith(wrapper) for k in sd):
            sd = {k[len(wrapper) :]: v for k, v in sd.items()}
    return sd, key


# ---------------------------------------------------------------------------------------------------
# Architecture from weights


def _standard_heads(embed_dim: int) -> int | None:
    from ssl_vit.models import SIZES

    for size in SIZES.values():
        if size["embed_dim"] == embed_dim:
            return size["num_heads"]
    return None


def _heads_from_timm_name(name: str, model_args: dict[str, Any]) -> int | None:
    """num_heads of a timm architecture, built on the meta device (no memory, no download)."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name.split(".")[0], pretrained=False, **model_args)
        return int(model.blocks[0].attn.num_heads)
    except Exception:  # an unknown name or argument: fall back to other sources
        return None


def infer_arch(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """Architecture of a timm-keyed ViT state dict: sizes, tokens, head, pooling, position embeddings."""
    from ssl_vit.models import sincos_pos_embed_2d

    if "patch_embed.proj.weight" not in sd:
        raise UnknownCheckpointError("no 'patch_embed.proj.weight': not a ViT state dict in timm's layout")
    proj = sd["patch_embed.proj.weight"]  # (D, C, P, P)
    embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise UnknownCheckpointError("no 'blocks.N.*' keys: not a ViT state dict in timm's layout")
    distilled = "dist_token" in sd
    prefix = int("cls_token" in sd) + int(distilled)
    if "pos_embed" not in sd:
        raise UnknownCheckpointError("no 'pos_embed': only ViTs with absolute position embeddings are supported")
    pos = sd["pos_embed"]  # (1, prefix + H*W, D)
    grid = pos.shape[1] - prefix
    side = math.isqrt(grid)
    if side * side != grid:
        # A prefix token under another name (a renamed dist_token, registers) shows as an odd top-level key.
        odd = [k for k in sd if "." not in k and k not in ("cls_token", "dist_token", "pos_embed")]
        raise UnknownCheckpointError(
            f"pos_embed has {pos.shape[1]} tokens: not {prefix} prefix tokens (cls_token, dist_token) plus a "
            f"square patch grid" + (f"; top-level keys timm's ViT does not have: {odd[:8]}" if odd else "")
        )
    heads_source = "given" if num_heads else "weights-size-table"
    num_heads = num_heads or _standard_heads(embed_dim)
    if num_heads is None:
        num_heads, heads_source = max(1, embed_dim // 64), "guess-embed_dim/64"
    arch: dict[str, Any] = dict(
        embed_dim=embed_dim,
        depth=max(blocks) + 1,
        num_heads=num_heads,
        num_heads_source=heads_source,
        patch_size=patch,
        img_size=side * patch,
        in_chans=in_chans,
        distilled=distilled,
        class_token="cls_token" in sd,
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        global_pool="avg" if "fc_norm.weight" in sd else "token",
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        layer_scale="blocks.0.ls1.gamma" in sd,
        pos_embed="learn",
    )
    if embed_dim % 4 == 0:
        sincos = sincos_pos_embed_2d(embed_dim, (side, side), prefix)
        if torch.allclose(pos.float(), sincos, atol=1e-5):
            arch["pos_embed"] = "sincos"  # MAE's fixed embedding: keep it fixed when training on
    return arch


def spec_for_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """The `create_backbone(**spec)` spec that builds `arch`: a listed name when one fits, else overrides."""
    from ssl_vit.models import SIZES, list_backbones

    if not arch["class_token"]:
        raise UnknownCheckpointError("a ViT without a class token is not supported by this suite's backbone")
    size = next(
        (
            s
            for s, dims in SIZES.items()
            if (dims["embed_dim"], dims["depth"], dims["num_heads"])
            == (arch["embed_dim"], arch["depth"], arch["num_heads"])
        ),
        None,
    )
    kind = "deit" if arch["distilled"] else "vit"
    exact = f"{kind}_{size}{'_distilled' if arch['distilled'] else ''}_patch{arch['patch_size']}_{arch['img_size']}"
    if size and exact in list_backbones():
        spec: dict[str, Any] = {"name": exact}
    else:
        # The tiny base names; overrides give everything that differs from tiny/16/224.
        spec = {"name": "deit_tiny_distilled_patch16_224" if arch["distilled"] else "vit_tiny_patch16_224"}
        base = dict(SIZES["tiny"], patch_size=16, img_size=224)
        spec.update({k: arch[k] for k in base if arch[k] != base[k]})
    defaults = dict(num_classes=1000, global_pool="token", mlp_ratio=4.0, qkv_bias=True, in_chans=3, pos_embed="learn")
    spec.update({k: arch[k] for k in defaults if arch[k] != defaults[k]})
    if arch["qk_norm"]:
        spec["qk_norm"] = True
    if arch["layer_scale"]:
        spec["init_values"] = 1e-5  # any value: the loaded gammas replace it
    return spec


# ---------------------------------------------------------------------------------------------------
# Format detection and conversion


def _mae_weights():
    """The MAE engineer's converters, or None while they do not exist yet."""
    try:
        from ssl_vit.interop import mae_weights
    except ImportError:
        return None
    return mae_weights


def _convert_mae_official(sd: dict[str, torch.Tensor], notes: list[str]):
    mw = _mae_weights()
    if mw is not None and hasattr(mw, "mae_official_to_ours"):
        backbone, decoder = mw.mae_official_to_ours(sd)
        return backbone, decoder or None
    notes.append("MAE decoder found but ssl_vit.interop.mae_weights is unavailable: decoder not converted")
    return {k: v for k, v in sd.items() if not _MAE_DECODER.match(k)}, None


def _convert_hf(sd: dict[str, torch.Tensor], config: dict[str, Any] | None, notes: list[str]):
    model_type = (config or {}).get("model_type", "")
    has_decoder = any(k.startswith("decoder.") for k in sd)
    if model_type == "vit_mae" or has_decoder:
        fmt = "hf-vitmae"
        mw = _mae_weights()
        if mw is not None and hasattr(mw, "hf_vitmae_to_ours"):
            backbone, decoder = mw.hf_vitmae_to_ours(sd)
            return fmt, backbone, decoder or None, has_decoder
        if has_decoder:
            notes.append("MAE decoder found but ssl_vit.interop.mae_weights is unavailable: decoder not converted")
    else:
        fmt = "hf-deit" if (model_type == "deit" or any("distillation_token" in k for k in sd)) else "hf-vit"
    backbone, unused, more = hf_encoder_to_timm(sd)
    notes.extend(more)
    unused = [k for k in unused if not k.startswith("decoder.") and "pooler." not in k and "mask_token" not in k]
    if unused:
        raise UnknownCheckpointError(
            f"{fmt}: keys this converter does not know: {', '.join(unused[:10])}. Is this a ViT variant "
            f"(e.g. with layer scale or registers) that this suite's backbone does not have?"
        )
    if config and config.get("layer_norm_eps", 1e-6) != 1e-6:
        notes.append(
            f"HF LayerNorm eps is {config['layer_norm_eps']:g}, timm's 1e-06: features differ by ~1e-6 relative"
        )
    return fmt, backbone, None, has_decoder


def _written_by_mae(sd: dict[str, torch.Tensor], args: Any, trained_as: str) -> bool:
    """Whether a `{"model": state_dict}` file without a decoder comes from facebookresearch/mae, not /deit.

    Both write timm 0.3.2's keys. MAE's scripts record `global_pool` (main_finetune, main_linprobe) or
    `mask_ratio` (main_pretrain) in `args`, DeiT's `distillation_type`; their `args.model` names
    (`vit_base_patch16`, `deit_base_patch16_224`) do not always say. Without args: MAE fine-tunes with
    global pooling (`fc_norm`), and its released pretrained encoders have no classifier, DeiT's always do.
    """
    if "dist_token" in sd or hasattr(args, "distillation_type") or "deit" in trained_as:
        return False
    if hasattr(args, "global_pool") or hasattr(args, "mask_ratio") or "mae" in trained_as:
        return True
    return "fc_norm.weight" in sd or "head.weight" not in sd


def _check_fits(sd: dict[str, torch.Tensor], spec: dict[str, Any], fmt: str) -> None:
    """Raise UnknownCheckpointError unless the converted keys and shapes are exactly those of `spec`'s backbone.

    A checkpoint with a renamed or missing key fails here, naming it, rather than when loaded (or never,
    when only converted). The backbone is built on the meta device: no memory, no initialisation.
    """
    from ssl_vit.models import create_backbone

    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in create_backbone(**spec).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in sd.items()}
    problems = {
        "unknown keys": sorted(set(theirs) - set(own)),
        "missing keys": sorted(set(own) - set(theirs)),
        "wrong shapes": sorted(f"{k} {theirs[k]} vs {own[k]}" for k in set(theirs) & set(own) if theirs[k] != own[k]),
    }
    if any(problems.values()):
        found = "; ".join(f"{what}: {', '.join(keys[:8])}" for what, keys in problems.items() if keys)
        raise UnknownCheckpointError(
            f"{fmt}: the weights do not fit the ViT they describe ({spec['name']}): {found}. Expected the "
            f"layout of {FORMATS[fmt]}: was a key renamed, or is this another architecture?"
        )


def _heads_from_config(config: dict[str, Any] | None, fmt: str) -> int | None:
    if not config:
        return None
    if fmt == "ssl_vit":
        return None  # the spec itself rebuilds the model
    if "num_attention_heads" in config:  # Hugging Face
        return int(config["num_attention_heads"])
    args = config.get("model_args") or {}
    if "num_heads" in args:
        return int(args["num_heads"])
    if "architecture" in config:  # timm Hub config
        return _heads_from_timm_name(config["architecture"], args)
    return None


def to_backbone_state_dict(
    path: str | Path, *, num_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], ImportInfo]:
    """Read any supported checkpoint -> (state dict in this backbone's timm keys, ImportInfo).

    Args:
        path: a weights file (.safetensors/.pth/.pt/.bin) or a folder holding one (run dir, HF or timm
            folder). A `config.json` / `backbone.json` next to the weights is read for the architecture.
        num_heads: attention heads, for checkpoints that do not say (plain state dicts whose width is
            not a standard ViT size); otherwise taken from the config or the standard sizes.
    """
    weights, config, _ = _resolve(Path(path))
    obj = load_tensors(weights)
    sd, wrapper = _unwrap(obj)
    notes: list[str] = []
    decoder = None
    has_decoder = False
    heads_hint: int | None = None  # from a timm architecture name stored in the checkpoint

    ours = weights.suffix == ".safetensors" and isinstance((config or {}).get("model"), dict)
    if ours and "name" in config["model"]:
        fmt = "ssl_vit"
        spec = dict(config["model"])
        arch = infer_arch(sd, num_heads=1)  # sizes only; the spec is authoritative
        arch.update(num_heads=None, num_heads_source="spec")
        mae_decoder = weights.parent / "mae_decoder.safetensors"
        if mae_decoder.is_file():
            decoder, has_decoder = load_tensors(mae_decoder), True
        return sd, ImportInfo(fmt, str(weights), spec, arch, has_decoder, decoder, notes, dict(config))

    if is_hf_vit(sd):
        fmt, sd, decoder, has_decoder = _convert_hf(sd, config, notes)
    elif "patch_embed.proj.weight" in sd:
        has_decoder = any(_MAE_DECODER.match(k) for k in sd)
        args = obj.get("args")
        trained_as = str(getattr(args, "model", "") or obj.get("arch", "") or "")
        if has_decoder:
            fmt = "mae"
            sd, decoder = _convert_mae_official(sd, notes)
        elif wrapper == "model":
            fmt = "mae" if _written_by_mae(sd, args, trained_as) else "deit"
        else:
            fmt = "timm"
        if trained_as and "args" not in obj:  # timm's train.py checkpoints carry 'arch'
            heads_hint = _heads_from_timm_name(trained_as, {})
    else:
        raise UnknownCheckpointError(
            f"{weights}: not a format this suite can import (first keys: {', '.join(list(sd)[:8])}). "
            f"Supported: " + "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
        )

    heads = num_heads or _heads_from_config(config, fmt) or heads_hint
    arch = infer_arch(sd, num_heads=heads)
    if num_heads:
        arch["num_heads_source"] = "given"
    elif heads:
        arch["num_heads_source"] = "config"
    elif arch["num_heads_source"].startswith("guess"):
        notes.append(
            f"the weights do not say how many attention heads there are: guessed {arch['num_heads']} "
            f"(embed_dim / 64); pass num_heads (tools/convert.py --num-heads N) if that is wrong"
        )
    spec = spec_for_arch(arch)
    exported_spec = (config or {}).get("ssl_vit", {}).get("spec") if fmt == "timm" else None
    if isinstance(exported_spec, dict) and exported_spec.get("name"):
        spec = dict(exported_spec)  # written by our export: the exact spec, sin-cos flag included
    _check_fits(sd, spec, fmt)
    keep = ("model_args", "pretrained_cfg", "ssl_vit")  # timm's build args and preprocessing
    meta = {k: v for k, v in (config or {}).items() if not isinstance(v, (dict, list)) or k in keep}
    return sd, ImportInfo(fmt, str(weights), spec, arch, has_decoder, decoder, notes, meta)


# ---------------------------------------------------------------------------------------------------
# Using the result


def build_backbone(path: str | Path, *, num_heads: int | None = None):
    """A backbone with the checkpoint's weights loaded (strict), in eval mode: (ViT, ImportInfo)."""
    from ssl_vit.models import create_backbone, load_weights

    sd, info = to_backbone_state_dict(path, num_heads=num_heads)
    model = create_backbone(**info.spec)
    load_weights(model, sd)
    return model.eval(), info


def save_ours(out_dir: str | Path, state_dict: dict[str, torch.Tensor], info: ImportInfo) -> list[Path]:
    """Write this suite's format: backbone.safetensors + backbone.json (+ mae_decoder.safetensors)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # safetensors refuses tensors sharing memory; a fresh copy of each is always accepted.
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}

    written = [out / "backbone.safetensors", out / "backbone.json"]
    save_file(tensors(state_dict), str(written[0]), metadata={"format": "pt"})
    objective = info.metadata.get("objective") if info.format == "ssl_vit" else f"imported-{info.format}"
    meta = {
        "model": info.spec,
        "objective": objective,
        "step": info.metadata.get("step") if info.format == "ssl_vit" else None,
        "config": info.metadata.get("config") if info.format == "ssl_vit" else None,
        "source": info.source,
        "import": info.to_dict(),
    }
    written[1].write_text(json.dumps(meta, indent=2) + "\n")
    if info.decoder_state_dict is not None:
        written.append(out / "mae_decoder.safetensors")
        save_file(tensors(info.decoder_state_dict), str(written[-1]), metadata={"format": "pt"})
    return written
