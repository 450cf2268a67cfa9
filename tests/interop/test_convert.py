"""Importing timm / DeiT / MAE / Hugging Face checkpoints: same features after conversion, unsafe files refused."""

from __future__ import annotations

import argparse
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from ssl_vit.interop import (
    UnknownCheckpointError,
    UnsafeCheckpointError,
    build_backbone,
    save_ours,
    to_backbone_state_dict,
)
from ssl_vit.models import create_backbone

ATOL = 1e-5


def _images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values everywhere (zero-initialised tokens and heads would hide key mix-ups)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + float(is_norm_scale))
    return model.eval()


def _tiny(name: str = "vit_nano_patch4_32", **kw):
    return _randomise(create_backbone(name, depth=2, img_size=16, **kw))


# -- timm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pth"])
def test_timm_state_dict__converts_with_equal_features(tmp_path, suffix):
    ref = _randomise(
        timm.create_model(
            "vit_tiny_patch16_224", embed_dim=128, depth=2, num_heads=4, patch_size=4, img_size=16, num_classes=7
        )
    )
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(ref.state_dict(), str(path))
    else:
        torch.save(ref.state_dict(), path)
    ours, info = build_backbone(path)
    assert info.format == "timm"
    assert info.arch["num_heads"] == 4 and info.arch["num_classes"] == 7 and info.arch["img_size"] == 16
    x = _images()
    with torch.no_grad():
        _close(ours.forward_features(x), ref.forward_features(x))
        _close(ours(x), ref(x))


def test_timm_train_checkpoint__unwraps_state_dict_and_module_prefix(tmp_path):
    ref = _tiny()
    ckpt = {
        "epoch": 3,
        "arch": "vit_tiny_patch16_224",
        "state_dict": {"module." + k: v for k, v in ref.state_dict().items()},
        "args": argparse.Namespace(model="vit_tiny_patch16_224", lr=1e-3),
        "metric": 71.5,
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth.tar")
    ours, info = build_backbone(tmp_path / "checkpoint.pth.tar")
    with torch.no_grad():
        _close(ours.forward_features(_images()), ref.forward_features(_images()))


def test_unusual_width__heads_guessed_with_note_and_taken_when_given(tmp_path):
    ref = _randomise(
        timm.create_model("vit_tiny_patch16_224", embed_dim=96, depth=1, num_heads=3, patch_size=4, img_size=16)
    )
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    _, guessed = to_backbone_state_dict(tmp_path / "w.pth")
    assert guessed.arch["num_heads"] == 1 and any("num_heads" in n for n in guessed.notes)
    ours, given = build_backbone(tmp_path / "w.pth", num_heads=3)
    assert given.arch["num_heads_source"] == "given"
    with torch.no_grad():
        _close(ours.forward_features(_images()), ref.forward_features(_images()))


# -- facebookresearch/deit and /mae .pth layouts: test_official_layouts.py (written from their code) ----


# -- Hugging Face ----------------------------------------------------------------------------------


def _hf_config(cls, **kw):
    base = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
        patch_size=4, layer_norm_eps=1e-6,
    )
    return cls(**{**base, **kw})


