"""An image is worth 16x16 words: see the patch tokens a ViT reads, and what its position embeddings learned.

    python tools/show_patches.py --image synthetic --model vit_nano_patch4_32 --out patches/
    python tools/show_patches.py --image photo.jpg --checkpoint outputs/mae --out patches/
    python tools/show_patches.py --checkpoint random --pos-embed sincos --out patches/   # MAE's fixed grid

Writes two PNGs into --out:
- patches.png: the image cut into its patch grid, each patch numbered by its place in the token
  sequence, next to that sequence itself ([CLS] first, then patch 1, 2, ... row by row);
- position_similarity.png: for each patch, the cosine similarity of its position embedding to every
  patch's (the ViT paper's Figure 7). A model that has learned the 2-D layout shows a bright spot at
  the patch's own place that fades with distance, and row/column stripes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default="synthetic", help="an image file or 'synthetic'")
    p.add_argument("--model", default="vit_nano_patch4_32", help="backbone name (for --checkpoint random)")
    p.add_argument("--checkpoint", default="random", help="run dir / checkpoint / HF or timm folder, or 'random'")
    p.add_argument("--pos-embed", choices=["learn", "sincos"], default="learn", help="for --checkpoint random")
    p.add_argument("--out", default="patches", help="folder for patches.png and position_similarity.png")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_patches(image: torch.Tensor, patch_size: int, num_prefix: int, label: str, out: Path) -> Path:
    """Left: the image with its patch grid, numbered in token order. Right: the token sequence."""
    from ssl_vit.viz.patches import patch_sequence

    plt = _plt()
    _, h, w = image.shape
    gh, gw = h // patch_size, w // patch_size
    n = gh * gw
    # Wrap the sequence at a width other than the grid's, so it reads as a 1-D sequence, not the image again.
    per_row = 16 if gw != 16 else 24
    seq_rows = -(-(n + 1) // per_row)  # the [CLS] tile comes first
    panel = max(4.0, 0.42 * gw)
    fig, (ax_img, ax_seq) = plt.subplots(
        1, 2, figsize=(2 * panel + 0.8, panel + 1.2), gridspec_kw=dict(width_ratios=[1, 1])
    )
    fontsize = max(4, min(11, 200 / max(gw, 1) / 2.2))

    ax_img.imshow(image.permute(1, 2, 0).numpy(), extent=(0, w, h, 0), interpolation="nearest")
    for k in range(1, gw):
        ax_img.axvline(k * patch_size, color="white", lw=1)
    for k in range(1, gh):
        ax_img.axhline(k * patch_size, color="white", lw=1)
    for idx in range(n):
        r, c = divmod(idx, gw)
        ax_img.text(
            (c + 0.5) * patch_size, (r + 0.5) * patch_size, str(idx + 1), ha="center", va="center",
            fontsize=fontsize, color="white", weight="bold",
            bbox=dict(boxstyle="round,pad=0.15", fc="black", alpha=0.45, lw=0),
        )
    ax_img.set_title(f"{gh} x {gw} = {n} patches of {patch_size} x {patch_size} pixels", fontsize=10)
    ax_img.set_xticks([])
    ax_img.set_yticks([])

    # The sequence: tiles in token order, wrapped every `per_row` tokens, each captioned with its
    # position; drawn as one picture (tiles on white, gaps between) with the captions on top.
    tiles = patch_sequence(image, patch_size)  # (N, 3, P, P)
    p = patch_size
    gap, caption_h = max(1, p // 4), max(2, p // 2)
    cell_w, cell_h = p + gap, p + gap + caption_h
    canvas = torch.ones(3, seq_rows * cell_h, per_row * cell_w)
    for t in range(n + 1):
        r, c = divmod(t, per_row)
        y0, x0 = r * cell_h, c * cell_w
        canvas[:, y0 : y0 + p, x0 : x0 + p] = 0.27 if t == 0 else tiles[t - 1]
    ax_seq.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
    for t in range(n + 1):
        r, c = divmod(t, per_row)
        y0, x0 = r * cell_h, c * cell_w
        if t == 0:
            ax_seq.text(x0 + p / 2 - 0.5, y0 + p / 2 - 0.5, "CLS", ha="center", va="center", color="white",
                        fontsize=fontsize * 0.8)
        ax_seq.text(x0 + p / 2 - 0.5, y0 + p + 0.2 * gap, str(t), ha="center", va="top", fontsize=fontsize * 0.8)
    ax_seq.set_aspect("equal")
    ax_seq.axis("off")
    prefix = "[CLS]" if num_prefix == 1 else f"{num_prefix} prefix tokens ([CLS], [DIST])"
    ax_seq.set_title(
        f"the sequence the transformer reads: {prefix} + {n} patch tokens\n"
        f"(one line of tokens, wrapped every {per_row})",
        fontsize=10,
    )
    fig.suptitle(f"An image is worth {gh}x{gw} words: {label}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_similarity(similarity: torch.Tensor, label: str, out: Path) -> Path:
    """The ViT paper's Figure 7: tile (r, c) = similarity of patch (r, c)'s position embedding to all patches."""
    from ssl_vit.viz.patches import similarity_mosaic

    plt = _plt()
    gh, gw = similarity.shape[:2]
    mosaic = similarity_mosaic(similarity)
    side = max(5.0, 0.38 * gw + 2)
    fig, ax = plt.subplots(figsize=(side + 1.2, side + 0.6))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    # The data's own range: sin-cos embeddings, for one, are all fairly similar (0.6..1) and would
    # show as one flat colour on a -1..1 scale.
    lo = float(similarity.min())
    im = ax.imshow(mosaic.numpy(), cmap=cmap, vmin=lo, vmax=1.0, interpolation="nearest")
    tile = similarity.shape[-1] + 1
    ax.set_xticks([c * tile + (tile - 2) / 2 for c in range(gw)], [str(c + 1) for c in range(gw)], fontsize=7)
    ax.set_yticks([r * tile + (tile - 2) / 2 for r in range(gh)], [str(r + 1) for r in range(gh)], fontsize=7)
    ax.tick_params(length=0)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="cosine similarity")
    ax.set_title(f"Position embedding similarity\n{label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ssl_vit.viz.images import load_images
    from ssl_vit.viz.patches import position_similarity
    from ssl_vit.viz.source import load_viz_model

    model = load_viz_model(args.checkpoint, args.model, args.pos_embed, args.seed)
    backbone = model.backbone
    size = backbone.patch_embed.img_size[0]
    images, _ = load_images(args.image, size, n=1, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        draw_patches(images[0], backbone.patch_embed.patch_size[0], backbone.num_prefix_tokens, model.label,
                     out / "patches.png"),
        draw_similarity(position_similarity(backbone), model.label, out / "position_similarity.png"),
    ]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
