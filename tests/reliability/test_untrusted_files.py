"""Files from elsewhere never run code: every load path uses safetensors or torch.load(weights_only=True),
YAML goes through the safe loader, and a crafted pickle is refused by every loader that takes a user's path.

The crafted pickle's `__reduce__` writes a marker file when unpickled: the marker must never appear.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch
from reliability_common import REPO, load_recipe, one_paragraph

from ssl_vit.engine.checkpoint import save_backbone
from ssl_vit.models import create_backbone

TINY = [
    "data.image_size=16",
    "data.synthetic_train_size=16",
    "data.synthetic_eval_size=8",
    "model.args={depth: 1, embed_dim: 32, num_heads: 2}",
    "train.batch_size=4",
    "train.max_steps=1",
    "train.vis_every=0",
]
MAE_TINY = [*TINY, "mae.decoder_dim=16", "mae.decoder_depth=1", "mae.decoder_heads=2"]
SCANNED = ("ssl_vit", "recipes", "tools")
UNPICKLERS = {
    "pickle.load", "pickle.loads", "cPickle.load", "dill.load", "dill.loads", "marshal.loads", "joblib.load",
    "pd.read_pickle", "pandas.read_pickle", "torch.serialization.add_safe_globals",
}
UNSAFE_YAML = {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"}


class WritesAFile:
    """Unpickling this runs `open(target, 'w').write('ran')`: a stand-in for any code in a checkpoint."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('ran')",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint that looks right (real ViT weights) and carries the payload beside them."""
    weights = create_backbone("vit_nano_patch4_32", depth=1, embed_dim=32, num_heads=2, img_size=16).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": weights, "args": WritesAFile(marker)}, path)
    return path


def test_the_payload_is_real__plain_unpickling_runs_it(tmp_path):
    marker = tmp_path / "ran.txt"
    pickle.loads(pickle.dumps(WritesAFile(marker)))
    assert marker.read_text() == "ran"


@pytest.fixture(scope="module")
def recipes():
    return {name: load_recipe(name) for name in ("mae_pretrain", "deit_pretrain", "knn")}


def refused(run, marker: Path, *words: str) -> str:
    with pytest.raises(Exception) as caught:
        run()
    message = str(caught.value)
    assert not marker.exists(), "the checkpoint's code ran"
    assert one_paragraph(message), message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_model_checkpoint__pickle_with_code_refused_by_load_backbone(recipes, tmp_path, layout):
    marker = tmp_path / "ran.txt"
    # A bare .pth, or a Hugging Face-style folder holding pytorch_model.bin.
    path = evil_checkpoint(tmp_path / ("evil.pth" if layout == "file" else "hf/pytorch_model.bin"), marker)
    target = path if layout == "file" else path.parent
    out = tmp_path / "run"
    args = [*MAE_TINY, f"model.checkpoint={target}", f"output_dir={out}"]
    refused(lambda: recipes["mae_pretrain"].main(args), marker, "refusing to load", str(path))
    assert not (out / "backbone.safetensors").exists()


def test_eval_recipe_checkpoint__pickle_with_code_refused(recipes, tmp_path):
    marker = tmp_path / "ran.txt"
    path = evil_checkpoint(tmp_path / "evil.pth", marker)
    args = ["data.image_size=16", "data.synthetic_train_size=16", "data.synthetic_eval_size=8", "data.num_workers=0",
            f"features.cache_dir={tmp_path / 'cache'}", f"checkpoint={path}", f"output_dir={tmp_path / 'knn'}"]
    refused(lambda: recipes["knn"].main(args), marker, "refusing to load")


def test_tools_convert__pickle_with_code_refused_exit_2_nothing_written(tmp_path, capsys):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("reliability_tools_convert", REPO / "tools" / "convert.py")
    convert = module_from_spec(spec)
    spec.loader.exec_module(convert)
    marker = tmp_path / "ran.txt"
    path = evil_checkpoint(tmp_path / "evil.pth", marker)
    assert convert.main([str(path), "--out", str(tmp_path / "ours")]) == 2
    assert not marker.exists() and not (tmp_path / "ours").exists()
    assert "refusing to load" in capsys.readouterr().err


@pytest.mark.parametrize(
    "disguise, says",
    [("pth_with_json", "refusing to load"), ("pickle_named_safetensors", "not a readable safetensors file")],
)
def test_distill_teacher__pickle_with_code_refused(recipes, tmp_path, disguise, says):
    marker = tmp_path / "ran.txt"
    spec = dict(depth=1, embed_dim=32, num_heads=2, img_size=16, num_classes=10)  # fits the student and data
    student_like = create_backbone("vit_nano_patch4_32", **spec)
    save_backbone(student_like, tmp_path / "t")
    if disguise == "pth_with_json":  # teacher.pth + teacher.json (a valid spec) beside it
        teacher = evil_checkpoint(tmp_path / "t" / "teacher.pth", marker)
        (tmp_path / "t" / "backbone.json").rename(teacher.with_suffix(".json"))
    else:  # a run folder whose backbone.safetensors is really a pickle
        evil_checkpoint(tmp_path / "t" / "backbone.safetensors", marker)
        teacher = tmp_path / "t"
    out = tmp_path / "run"
    args = [*TINY, f"distill.teacher={teacher}", f"output_dir={out}"]
    refused(lambda: recipes["deit_pretrain"].main(args), marker, says)
    assert not (out / "backbone.safetensors").exists()


@pytest.mark.parametrize("part", ["optimizer.pt", "rng/rank0.pt", "model.safetensors"])
def test_resume__tampered_checkpoint_file_refused(recipes, tmp_path, part):
    out = tmp_path / "run"
    recipes["mae_pretrain"].main([*MAE_TINY, f"output_dir={out}"])  # a real checkpoint of step 1
    marker = tmp_path / "ran.txt"
    evil_checkpoint(out / "checkpoint-last" / part, marker)
    refused(lambda: recipes["mae_pretrain"].main([*MAE_TINY, "train.max_steps=2", f"output_dir={out}"]), marker, part)
    assert json.loads((out / "backbone.json").read_text())["step"] == 1


def test_yaml_config__python_tags_refused_by_the_safe_loader(recipes, tmp_path):
    from ssl_vit.compare.plan import load_plan

    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"output_dir: !!python/object/apply:builtins.exec [\"open({str(marker)!r}, 'w').write('ran')\"]\n")
    refused(lambda: recipes["mae_pretrain"].main(["--config", str(evil)]), marker, str(evil))
    refused(lambda: load_plan(evil), marker, "python/object/apply")


# ---------------------------------------------------------------------------------------------------
# Static check: no unsafe loader anywhere in the package, recipes and tools


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def unsafe_load_calls(root: Path) -> list[str]:
    """`file:line call` for every loader call that may unpickle or construct arbitrary objects."""
    found = []
    for folder in SCANNED:
        for path in sorted((root / folder).rglob("*.py")):
            for node, func in _calls(path):
                where = f"{path.relative_to(root)}:{node.lineno} {func}(...)"
                if func.endswith("torch.load") or func == "torch.serialization.load":
                    flag = _keyword(node, "weights_only")
                    if not (isinstance(flag, ast.Constant) and flag.value is True):
                        found.append(where + " without weights_only=True")
                elif func in UNPICKLERS:
                    found.append(where)
                elif func in UNSAFE_YAML:
                    found.append(where)
                elif func in ("np.load", "numpy.load"):
                    flag = _keyword(node, "allow_pickle")
                    if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                        found.append(where + " with allow_pickle")
                elif func in ("eval", "exec"):
                    found.append(where)
    return found


def test_static_scan__every_load_is_safetensors_weights_only_or_safe_yaml():
    assert unsafe_load_calls(REPO) == []


def test_static_scan__catches_what_it_looks_for(tmp_path):
    (tmp_path / "ssl_vit").mkdir()
    (tmp_path / "ssl_vit" / "bad.py").write_text(
        "import torch, yaml, pickle, numpy as np\n"
        "torch.load('a')\n"
        "torch.load('b', weights_only=False)\n"
        "torch.load('ok', weights_only=True)\n"
        "yaml.load(open('c'), Loader=yaml.Loader)\n"
        "yaml.safe_load('ok: 1')\n"
        "pickle.loads(b'')\n"
        "np.load('d', allow_pickle=True)\n"
        "msg = \"torch.load('x', weights_only=False)\"  # text in a string is fine\n"
    )
    found = unsafe_load_calls(tmp_path)
    assert [f.split(" ", 1)[0] for f in found] == [f"ssl_vit/bad.py:{n}" for n in (2, 3, 5, 7, 8)], found
