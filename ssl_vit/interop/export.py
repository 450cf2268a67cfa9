"""Export a backbone for others: a timm folder (model.safetensors + config.json), a Hub model card, upload.

The timm folder loads with plain timm, offline:

    timm.create_model("local-dir:" + DIR, pretrained=True)
    # or, spelling it out (cfg = the folder's config.json):
    timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                      pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=DIR + "/model.safetensors"))

Passing only `file=` in the overlay works for headless backbones (num_classes=0), but with a head timm
compares num_classes with the *base* architecture's cfg (1000) and silently drops a different-sized head.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch

__all__ = [
    "PushToHubError",
    "RunSummary",
    "export_timm",
    "find_metrics",
    "model_card",
    "push_to_hub",
    "read_run",
]

# Method descriptions for the model card, by objective name.
_METHODS = {
    "mae": ("Masked autoencoder (MAE) pretraining", "He et al. 2021, https://arxiv.org/abs/2111.06377"),
    "supervised": ("Supervised classification pretraining",
                   "Dosovitskiy et al. 2020, https://arxiv.org/abs/2010.11929"),
    "distillation": ("DeiT distillation through a distillation token",
                     "Touvron et al. 2020, https://arxiv.org/abs/2012.12877"),
    "deit": ("DeiT distillation through a distillation token",
             "Touvron et al. 2020, https://arxiv.org/abs/2012.12877"),
}
# Source metadata timm copies from the base architecture's pretrained weights; ours are not those.
_SOURCE_KEYS = ("tag", "license", "paper_ids", "paper_name", "notes", "origin_url", "hf_hub_id", "url")


class PushToHubError(RuntimeError):
    """The upload did not happen (offline, unreachable, not logged in); the folder is still complete."""


# ---------------------------------------------------------------------------------------------------
# timm folder


def export_timm(
    backbone: torch.nn.Module,
    out_dir: str | Path,
    *,
    mean: Iterable[float] | None = None,
    std: Iterable[float] | None = None,
    tag: str = "ssl_vit",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `model.safetensors` + timm's `config.json` for `backbone`; returns the config.

    The weights go through timm's own class (built from `backbone.timm_spec()`, loaded strictly), so
    what is written is exactly what timm will load. `mean`/`std` are the training normalisation.
    """
    import timm
    from timm.models import save_for_hf

    timm_name, model_args = backbone.timm_spec()
    model = timm.create_model(timm_name, pretrained=False, **model_args)
    model.load_state_dict(backbone.state_dict(), strict=True)
    img = backbone.patch_embed.img_size
    data_config: dict[str, Any] = {"input_size": (3, *img), "crop_pct": 1.0}
    if mean is not None:
        data_config["mean"] = tuple(float(m) for m in mean)
    if std is not None:
        data_config["std"] = tuple(float(s) for s in std)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(out), model_args=model_args, safe_serialization=True, data_config=data_config)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    pretrained_cfg = config["pretrained_cfg"]
    for key in _SOURCE_KEYS:
        pretrained_cfg.pop(key, None)
    pretrained_cfg["tag"] = tag
    # How to rebuild this suite's backbone (create_backbone(**spec)); timm ignores unknown top-level keys.
    config["ssl_vit"] = {"spec": dict(getattr(backbone, "spec", {})), **(extra or {})}
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return config


# ---------------------------------------------------------------------------------------------------
# What a run did, for the model card


# objective, step, images_seen(_exact), data, image_size, epochs, spec, mean, std, config (any may be None).
RunSummary = dict[str, Any]


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def read_run(run_dir: str | Path, meta: dict[str, Any] | None = None) -> RunSummary:
    """Summarise a run from its backbone.json (and any *.json next to it that records images seen)."""
    run = Path(run_dir)
    run = run.parent if run.is_file() else run
    if meta is None:
        meta_path = run / "backbone.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    cfg = meta.get("config") or {}
    summary: RunSummary = dict(
        objective=meta.get("objective") or _get(cfg, "objective.name"),
        step=meta.get("step"),
        images_seen=meta.get("images_seen"),
        images_seen_exact=meta.get("images_seen") is not None,
        data=_get(cfg, "data.name"),
        image_size=_get(cfg, "data.image_size"),
        epochs=_get(cfg, "train.epochs"),
        spec=meta.get("model"),
        mean=_get(cfg, "data.mean"),
        std=_get(cfg, "data.std"),
        config=cfg or None,
    )
    if summary["images_seen"] is None:
        # The trainer's summary, wherever it put it: any top-level JSON with an `images_seen` number.
        for path in sorted(run.glob("*.json")):
            try:
                found = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(found, dict) and isinstance(found.get("images_seen"), (int, float)):
                summary.update(images_seen=int(found["images_seen"]), images_seen_exact=True)
                summary["step"] = summary["step"] or found.get("steps") or found.get("step")
                break
    if summary["images_seen"] is None and summary["step"]:
        per_step = (_get(cfg, "train.batch_size") or 0) * (_get(cfg, "train.grad_accum_steps") or 1)
        if per_step:  # a lower bound: the number of processes is not recorded
            summary.update(images_seen=int(summary["step"]) * per_step, images_seen_exact=False)
    return summary


