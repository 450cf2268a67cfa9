"""Interleaved rounds, per-round ratios and memory measurement (no timing assertions)."""

from __future__ import annotations

import pytest
import torch

from ssl_vit.bench import Case, measure_memory, median_ratio, run_rounds

CPU = torch.device("cpu")


def test_run_rounds__one_time_per_round_per_case_and_order_alternates():
    calls: list[str] = []
    cases = [Case(n, "g", "ours", lambda n=n: calls.append(n), images=4) for n in ("a", "b", "c")]
    times = run_rounds(cases, CPU, rounds=3, steps=2, warmup=1)
    assert set(times) == {"a", "b", "c"} and all(len(t) == 3 for t in times.values())
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    timed = calls[3:]
    assert timed[:6] == ["a", "a", "b", "b", "c", "c"]  # round 1 forward
    assert timed[6:12] == ["c", "c", "b", "b", "a", "a"]  # round 2 backward
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_run_rounds__rejects_zero_rounds():
    with pytest.raises(ValueError, match="rounds"):
        run_rounds([Case("a", "g", "ours", lambda: None, 1)], CPU, rounds=0, steps=1)


def test_median_ratio__is_median_of_reference_over_ours_per_round():
    ours = [1.0, 2.0, 1.0]
    reference = [2.0, 2.0, 3.0]  # per-round ratios 2, 1, 3
    assert median_ratio(ours, reference) == 2.0


def test_median_ratio__needs_matching_rounds():
    with pytest.raises(ValueError):
        median_ratio([1.0], [1.0, 2.0])


def test_measure_memory__cpu_peak_counts_activations_and_tracked_weights():
    layer = torch.nn.Linear(256, 256)  # 256 KiB of weights + 1 KiB bias
    x = torch.randn(1024, 256)  # 1 MiB input, not created by the step

    def step():
        layer(x).sum().backward()  # a 1 MiB output, a 256 KiB weight gradient, ...

    untracked = measure_memory(step, CPU)
    tracked = measure_memory(step, CPU, track=(layer,))
    assert tracked["kind"] == "cpu_tensors" and tracked["rss_peak_mib"] > 0
    assert 1.0 <= untracked["peak_mib"] < 3.0
    # the tracked weights (256 KiB) count too; the gradient is counted either way (backward writes it)
    assert tracked["peak_mib"] - untracked["peak_mib"] >= 0.25


def test_measure_memory__freed_temporaries_do_not_accumulate():
    def step():
        for _ in range(10):
            torch.ones(2**18).sum()  # 1 MiB each, freed at once

    assert measure_memory(step, CPU)["peak_mib"] < 2.5
