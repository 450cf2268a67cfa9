"""Where does the class token look? Per-head attention of the last block and attention rollout, as a PNG grid.

    python tools/attention_maps.py --checkpoint outputs/mae --images synthetic --out attention.png
    python tools/attention_maps.py --checkpoint random --model vit_nano_patch4_32 --images photos/ --out a.png

Each row is one image: the input, the attention rollout through all blocks (Abnar & Zuidema 2020),
then the class token's attention to every patch for each head of the last block. Bright = more
attention; each tile is scaled to its own range.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="random", help="run dir / checkpoint file / HF or timm folder, or 'random'")
    p.add_argument("--model", default="vit_nano_patch4_32", help="backbone name for --checkpoint random")
    p.add_argument("--pos-embed", choices=["learn", "sincos"], default="learn", help="for --checkpoint random")
    p.add_argument("--images", default="synthetic", help="an image, a folder of images, or 'synthetic'")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--out", default="attention_maps.png", help="PNG to write")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def draw(model, images, names, out: Path) -> Path:
    """The labelled figure: rows = images; columns = input, rollout, head 1..h."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ssl_vit.viz.attention import attention_matrices, rollout_from, upsample
    from ssl_vit.viz.images import colorize, normalize, overlay

    backbone = model.backbone
    inputs = normalize(images, model.mean, model.std)
    attentions = attention_matrices(backbone, inputs)
    prefix, grid = backbone.num_prefix_tokens, backbone.patch_embed.grid_size
    last = attentions[-1][:, :, 0, prefix:].reshape(len(images), -1, *grid)  # (B, heads, Hp, Wp)
    rolled = rollout_from(attentions, prefix, grid)  # (B, Hp, Wp)
    # Display at >= 128 px per tile so small images stay readable; nearest keeps patches crisp.
    side = max(128, images.shape[-1])
    pictures = upsample(images, (side, side))
    heat = colorize(upsample(torch.cat([rolled[:, None], last], dim=1), (side, side)))  # (B, 1 + heads, 3, S, S)
    n_heads = last.shape[1]
    cols = 2 + n_heads
    fig, axes = plt.subplots(len(images), cols, figsize=(1.7 * cols, 1.8 * len(images) + 0.6), squeeze=False)
    titles = ["input", "rollout"] + [f"head {h + 1}" for h in range(n_heads)]
    for i in range(len(images)):
        tiles = [pictures[i]] + [overlay(pictures[i], heat[i, j]) for j in range(1 + n_heads)]
        for j, tile in enumerate(tiles):
            ax = axes[i, j]
            ax.imshow(tile.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=10)
        axes[i, 0].set_ylabel(names[i], fontsize=8)
    depth = len(attentions)
    fig.suptitle(
        f"Class-token attention: {model.label}\nrollout over {depth} blocks; heads of block {depth} (the last); "
        f"bright = more attention, each tile scaled to its own range",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ssl_vit.viz.images import load_images
    from ssl_vit.viz.source import load_viz_model

    model = load_viz_model(args.checkpoint, args.model, args.pos_embed, args.seed)
    size = model.backbone.patch_embed.img_size[0]
    images, names = load_images(args.images, size, args.num_images, args.seed)
    out = draw(model, images, names, Path(args.out))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
