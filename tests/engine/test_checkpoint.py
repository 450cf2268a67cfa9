"""The exported backbone (timm keys, load_backbone) and the atomic checkpoint swap."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch

from ssl_vit.engine import checkpoint as ckpt
from ssl_vit.engine.checkpoint import CheckpointError, load_backbone, save_backbone
from ssl_vit.models import create_backbone
from ssl_vit.models.config import ModelConfig


def small(**kw):
    kwargs = dict(depth=2, embed_dim=32, num_heads=2, img_size=16, num_classes=5)
    kwargs.update(kw)
    torch.manual_seed(0)
    return create_backbone("vit_nano_patch4_32", **kwargs)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name, kw", [("vit_nano_patch4_32", {}), ("deit_nano_distilled_patch4_32", {}), ("vit_nano_patch4_32", {"global_pool": "avg"})])
def test_save_backbone__loads_into_timm_create_model_strictly(tmp_path, name, kw):
    torch.manual_seed(0)
    backbone = create_backbone(name, depth=2, embed_dim=32, num_heads=2, img_size=16, num_classes=5, **kw)
    path = save_backbone(backbone, tmp_path, objective="toy", step=3)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["model"] == backbone.spec and meta["objective"] == "toy" and meta["step"] == 3
    timm_name, timm_kwargs = meta["timm"]
    model = timm.create_model(timm_name, pretrained=False, **timm_kwargs)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model.eval()(x), backbone.eval()(x), atol=1e-5)


def test_load_backbone__output_dir_and_file_rebuild_the_saved_architecture(tmp_path):
    backbone = small()
    save_backbone(backbone, tmp_path)
    assert same_weights(load_backbone(tmp_path), backbone)
    # A default ModelConfig (another name) does not change the saved architecture.
    loaded = load_backbone(tmp_path / "backbone.safetensors", ModelConfig())
    assert same_weights(loaded, backbone) and loaded.embed_dim == 32


def test_load_backbone__other_num_classes_gets_a_fresh_head(tmp_path):
    save_backbone(small(), tmp_path)
    loaded = load_backbone(tmp_path, num_classes=7)
    assert loaded.head.out_features == 7
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, small().blocks[0].attn.qkv.weight)
    assert load_backbone(tmp_path, num_classes=0).num_classes == 0


def test_load_backbone__new_image_size_resizes_pos_embed(tmp_path):
    save_backbone(small(), tmp_path)
    loaded = load_backbone(tmp_path, ModelConfig(img_size=32))
    assert loaded.pos_embed.shape == (1, 1 + 64, 32)
    assert loaded(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_load_backbone__avg_pool_fine_tune_drops_the_final_norm_as_mae(tmp_path):
    save_backbone(small(), tmp_path)
    loaded = load_backbone(tmp_path, ModelConfig(global_pool="avg", drop_path_rate=0.1))
    assert loaded.global_pool == "avg" and hasattr(loaded.fc_norm, "weight")
    assert torch.equal(loaded.blocks[1].mlp.fc1.weight, small().blocks[1].mlp.fc1.weight)


def test_load_backbone__timm_convnet_run_keeps_its_classifier(tmp_path):
    # A ResNet teacher trained by the supervised recipe names its classifier `fc`, not `head`.
    from ssl_vit.models import create_model

    net = create_model("resnet18", num_classes=7)
    save_backbone(net, tmp_path / "backbone.safetensors", objective="supervised", step=1)
    loaded = load_backbone(tmp_path)
    assert loaded.num_classes == 7
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_load_backbone__distilled_checkpoint_keeps_token_pooling_when_avg_is_asked(tmp_path):
    # The fine-tune default pools the average; a DeiT checkpoint's heads read its two tokens instead.
    model = create_backbone("deit_nano_distilled_patch4_32", num_classes=4)
    save_backbone(model, tmp_path / "backbone.safetensors", objective="deit", step=1)
    loaded = load_backbone(tmp_path, ModelConfig(name="deit_nano_distilled_patch4_32", global_pool="avg"), num_classes=4)
    assert loaded.global_pool == "token" and loaded.distilled
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_load_backbone__random_builds_the_model_config():
    model = load_backbone("random", ModelConfig(name="vit_nano_patch4_32", img_size=16, args={"depth": 1}), num_classes=3)
    assert len(model.blocks) == 1 and model.head.out_features == 3
    with pytest.raises(CheckpointError, match="needs model_cfg"):
        load_backbone("random")


def test_load_backbone__missing_path_says_what_is_accepted(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*output_dir"):
        load_backbone(tmp_path / "nope")


def test_load_backbone__plain_timm_state_dict_goes_through_the_converter(tmp_path):
    backbone = small(num_classes=0)
    torch.save(backbone.state_dict(), tmp_path / "weights.pth")
    loaded = load_backbone(tmp_path / "weights.pth", num_classes=0)
    assert same_weights(loaded, backbone)


# ---------------------------------------------------------------------------------------------------
# Atomic swap


def write(tmp_path, step: int) -> None:
    folder = ckpt.temp_dir(tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.write_checkpoint_files(folder, model_state={"w": torch.full((2,), float(step))}, rng_state={"x": step})
    ckpt.swap_in(tmp_path, {"step": step})


def step_of(tmp_path) -> int:
    return ckpt.read_trainer_state(tmp_path / ckpt.CHECKPOINT)["step"]


def test_swap_in__replaces_checkpoint_last_and_leaves_nothing_else(tmp_path):
    write(tmp_path, 1)
    write(tmp_path, 2)
    assert step_of(tmp_path) == 2
    assert sorted(os.listdir(tmp_path)) == [ckpt.CHECKPOINT]
    assert torch.equal(ckpt.read_model_state(tmp_path / ckpt.CHECKPOINT)["w"], torch.full((2,), 2.0))


@pytest.mark.parametrize("fail_at_replace", [1, 2, 3])
def test_swap_in__crash_at_any_rename_keeps_a_complete_checkpoint(tmp_path, monkeypatch, fail_at_replace):
    write(tmp_path, 1)
    calls = {"n": 0}
    real_replace = os.replace

    def crashing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == fail_at_replace:
            raise KeyboardInterrupt("killed during the swap")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, 2)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    found = ckpt.recover(tmp_path)
    assert found == tmp_path / ckpt.CHECKPOINT and ckpt.is_complete(found)
    # Replaces: 1 completes the new one's trainer_state.json, 2 moves the old one aside, 3 moves the
    # new one in. A crash before the 3rd has finished leaves the old one, complete, as checkpoint-last.
    assert step_of(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == [ckpt.CHECKPOINT]


def test_recover__never_picks_up_a_half_written_checkpoint(tmp_path):
    write(tmp_path, 1)
    half = ckpt.temp_dir(tmp_path)
    ckpt.write_checkpoint_files(half, model_state={"w": torch.zeros(2)})  # no trainer_state.json yet
    assert ckpt.recover(tmp_path) == tmp_path / ckpt.CHECKPOINT
    assert step_of(tmp_path) == 1 and not half.exists()


def test_is_complete__needs_a_valid_trainer_state(tmp_path):
    assert not ckpt.is_complete(tmp_path)
    (tmp_path / ckpt.STATE_FILE).write_text("{trunc")
    assert not ckpt.is_complete(tmp_path)
    assert ckpt.recover(tmp_path / "empty") is None


def test_accelerate_configs__parse_with_accelerate():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "accelerate"
    kinds = {p.name: load_config_from_file(str(p)).distributed_type.value for p in folder.glob("*.yaml")}
    assert kinds == {"cpu.yaml": "NO", "multi_gpu.yaml": "MULTI_GPU", "multi_gpu_bf16.yaml": "MULTI_GPU", "fsdp_vit_large.yaml": "FSDP"}
    fsdp = load_config_from_file(str(folder / "fsdp_vit_large.yaml")).fsdp_config
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Block" and fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"  # one file per process (engine/fsdp.py)
