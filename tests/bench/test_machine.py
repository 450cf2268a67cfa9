"""Machine description and the matmul peak (a short run; no speed assertion)."""

from __future__ import annotations

import torch

from ssl_vit.bench import machine_info, machine_label, matmul_peak


def test_machine_info__names_cpu_cores_and_versions():
    info = machine_info(torch.device("cpu"))
    for key in ("cpu", "cores", "torch_threads", "torch", "timm", "transformers", "onednn_linear"):
        assert key in info
    assert "gpu" not in info
    label = machine_label(info)
    assert info["cpu"] in label and f"{info['cores']} cores" in label and info["torch"] in label


def test_matmul_peak__positive_and_the_best_backend():
    peak = matmul_peak(torch.device("cpu"), size=128, seconds=0.05)
    assert peak["flops_per_s"] > 0 and peak["size"] == 128 and peak["dtype"] == "float32"
    assert peak["flops_per_s"] == max(peak["by_backend"].values())
    assert "torch.mm" in peak["by_backend"]
