"""recipes/knn.py, linear_probe.py, finetune.py and their configs: parsing, paper values, end-to-end runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ssl_vit.config import load_config
from ssl_vit.eval.config import FinetuneEvalConfig, KNNEvalConfig, LinearProbeEvalConfig

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = {"knn": KNNEvalConfig, "linear_probe": LinearProbeEvalConfig, "finetune": FinetuneEvalConfig}
CONTRACT = {
    "protocol", "method", "checkpoint", "model", "dataset", "split", "hyperparameters", "seeds", "top1", "top5",
    "top1_std", "top5_std", "per_seed", "seconds", "n_train", "n_eval", "pretrain",
}
# Tiny everything: 64 + 32 synthetic images of 16x16, a 2-block 64-wide ViT.
TINY = [
    "data.synthetic_train_size=64", "data.synthetic_eval_size=32", "data.image_size=16", "data.num_workers=0",
    "model.name=vit_nano_patch4_32", "model.args.depth=2", "model.args.embed_dim=64", "model.args.num_heads=2",
]


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("protocol", list(SCHEMAS))
def test_eval_configs__default_cifar10_and_paper_exist_parse_and_start_with_the_launch_command(protocol):
    paths = sorted((ROOT / "recipes" / "configs").glob(f"{protocol}_*.yaml"))
    assert {p.name.split("_")[-1] for p in paths} >= {"default.yaml", "cifar10.yaml", "imagenet.yaml"}
    for path in paths:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and f"recipes/{protocol}.py" in first and "->" in first, path.name
        cfg = load_config(SCHEMAS[protocol], [], default_file=path)
        assert cfg.checkpoint == "random"
    default = load_config(SCHEMAS[protocol], [], default_file=load_recipe(protocol).DEFAULT_CONFIG)
    assert default.data.name == "synthetic" and default.model.name == "vit_nano_patch4_32"


def test_paper_configs__hold_the_published_protocols():
    cfg_dir = ROOT / "recipes" / "configs"
    knn = load_config(KNNEvalConfig, [], default_file=cfg_dir / "knn_vit_base_imagenet.yaml")
    assert knn.knn.ks == [10, 20, 100, 200] and knn.knn.report_k == 20 and knn.knn.temperature == 0.07
    lp = load_config(LinearProbeEvalConfig, [], default_file=cfg_dir / "linear_probe_mae_vit_base_imagenet.yaml")
    assert lp.probe.mode == "augment" and lp.optim.name == "lars" and lp.optim.blr == 0.1
    assert lp.optim.weight_decay == 0 and lp.train.epochs == 90 and lp.optim.warmup_epochs == 10
    assert lp.train.batch_size * lp.train.grad_accum_steps * 8 == 16384 and lp.features.pool == "token"
    ft = load_config(FinetuneEvalConfig, [], default_file=cfg_dir / "finetune_mae_vit_base_imagenet.yaml")
    assert (ft.optim.name, ft.optim.blr, ft.optim.layer_decay, ft.optim.weight_decay) == ("adamw", 5e-4, 0.65, 0.05)
    assert ft.train.epochs == 100 and ft.optim.warmup_epochs == 5 and ft.train.batch_size * 8 == 1024
    assert (ft.model.drop_path_rate, ft.model.global_pool) == (0.1, "avg")
    assert (ft.supervised.label_smoothing, ft.supervised.mixup, ft.supervised.cutmix) == (0.1, 0.8, 1.0)
    assert ft.data.auto_augment == "rand-m9-mstd0.5-inc1" and ft.data.reprob == 0.25


def _check_contract(metrics: dict, out: Path, protocol: str, seeds: list[int]) -> None:
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert CONTRACT <= set(on_disk), CONTRACT - set(on_disk)
    assert on_disk["protocol"] == protocol and on_disk["seeds"] == seeds and on_disk["dataset"] == "synthetic"
    assert [r["seed"] for r in on_disk["per_seed"]] == seeds
    assert 0 <= on_disk["top1"] <= on_disk["top5"] <= 100
    assert on_disk["n_train"] == 64 and on_disk["n_eval"] == 32 and on_disk["seconds"] > 0
    assert any((out / "tb").rglob("events.out.tfevents.*")) or any(out.rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_knn_recipe__runs_end_to_end_from_a_run_folder_with_seeds_flag(tmp_path):
    from ssl_vit.engine import save_backbone
    from ssl_vit.models import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("vit_nano_patch4_32", depth=2, embed_dim=64, num_heads=2, img_size=16)
    save_backbone(backbone, tmp_path / "pre", objective="mae", step=7, images_seen=448, seconds=2.0, images_per_sec=224.0)
    out = tmp_path / "knn"
    metrics = load_recipe("knn").main([
        *TINY, f"output_dir={out}", f"checkpoint={tmp_path / 'pre'}", f"features.cache_dir={tmp_path / 'cache'}",
        "--seeds", "0", "1",
    ])
    _check_contract(metrics, out, "knn", [0, 1])
    assert metrics["method"] == "mae" and metrics["model"] == "vit_nano_patch4_32"
    assert metrics["pretrain"] == {"steps": 7, "images_seen": 448, "seconds": 2.0, "images_per_sec": 224.0}
    assert set(metrics["by_k"]) == {"10", "20", "100", "200"} and metrics["top1"] == metrics["by_k"]["20"]
    assert metrics["top1_std"] == 0.0  # a saved checkpoint: kNN is deterministic
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # train + eval features, once


@pytest.mark.slow
def test_linear_probe_recipe__random_init_sweep_on_cached_features(tmp_path):
    out = tmp_path / "lp"
    metrics = load_recipe("linear_probe").main([
        *TINY, f"output_dir={out}", "checkpoint=random", f"features.cache_dir={tmp_path / 'cache'}",
        "train.epochs=5", "train.batch_size=32", "optim.warmup_epochs=1", "probe.lrs=[0.01,0.1]", "seeds=[0,1]",
    ])
    _check_contract(metrics, out, "linear_probe", [0, 1])
    assert metrics["method"] == "random" and metrics["pretrain"] == {}
    assert [s["blr"] for s in metrics["sweep"]] == [0.01, 0.1]
    assert metrics["top1"] == max(s["top1"] for s in metrics["sweep"])
    assert metrics["hyperparameters"]["blr"] == metrics["best_blr"]
    # A random init is redrawn per seed: its features are cached per seed (2 seeds x 2 splits).
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4


@pytest.mark.slow
def test_linear_probe_recipe__paper_path_trains_through_the_engine(tmp_path):
    out = tmp_path / "lpa"
    metrics = load_recipe("linear_probe").main([
        *TINY, f"output_dir={out}", "probe.mode=augment", "train.max_steps=2", "train.batch_size=16",
        "optim.warmup_epochs=0", "optim.name=lars",
    ])
    _check_contract(metrics, out, "linear_probe", [0])
    assert (out / "seed_0" / "checkpoint-last").is_dir()
    assert metrics["hyperparameters"]["mode"] == "augment"


@pytest.mark.slow
def test_finetune_recipe__random_init_runs_resumes_and_reports_ema(tmp_path):
    out = tmp_path / "ft"
    args = [*TINY, f"output_dir={out}", "checkpoint=random", "train.max_steps=2", "train.batch_size=16",
            "train.ema=true", "train.ema_decay=0.5", "optim.warmup_epochs=0"]
    metrics = load_recipe("finetune").main(args)
    _check_contract(metrics, out, "finetune", [0])
    assert metrics["per_seed"][0]["steps"] == 2 and "ema_top1" in metrics
    assert metrics["hyperparameters"]["layer_decay"] == 0.75 and metrics["hyperparameters"]["global_pool"] == "avg"
    # Relaunched: the finished run resumes at its last step and is only evaluated again.
    again = load_recipe("finetune").main(args)
    assert again["per_seed"][0]["steps"] == 2 and again["top1"] == metrics["top1"]