def test_hf_deit_with_teacher__converts_with_equal_features_and_logits(tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(0)
    hf = _randomise(DeiTForImageClassificationWithTeacher(_hf_config(DeiTConfig, num_labels=5)))
    hf.save_pretrained(tmp_path / "hf")  # the Hub's key names + config.json
    ours, info = build_backbone(tmp_path / "hf")
    assert info.format == "hf-deit" and info.arch["distilled"] and info.arch["num_heads_source"] == "config"
    x = _images()
    with torch.no_grad():
        _close(ours.forward_features(x), hf.deit(x).last_hidden_state)
        _close(ours(x), hf(x).logits)


def test_hf_deit_in_memory_keys__transformers5_names_convert(tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    hf = _randomise(DeiTForImageClassificationWithTeacher(_hf_config(DeiTConfig, num_labels=5)))
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    ours, info = build_backbone(tmp_path / "model.safetensors", num_heads=2)
    with torch.no_grad():
        _close(ours(_images()), hf(_images()).logits)


def test_hf_vit_classifier_default_eps__features_within_tolerance(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    hf = _randomise(ViTForImageClassification(_hf_config(ViTConfig, num_labels=4, layer_norm_eps=1e-12)))
    hf.save_pretrained(tmp_path / "hf")
    ours, info = build_backbone(tmp_path / "hf")
    assert info.format == "hf-vit" and any("eps" in n for n in info.notes)
    with torch.no_grad():
        _close(ours.forward_features(_images()), hf.vit(_images()).last_hidden_state)
        _close(ours(_images()), hf(_images()).logits)


def test_hf_vitmae_for_pretraining__encoder_and_decoder_convert(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = _hf_config(
        ViTMAEConfig, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, mask_ratio=0.0,
    )
    hf = ViTMAEForPreTraining(cfg).eval()
    # transformers 5's own key names: its save_pretrained renames the decoder layers to
    # `decoder.decoder_encoder.layer.N`, which is neither the Hub's layout nor the in-memory one.
    (tmp_path / "hf").mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "hf" / "model.safetensors"))
    cfg.to_json_file(str(tmp_path / "hf" / "config.json"))
    ours, info = build_backbone(tmp_path / "hf")
    assert info.format == "hf-vitmae" and info.has_mae_decoder and info.decoder_state_dict
    x = _images()
    noise = torch.arange(16.0).expand(2, -1)  # ascending noise with mask_ratio 0: tokens stay in order
    with torch.no_grad():
        _close(ours.forward_features(x), hf.vit(x, noise=noise).last_hidden_state)


# -- our own format, errors, safety ----------------------------------------------------------------


def test_save_ours__round_trip_keeps_spec_and_features(tmp_path):
    ref = _tiny("deit_nano_distilled_patch4_32", num_classes=0)
    torch.save({"model": ref.state_dict()}, tmp_path / "deit.pth")
    sd, info = to_backbone_state_dict(tmp_path / "deit.pth")
    written = save_ours(tmp_path / "ours", sd, info)
    assert {p.name for p in written} == {"backbone.safetensors", "backbone.json"}
    again, info2 = build_backbone(tmp_path / "ours")
    assert info2.format == "ssl_vit" and info2.spec == info.spec
    with torch.no_grad():
        _close(again.forward_features(_images()), ref.forward_features(_images()))


def test_pickle_with_code__refused_and_never_run(tmp_path):
    class WritesAFile:
        def __init__(self, target):
            self.target = str(target)

        def __reduce__(self):
            return (exec, (f"open({self.target!r}, 'w').write('ran')",))

    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model": _tiny().state_dict(), "extra": WritesAFile(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        to_backbone_state_dict(path)
    assert not marker.exists()
    # The payload is real: plain unpickling runs it.
    control = tmp_path / "control.txt"
    pickle.loads(pickle.dumps(WritesAFile(control)))
    assert control.exists()


def test_not_a_vit__unknown_format_names_the_supported_ones(tmp_path):
    torch.save(timm.create_model("resnet10t", num_classes=2).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(UnknownCheckpointError, match="Supported: ssl_vit"):
        to_backbone_state_dict(tmp_path / "resnet.pth")


def test_folder_without_weights__error_lists_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        to_backbone_state_dict(tmp_path)


def test_engine_layout_ema_file__read_as_ours_with_its_own_json(tmp_path):
    """The trainer writes backbone_ema.safetensors + backbone_ema.json beside backbone.safetensors."""
    import json

    ref = _tiny()
    save_file(ref.state_dict(), str(tmp_path / "backbone_ema.safetensors"))
    (tmp_path / "backbone_ema.json").write_text(json.dumps({"model": ref.spec, "objective": "mae", "step": 7}))
    ours, info = build_backbone(tmp_path / "backbone_ema.safetensors")
    assert info.format == "ssl_vit" and info.spec == ref.spec and info.metadata["step"] == 7
    with torch.no_grad():
        _close(ours.forward_features(_images()), ref.forward_features(_images()))
