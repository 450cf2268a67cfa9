"""Export a run's backbone as a timm folder (model.safetensors + config.json), a Hub-ready folder, or upload it.

    python tools/export.py --run outputs/mae --out exports/mae                  # timm folder + model card
    python tools/export.py --run outputs/mae --out exports/mae --format timm    # weights + config only
    python tools/export.py --run outputs/mae --out exports/mae --metrics outputs/probe/metrics.json \\
        --push-to-hub you/vit-nano-mae

`--run` is a run's output_dir (backbone.safetensors + backbone.json) or any checkpoint tools/convert.py
reads. The folder is checked by loading it back with timm before anything is uploaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run output_dir, backbone.safetensors, or any importable checkpoint")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--format", choices=["timm", "hub"], default="hub", help="hub = timm folder + README.md model card")
    p.add_argument("--metrics", nargs="*", default=[], help="metrics.json files (protocol, top1, top5, dataset)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub model repo (user/name)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--license", default="apache-2.0", help="license in the model card")
    return p.parse_args(argv)


def check_timm_loads(out: Path, config: dict, backbone: torch.nn.Module) -> float:
    """Load the folder with plain timm, as a user would; the largest feature difference from `backbone`."""
    import timm

    model = timm.create_model(
        config["architecture"],
        pretrained=True,
        # the whole pretrained_cfg, not just `file`: with the base architecture's cfg timm would drop a
        # classifier whose num_classes differs from it (and use its mean/std)
        pretrained_cfg_overlay=dict(config["pretrained_cfg"], file=str(out / "model.safetensors")),
        **config["model_args"],
    ).eval()
    x = torch.randn(2, *config["pretrained_cfg"]["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model.forward_features(x) - backbone.forward_features(x)).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ssl_vit.interop import build_backbone
    from ssl_vit.interop.export import PushToHubError, export_timm, find_metrics, model_card, push_to_hub, read_run

    backbone, info = build_backbone(args.run)
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    if info.format == "ssl_vit":
        run = read_run(run_dir, info.metadata)
    else:
        run = read_run(run_dir, {"objective": f"imported-{info.format}", "model": info.spec})
    objective = run.get("objective") or "unknown"
    out = Path(args.out)
    config = export_timm(
        backbone,
        out,
        mean=run.get("mean"),
        std=run.get("std"),
        tag=f"ssl_vit-{objective}",
        extra={"objective": objective, "step": run.get("step"), "source": str(args.run)},
    )
    diff = check_timm_loads(out, config, backbone)
    if diff > 1e-4:
        print(f"error: timm loads {out} with features {diff:.2e} away from the backbone's", file=sys.stderr)
        return 1
    written = ["model.safetensors", "config.json"]
    if args.format == "hub":
        metrics = find_metrics(run_dir if info.format == "ssl_vit" else None, args.metrics)
        card = model_card(
            config,
            run,
            metrics,
            repo_id=args.push_to_hub,
            license=args.license,
            num_params=sum(p.numel() for p in backbone.parameters()),
        )
        (out / "README.md").write_text(card)
        written.append(f"README.md ({len(metrics)} eval result(s))")
    print(f"wrote {out}: {', '.join(written)}; timm loads it (max feature difference {diff:.1e})")
    print(f"  load it: timm.create_model('local-dir:{out}', pretrained=True)")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except PushToHubError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"uploaded to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
