"""Import a checkpoint you already have (timm, DeiT, MAE, Hugging Face) into this suite's format.

    python tools/convert.py mae_pretrain_vit_base.pth --out checkpoints/mae_base
    python tools/convert.py path/to/hf_deit_folder --out checkpoints/deit_small       # config.json + weights
    python tools/convert.py weights.safetensors --out ckpt --num-heads 6             # width not a standard size

Writes DIR/backbone.safetensors + DIR/backbone.json ({"model": spec, "objective": "imported-<format>",
...}) and DIR/mae_decoder.safetensors when the checkpoint had an MAE decoder; then loads the result
back into the backbone to check it. Files are read with safetensors or torch.load(weights_only=True):
pickles holding other objects are refused.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="weights file (.pth/.pt/.bin/.safetensors) or a folder holding one")
    p.add_argument("--out", required=True, help="folder to write backbone.safetensors + backbone.json into")
    p.add_argument("--num-heads", type=int, help="attention heads, when neither the file nor a config says")
    p.add_argument("--no-verify", action="store_true", help="skip loading the result back into the backbone")
    args = p.parse_args(argv)

    from ssl_vit.interop import (
        UnknownCheckpointError,
        UnsafeCheckpointError,
        build_backbone,
        save_ours,
        to_backbone_state_dict,
    )
    from ssl_vit.models import WeightsMismatchError

    try:
        state_dict, info = to_backbone_state_dict(args.checkpoint, num_heads=args.num_heads)
    except (UnsafeCheckpointError, UnknownCheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    written = save_ours(args.out, state_dict, info)
    arch = info.arch
    print(f"format: {info.format} ({args.checkpoint})")
    print(
        f"model: {json.dumps(info.spec)}  [embed_dim {arch['embed_dim']}, depth {arch['depth']}, "
        f"heads {arch['num_heads']} ({arch['num_heads_source']}), patch {arch['patch_size']}, "
        f"image {arch['img_size']}, distilled {arch['distilled']}, classes {arch['num_classes']}]"
    )
    decoder = "converted" if info.decoder_state_dict else "present, not converted" if info.has_mae_decoder else "none"
    print(f"MAE decoder: {decoder}")
    for note in info.notes:
        print(f"note: {note}")
    if not args.no_verify:
        try:
            build_backbone(args.out)
        except WeightsMismatchError as e:
            print(f"error: the converted weights do not load into the backbone: {e}", file=sys.stderr)
            return 1
    print(f"wrote {', '.join(str(w) for w in written)}" + ("" if args.no_verify else " (loads into the backbone)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
