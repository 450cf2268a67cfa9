"""Frozen features: pooling, eval mode, one gathered pass with no sample lost or repeated, the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ssl_vit.eval.features import (
    cached_features,
    checkpoint_fingerprint,
    extract_features,
    feature_cache_key,
    pool_features,
)
from ssl_vit.eval.knn import knn_accuracy
from ssl_vit.models import create_backbone

TINY = dict(depth=2, embed_dim=64, num_heads=2, img_size=16)


def _reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _accelerator():
    from accelerate import Accelerator

    _reset_accelerate()
    return Accelerator(cpu=True)


class _Images(torch.utils.data.Dataset):
    """n deterministic 16x16 images; label = index % 3, so order and duplicates are visible."""

    def __init__(self, n: int):
        self.x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": torch.tensor(i)}


def _backbone(**kw):
    torch.manual_seed(0)
    return create_backbone("vit_nano_patch4_32", **TINY, **kw)


def test_pool_features__token_is_timm_pre_logits_and_avg_is_mean_of_patch_tokens():
    model = _backbone().eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(pool_features(model, x, "token"), model.forward_head(tokens, pre_logits=True))
        torch.testing.assert_close(pool_features(model, x, "token"), tokens[:, 0])
        torch.testing.assert_close(pool_features(model, x, "avg"), tokens[:, 1:].mean(1))


def test_pool_features__avg_backbone_keeps_its_fc_norm():
    model = _backbone(global_pool="avg").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model.fc_norm(model.forward_features(x)[:, 1:].mean(1))
        torch.testing.assert_close(pool_features(model, x, "avg"), expected)


def test_extract_features__eval_mode_no_grad_and_backbone_unchanged_for_batchnorm_model():
    model = timm.create_model("resnet10t", num_classes=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(_Images(5), batch_size=2)
    feats, labels = extract_features(model, loader, _accelerator())
    assert model.training  # the caller's mode is restored
    for k, v in model.state_dict().items():  # weights and running statistics untouched
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        expected = model.eval()(_Images(5).x)
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)
    assert labels.tolist() == list(range(5))
    assert not feats.is_inference() and not feats.requires_grad


def test_extract_features__uneven_last_batch_keeps_every_sample_once_in_order():
    model = _backbone()
    feats, labels = extract_features(model, DataLoader(_Images(7), batch_size=3), _accelerator())
    assert labels.tolist() == list(range(7))
    with torch.no_grad():
        expected = pool_features(model.eval(), _Images(7).x)
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)


def _features_worker(out_dir: str, n: int, batch_size: int) -> None:
    """One process of a (1 or 2)-process run: gathered features + kNN, written by the main process."""
    from accelerate import Accelerator

    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    model = _backbone()
    feats, labels = extract_features(model, DataLoader(_Images(n), batch_size=batch_size), accelerator)
    train_f, train_y = feats[: n // 2], labels[: n // 2] % 3
    query_f, query_y = feats[n // 2 :], labels[n // 2 :] % 3
    knn = knn_accuracy(train_f, train_y, query_f, query_y, 3, ks=[1, 3, 5])
    if accelerator.is_main_process:
        name = f"np{accelerator.num_processes}"
        save_file({"features": feats, "labels": labels}, os.path.join(out_dir, f"{name}.safetensors"))
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump({str(k): v for k, v in knn.items()}, f)
    accelerator.wait_for_everyone()


def _launch(n_proc: int, out_dir, n: int, batch_size: int) -> None:
    """Run `_features_worker` in n_proc fresh processes (torchrun): a fork of this process could hang
    in OpenMP once the parent has run a matmul."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_proc}",
           __file__, str(out_dir), str(n), str(batch_size)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_features_and_knn__same_with_one_and_two_processes_on_uneven_last_batch(tmp_path):
    n, batch = 13, 2  # 2 processes x 2 per batch: the last global batch holds 1 real sample
    _features_worker(str(tmp_path), n, batch)  # one process: this one
    _launch(2, tmp_path, n, batch)
    one, two = load_file(str(tmp_path / "np1.safetensors")), load_file(str(tmp_path / "np2.safetensors"))
    assert one["labels"].tolist() == list(range(n))
    assert two["labels"].tolist() == list(range(n))
    torch.testing.assert_close(one["features"], two["features"], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "np1.json").read_text()) == json.loads((tmp_path / "np2.json").read_text())


def test_cached_features__computes_once_then_reads_the_file(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(4, 3), torch.arange(4)

    accelerator = _accelerator()
    parts = {"split": "train", "checkpoint": {"checkpoint": "random"}, "pool": "token"}
    f1, y1, hit1 = cached_features(tmp_path, parts, compute, accelerator)
    f2, y2, hit2 = cached_features(tmp_path, parts, compute, accelerator)
    assert (hit1, hit2, len(calls)) == (False, True, 1)
    assert torch.equal(f1, f2) and torch.equal(y1, y2)
    _, _, hit3 = cached_features(tmp_path, {**parts, "pool": "avg"}, compute, accelerator)
    assert not hit3 and len(calls) == 2


def test_cached_features__unreadable_file_is_recomputed(tmp_path):
    accelerator = _accelerator()
    parts = {"split": "eval"}
    path = tmp_path / f"eval-{feature_cache_key(parts)}.safetensors"
    path.write_bytes(b"not a safetensors file")
    feats, _, hit = cached_features(tmp_path, parts, lambda: (torch.ones(2, 2), torch.zeros(2)), accelerator)
    assert not hit and torch.equal(feats, torch.ones(2, 2))
    assert torch.equal(load_file(str(path))["features"], torch.ones(2, 2))


def test_checkpoint_fingerprint__changes_when_the_weights_file_changes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    weights = run / "backbone.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights))
    (run / "other.txt").write_text("not part of the weights")
    first = checkpoint_fingerprint(str(run))
    assert [f[0] for f in first["files"]] == ["backbone.safetensors"]
    assert checkpoint_fingerprint(str(weights))["checkpoint"] == str(weights.resolve())
    save_file({"w": torch.zeros(3)}, str(weights))
    assert checkpoint_fingerprint(str(run)) != first
    assert feature_cache_key({"checkpoint": first}) != feature_cache_key({"checkpoint": checkpoint_fingerprint(str(run))})


def test_checkpoint_fingerprint__missing_path_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint=random"):
        checkpoint_fingerprint(str(tmp_path / "nope"))


if __name__ == "__main__":  # a torchrun worker of the multi-process test
    _features_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