def find_metrics(run_dir: str | Path | None, extra_files: Iterable[str | Path] = ()) -> list[dict[str, Any]]:
    """Evaluation results: `metrics.json` files given or found under the run dir.

    Each file holds a dict (or a list of dicts) with `protocol`, `top1`, `top5`, `dataset`.
    """
    paths = [Path(p) for p in extra_files]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"metrics file not found: {p}")
    if run_dir is not None and Path(run_dir).is_dir():
        paths += sorted(p for p in Path(run_dir).rglob("metrics.json") if p not in paths)
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        for item in data if isinstance(data, list) else [data]:
            if isinstance(item, dict) and ("top1" in item or "protocol" in item):
                rows.append({**item, "_file": str(path)})
    return rows


# ---------------------------------------------------------------------------------------------------
# Model card


def _fmt_count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit} ({int(n):,})"
    return f"{int(n):,}"


def _fmt_size(size: Any) -> str:
    if isinstance(size, (list, tuple)):
        return "x".join(str(s) for s in size)
    return f"{size}x{size}" if size else "unknown"


def _fmt_metric(v: Any) -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.2f}" if v <= 1.0 else f"{v:.2f}"  # fractions shown as percentages


def model_card(
    config: dict[str, Any],
    run: RunSummary,
    metrics: list[dict[str, Any]],
    *,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    num_params: int | None = None,
) -> str:
    """A Hugging Face model card (README.md) for an exported timm folder."""
    objective = run.get("objective") or "unknown"
    base_objective = objective.removeprefix("imported-")
    method, paper = _METHODS.get(base_objective, (f"`{objective}` pretraining", None))
    if objective.startswith("imported-"):
        method, paper = f"weights imported from a {base_objective} checkpoint (their training is not recorded)", None
    arch, model_args = config["architecture"], config.get("model_args", {})
    data = run.get("data") or "unknown"
    tags = ["image-feature-extraction", "timm", "ssl_vit", "vision-transformer", base_objective]
    front = [
        "---",
        "library_name: timm",
        f"license: {license}",
        "pipeline_tag: image-feature-extraction",
        "tags:",
        *[f"- {t}" for t in dict.fromkeys(tags)],
        "---",
    ]
    name = repo_id or f"{(run.get('spec') or {}).get('name', arch)} ({base_objective})"
    spec = run.get("spec") or config.get("ssl_vit", {}).get("spec") or {}
    lines = [
        f"# {name}",
        "",
        f"A Vision Transformer pretrained with **{method}** using ssl_vit (Accelerate + timm). "
        f"The weights are in timm's `{arch}` layout.",
        "",
        "## Pretraining",
        "",
        "| | |",
        "|---|---|",
        f"| Method | {method}" + (f" ({paper})" if paper else "") + " |",
        f"| Backbone | `{spec.get('name', arch)}` (timm `{arch}` with {json.dumps(model_args, sort_keys=True)}) |",
        f"| Parameters | {_fmt_count(num_params)} |" if num_params else "| Parameters | unknown |",
        f"| Data | {data} |",
        f"| Image size | {_fmt_size(model_args.get('img_size', run.get('image_size')))} |",
        f"| Optimizer steps | {run.get('step') if run.get('step') is not None else 'unknown'} |",
        f"| Images seen | {_fmt_count(run.get('images_seen'))}"
        + ("" if run.get("images_seen_exact", True) or run.get("images_seen") is None
           else " (steps x batch per process)")
        + " |",
        "",
        "## Evaluation",
        "",
    ]
    if metrics:
        lines += ["| Protocol | Dataset | Top-1 (%) | Top-5 (%) |", "|---|---|---|---|"]
        for m in metrics:
            lines.append(
                f"| {m.get('protocol', '?')} | {m.get('dataset', data)} | {_fmt_metric(m.get('top1'))} | "
                f"{_fmt_metric(m.get('top5'))} |"
            )
    else:
        lines.append("No evaluation results were recorded with this run (no metrics.json found).")
    pc = config.get("pretrained_cfg", {})
    headless = base_objective == "mae" or config.get("num_classes") == 0
    head = "not trained by this objective (features only)." if headless else f"{config.get('num_classes')}-way."
    lines += [
        "",
        "## Use with timm",
        "",
        "```python",
        "import timm, torch",
        "",
        f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True)'
        if repo_id
        else 'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)',
        "model.eval()",
        f"x = torch.randn(1, {', '.join(str(n) for n in pc.get('input_size', (3, 224, 224)))})"
        f"  # images normalised with mean={pc.get('mean')}, std={pc.get('std')}",
        "features = model.forward_features(x)  # (1, tokens, dim)",
        "```",
        "",
        f"The classifier head is {head}",
        "",
    ]
    return "\n".join(front + lines)


# ---------------------------------------------------------------------------------------------------
# Upload


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created if missing); returns its URL.

    Raises `PushToHubError` naming the cause when the Hub cannot be reached or refuses.
    """
    from huggingface_hub import HfApi, constants

    hint = f"The folder {folder} is complete; upload it later with `hf upload {repo_id} {folder}`."
    if constants.HF_HUB_OFFLINE:
        raise PushToHubError(f"cannot upload to the Hub: HF_HUB_OFFLINE is set. Unset it when online. {hint}")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload ssl_vit export")
    except Exception as e:  # network, auth and HTTP errors come from several libraries
        cause = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        raise PushToHubError(
            f"upload of {folder} to {repo_id} on {where} failed ({cause}). Check the network and that you are "
            f"logged in (`hf auth login` or HF_TOKEN). {hint}"
        ) from e
    return str(url)
