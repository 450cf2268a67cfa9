"""Machine description and the matmul peak (a short run; no speed assertion)."""

from __future__ import annotations

import pytest
import torch

from ssl_vit.bench import machine_info, machine_label, matmul_peak
from ssl_vit.bench.machine import cpu_description, datasheet_bf16_peak


def test_machine_info__names_cpu_cores_and_versions():
    info = machine_info(torch.device("cpu"))
    for key in ("cpu", "isa", "cores", "torch_threads", "torch", "timm", "transformers", "onednn_linear"):
        assert key in info
    assert "gpu" not in info
    label = machine_label(info)
    assert info["cpu"] in label and f"{info['cores']} cores" in label and info["torch"] in label


def test_matmul_peak__positive_and_the_best_backend():
    peak = matmul_peak(torch.device("cpu"), size=128, seconds=0.05)
    assert peak["flops_per_s"] > 0 and peak["size"] == 128 and peak["dtype"] == "float32"
    assert peak["flops_per_s"] == max(peak["by_backend"].values())
    assert "torch.mm" in peak["by_backend"]


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 167
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile hypervisor

processor\t: 1
model name\t: another one
"""


def test_cpu_description__model_family_isa_and_hypervisor_from_cpuinfo():
    cpu = cpu_description(CPUINFO)
    assert (cpu["model"], cpu["family"], cpu["model_number"]) == ("Intel(R) Xeon(R) Processor", "6", "167")
    assert cpu["isa"] == ["AVX2", "AVX-512", "AVX512-BF16", "AMX", "AMX-BF16"]
    assert cpu["hypervisor"]  # the vendor from lscpu where present, else "yes"
    assert cpu_description("model name\t: Old CPU\nflags\t\t: sse sse2\n")["isa"] == []


def test_machine_label__names_the_isa():
    info = {"cpu": "Intel(R) Xeon(R) Processor", "cpu_family_model": "family 6 model 167", "hypervisor": "KVM",
            "isa": ["AVX2", "AVX-512", "AMX"], "cores": 2, "torch_threads": 2, "torch": "2.14.1"}
    assert machine_label(info) == (
        "Intel(R) Xeon(R) Processor (KVM, family 6 model 167; AVX2, AVX-512, AMX), 2 cores, 2 threads, torch 2.14.1 (CPU)"
    )
    assert "no AVX2 / AVX-512 / AMX" in machine_label({**info, "isa": [], "hypervisor": None, "cpu_family_model": None})


def test_datasheet_bf16_peak__known_gpus_only():
    assert datasheet_bf16_peak("NVIDIA H200") == pytest.approx(989.4e12)
    assert datasheet_bf16_peak("NVIDIA H100 PCIe") == pytest.approx(756.5e12)
    assert datasheet_bf16_peak("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert datasheet_bf16_peak("Some Future GPU") is None
