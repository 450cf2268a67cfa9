"""Evaluation of any checkpoint by the same code: weighted kNN, linear probe, full fine-tune.

    run_knn(load_config(KNNEvalConfig, argv))            # recipes/knn.py
    run_linear_probe(load_config(LinearProbeEvalConfig, argv))  # recipes/linear_probe.py
    run_finetune(load_config(FinetuneEvalConfig, argv))  # recipes/finetune.py

Each writes `output_dir/metrics.json` (the contract `tools/compare.py` reads, see eval/common.py).
"""

from ssl_vit.eval.config import (
    FeaturesConfig,
    FinetuneEvalConfig,
    KNNConfig,
    KNNEvalConfig,
    LinearProbeEvalConfig,
    ProbeConfig,
    translate_seeds_flag,
)
from ssl_vit.eval.features import cached_features, extract_features, pool_features
from ssl_vit.eval.finetune import run_finetune
from ssl_vit.eval.knn import knn_accuracy, knn_predict, run_knn
from ssl_vit.eval.linear_probe import LinearProbeObjective, run_linear_probe, train_probe_on_features

__all__ = [
    "FeaturesConfig",
    "FinetuneEvalConfig",
    "KNNConfig",
    "KNNEvalConfig",
    "LinearProbeEvalConfig",
    "LinearProbeObjective",
    "ProbeConfig",
    "cached_features",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "pool_features",
    "run_finetune",
    "run_knn",
    "run_linear_probe",
    "train_probe_on_features",
    "translate_seeds_flag",
]
