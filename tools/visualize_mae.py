"""MAE reconstructions of a trained run as a PNG grid: original | masked | reconstruction | + visible patches.

    python tools/visualize_mae.py --run outputs/mae_default [--images 8] [--out grid.png]
    python tools/visualize_mae.py --run outputs/mae_default --folder my_pictures/ --mask-ratio 0.5

Rebuilds the objective from `RUN/config.yaml` (+ `RUN/backbone.json` for the exact architecture),
loads `RUN/checkpoint-last/model.safetensors` (the full objective: backbone and decoder), and takes
images from the run's eval data (eval transform, in order) or from a folder of images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from ssl_vit.viz.mae import reconstruction_grid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def load_run(run_dir: Path, mask_ratio: float | None = None, checkpoint: Path | None = None):
    """(MAE objective with the run's trained weights, the run's PretrainConfig)."""
    from safetensors.torch import load_file

    from ssl_vit.config import PretrainConfig, config_from_dict, read_yaml
    from ssl_vit.models import create_backbone
    from ssl_vit.objectives.mae import MAE

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise SystemExit(f"error: {config_file} not found: --run must be the output_dir of an MAE pretraining run.")
    cfg = config_from_dict(PretrainConfig, read_yaml(config_file))
    if cfg.objective.name != "mae":
        raise SystemExit(
            f"error: {run_dir} trained objective '{cfg.objective.name}', not 'mae': nothing to reconstruct."
        )
    weights = checkpoint or run_dir / "checkpoint-last" / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"error: {weights} not found: has the run saved a checkpoint yet (train.save_every)?")

    spec_file = run_dir / "backbone.json"
    if spec_file.is_file():  # the exact architecture the engine built
        spec = dict(json.loads(spec_file.read_text())["model"])
    else:
        m = cfg.model
        spec = dict(
            name=m.name, img_size=m.img_size or cfg.data.image_size, patch_size=m.patch_size,
            pos_embed=m.pos_embed, global_pool=m.global_pool, **dict(m.args),
        )
    spec["num_classes"] = 0
    backbone = create_backbone(spec.pop("name"), **spec)
    kwargs = dataclasses.asdict(cfg.mae)
    if mask_ratio is not None:
        kwargs["mask_ratio"] = mask_ratio
    mae = MAE(backbone, **kwargs)  # its init is overwritten by the run's weights below

    state = load_file(str(weights), device="cpu")
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers, should a save keep them
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    head = [k for k in state if k.startswith(("backbone.head.", "backbone.head_dist."))]
    for k in head:  # a pretraining head (none for MAE) is not part of the reconstruction
        state.pop(k)
    missing, unexpected = mae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(
            f"error: {weights} does not fit the MAE rebuilt from {config_file}: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}."
        )
    return mae.eval(), cfg


def folder_images(folder: Path, count: int, cfg) -> torch.Tensor:
    """The first `count` images of a folder (sorted names), eval transform: (B, 3, H, W)."""
    from PIL import Image

    from ssl_vit.data import build_transform

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    transform = build_transform("eval", cfg.data, train=False)
    tensors = []
    for path in files:
        with Image.open(path) as img:
            tensors.append(transform(img.convert("RGB")))
    return torch.stack(tensors)


def run_images(count: int, cfg) -> torch.Tensor:
    """The first `count` images of the run's eval split (train when it has none), eval transform."""
    from ssl_vit.data import load_data, make_loader

    bundle = load_data(cfg.data, need_labels=False, seed=cfg.seed)
    split = "eval" if bundle.eval is not None else "train"
    loader = make_loader(bundle, split, "eval", batch_size=count, train=False, num_workers=0)
    return next(iter(loader))["pixel_values"]


def save_png(grid: torch.Tensor, path: Path) -> Path:
    """(3, H, W) in [0, 1] -> PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="output_dir of an MAE pretraining run")
    parser.add_argument("--images", type=int, default=8, help="number of images (rows)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN/mae_reconstruction_tool.png)")
    parser.add_argument("--folder", type=Path, default=None, help="take images from this folder instead")
    parser.add_argument("--mask-ratio", type=float, default=None, help="override the run's mae.mask_ratio")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--checkpoint", type=Path, default=None, help="another model.safetensors of the run")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.images < 1:
        parser.error("--images must be at least 1")

    mae, cfg = load_run(args.run, args.mask_ratio, args.checkpoint)
    images = folder_images(args.folder, args.images, cfg) if args.folder else run_images(args.images, cfg)
    grid = reconstruction_grid(mae, images, cfg.data.mean, cfg.data.std, max_images=args.images, seed=args.seed)
    out = save_png(grid, args.out or args.run / "mae_reconstruction_tool.png")
    print(f"wrote {out} ({images.shape[0]} images, mask ratio {mae.mask_ratio})")
    return out


if __name__ == "__main__":
    main()
