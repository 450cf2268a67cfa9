"""The MoCo v3 objective against the paper's Algorithm 1, the official code's formulas, and lightly."""

from __future__ import annotations

import math
import os
import pickle
import random
import socket
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules.heads import MoCoProjectionHead
from PIL import Image

from ssl_vit.config import PretrainConfig, load_config
from ssl_vit.data.config import DataConfig
from ssl_vit.engine.optim import param_groups
from ssl_vit.models import create_backbone
from ssl_vit.objectives import OBJECTIVES, build_objective
from ssl_vit.objectives.base import exported_backbone
from ssl_vit.objectives.mocov3 import MoCoV3, MoCoV3Config, contrastive_loss, gather_keys, mlp, momentum_at

IMG, B, HIDDEN, OUT = 16, 8, 64, 16


def tiny_backbone():
    return create_backbone(
        "vit_nano_patch4_32", depth=2, embed_dim=32, num_heads=2, img_size=IMG, pos_embed="sincos", num_classes=0
    )


def tiny_moco(**kwargs) -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(tiny_backbone(), **{"hidden_dim": HIDDEN, "out_dim": OUT, **kwargs})


def views(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(b, 3, IMG, IMG, generator=g), torch.randn(b, 3, IMG, IMG, generator=g)]}


# -- the paper's Algorithm 1, transcribed (Chen, Xie, He 2021, "An Empirical Study of Training
# Self-Supervised Vision Transformers"):
#   for x in loader:
#       x1, x2 = aug(x), aug(x)
#       q1, q2 = f_q(x1), f_q(x2)          # queries: [N, C] each
#       k1, k2 = f_k(x1), f_k(x2)          # keys: [N, C] each
#       loss = ctr(q1, k2) + ctr(q2, k1)   # symmetrized
#       loss.backward(); update(f_q)
#       f_k = m * f_k + (1 - m) * f_q      # momentum update
#   def ctr(q, k):
#       logits = mm(q, k.t())              # [N, N] pairs (q, k l2-normalised)
#       labels = range(N)                  # positives are in the diagonal
#       loss = CrossEntropyLoss(logits / tau, labels)
#       return 2 * tau * loss


def ctr_algorithm_1(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.mm(q, k.t())
    labels = torch.arange(q.shape[0])
    return 2 * tau * nn.CrossEntropyLoss()(logits / tau, labels)


def adjust_moco_momentum(epoch: float, epochs: int, moco_m: float) -> float:
    """facebookresearch/moco-v3 main_moco.py, transcribed."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - moco_m)


def test_mocov3__is_registered_and_its_config_group_is_the_constructor():
    kwargs = {**asdict(MoCoV3Config()), "hidden_dim": HIDDEN, "out_dim": OUT}
    moco = build_objective("mocov3", tiny_backbone(), **kwargs)
    assert OBJECTIVES["mocov3"] is MoCoV3 and isinstance(moco, MoCoV3)
    assert MoCoV3.needs_labels is False and MoCoV3.config_groups == {"mocov3": MoCoV3Config}
    cfg = load_config(PretrainConfig, ["objective.name=mocov3", "mocov3.temperature=0.1", "mocov3.blur_prob=[0.5, 0]"])
    assert cfg.mocov3.temperature == 0.1 and tuple(cfg.mocov3.blur_prob) == (0.5, 0.0)
    defaults = MoCoV3Config()  # the paper's
    assert (defaults.temperature, defaults.momentum, defaults.hidden_dim, defaults.out_dim) == (0.2, 0.99, 4096, 256)
    assert defaults.momentum_cosine and defaults.freeze_patch_embed


@pytest.mark.parametrize("n,c,tau,seed", [(1, 4, 0.2, 0), (8, 16, 0.2, 1), (5, 3, 1.0, 2), (32, 256, 0.07, 3)])
def test_contrastive_loss__equals_algorithm_1s_ctr(n, c, tau, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, c, generator=g) * 3, torch.randn(n, c, generator=g)
    torch.testing.assert_close(contrastive_loss(q, k, tau), ctr_algorithm_1(q, k, tau), rtol=1e-6, atol=1e-6)


def test_forward__loss_is_algorithm_1_with_its_own_encoders():
    moco, batch = tiny_moco(), views()
    x1, x2 = batch["views"]

    def cls(backbone, x):
        return backbone.forward_features(x)[:, 0]  # (N, D): the class token after the final norm

    def f_q(x):
        return moco.predictor(moco.projector(cls(moco.backbone, x)))

    def f_k(x):
        return moco.momentum_projector(cls(moco.momentum_backbone, x))

    with torch.no_grad():
        k1, k2 = f_k(x1), f_k(x2)
    expected = ctr_algorithm_1(f_q(x1), k2, 0.2) + ctr_algorithm_1(f_q(x2), k1, 0.2)
    out = moco(batch)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)
    assert out["momentum"] == pytest.approx(0.99) and -1 <= out["positive_cosine"] <= 1


def test_contrastive_loss__equals_lightlys_ntxent_in_moco_mode_with_the_other_keys_as_its_memory_bank():
    # lightly's NTXentLoss with a memory bank is MoCo's InfoNCE: query . own key against query . bank.
    # MoCo v3 keeps no queue; its negatives are the batch's other keys. So, one query at a time, the
    # bank holds the other keys, and NTXentLoss * 2T per direction is ctr exactly.
    tau, g = 0.2, torch.Generator().manual_seed(0)
    q, k = torch.randn(B, OUT, generator=g), torch.randn(B, OUT, generator=g)
    per_query = []
    for i in range(B):
        others = torch.cat([k[:i], k[i + 1 :]])
        ntxent = NTXentLoss(temperature=tau, memory_bank_size=(B - 1, OUT))
        ntxent.memory_bank.bank = F.normalize(others, dim=1)  # (B - 1, C), as lightly stores it
        per_query.append(ntxent(q[i : i + 1], k[i : i + 1]))
    lightly_loss = torch.stack(per_query).mean() * 2 * tau
    torch.testing.assert_close(contrastive_loss(q, k, tau), lightly_loss, rtol=1e-6, atol=1e-6)


def test_lightlys_ntxent_without_memory_bank__is_simclrs_loss_with_same_view_negatives_not_ctr():
    # NTXentLoss(memory_bank_size=0) is SimCLR's loss: both directions at once, and each query also
    # has the other queries of its own view as negatives (2N - 2 per row instead of N - 1). Those
    # extra terms only add to each row's log-sum-exp, so it lies strictly above MoCo v3's ctr.
    tau, g = 0.2, torch.Generator().manual_seed(0)
    q, k = torch.randn(B, OUT, generator=g), torch.randn(B, OUT, generator=g)
    simclr = NTXentLoss(temperature=tau, memory_bank_size=0)(q, k)
    moco_both_directions = (contrastive_loss(q, k, tau) + contrastive_loss(k, q, tau)) / 2 / (2 * tau)
    assert simclr > moco_both_directions + 1e-3


def test_projector_and_predictor__equal_lightlys_moco_v3_heads():
    # lightly's MoCoProjectionHead with batch_norm=True is the paper's MLP: bias-free linears, BN, ReLU;
    # its last BN keeps learnable affine parameters (the official code drops them: SimCLR's last BN
    # "without gamma"), which at their init (1, 0) is the same function.
    torch.manual_seed(0)
    for layers, in_dim in ((3, 32), (2, OUT)):
        ours = mlp(layers, in_dim, HIDDEN, OUT)
        theirs = MoCoProjectionHead(in_dim, HIDDEN, OUT, num_layers=layers, batch_norm=True)
        missing, unexpected = theirs.layers.load_state_dict(ours.state_dict(), strict=False)
        assert not unexpected and set(missing) == {f"{len(ours) - 1}.weight", f"{len(ours) - 1}.bias"}
        x = torch.randn(B, in_dim)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("epoch,i", [(0, 0), (0, 3), (2, 5), (5, 0), (7, 6), (9, 6)])
def test_momentum_at__is_the_official_formula_at_that_step(epoch, i):
    epochs, iters = 10, 7
    expected = adjust_moco_momentum(epoch + i / iters, epochs, 0.99)
    assert momentum_at(epoch * iters + i, epochs * iters, 0.99) == pytest.approx(expected, abs=1e-12)
    assert momentum_at(epoch * iters + i, epochs * iters, 0.99, cosine=False) == 0.99


def test_momentum_at__rises_from_base_to_one():
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)
    values = [momentum_at(s, 100, 0.99) for s in range(101)]
    assert values == sorted(values)


def test_step_end__moves_the_key_encoder_by_the_next_steps_momentum():
    moco, total = tiny_moco(), 20
    opt = torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=0.5)
    moco(views())["loss"].backward()
    opt.step()
    before = {n: p.clone() for n, p in moco.named_parameters()}
    moco.on_step_start(3, total)
    with torch.no_grad():
        moco.on_step_end(3, total)
    m = adjust_moco_momentum(4 / 10, 2, 0.99)  # step 4 of 20 = epoch 0.4 of 2 (official order: set m, update, encode)
    for online, target in (("backbone", "momentum_backbone"), ("projector", "momentum_projector")):
        for name, _ in getattr(moco, online).named_parameters():
            key, query = f"{target}.{name}", f"{online}.{name}"
            torch.testing.assert_close(dict(moco.named_parameters())[key], m * before[key] + (1 - m) * before[query])
    key_qkv = "momentum_backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(dict(moco.named_parameters())[key_qkv], before[key_qkv])


def test_first_step__starts_the_key_encoder_from_the_backbone_as_loaded():
    # The engine loads model.checkpoint into the backbone after building the objective; the key
    # encoder must start from those weights (the official code copies at construction).
    moco, loaded = tiny_moco(), tiny_backbone()
    moco.backbone.load_state_dict(loaded.state_dict())
    moco.on_step_start(0, 10)
    for a, b in zip(moco.momentum_backbone.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    moco.momentum_backbone.blocks[0].mlp.fc1.weight.data.add_(1.0)
    moco.on_step_start(1, 10)  # later steps (and resumed runs) keep the key encoder they have
    assert not torch.equal(moco.momentum_backbone.blocks[0].mlp.fc1.weight, loaded.blocks[0].mlp.fc1.weight)


def test_momentum_encoder__gets_no_gradient_and_never_reaches_the_optimizer():
    moco = tiny_moco()
    moco(views())["loss"].backward()
    key_params = list(moco.momentum_backbone.parameters()) + list(moco.momentum_projector.parameters())
    assert all(not p.requires_grad and p.grad is None for p in key_params)
    optimised = {id(p) for g in param_groups(moco, 0.1) for p in g["params"]}
    assert not optimised & {id(p) for p in key_params}
    # The query path trains: every trainable parameter got a gradient.
    assert all(p.grad is not None for p in moco.parameters() if p.requires_grad)
    assert {id(p) for p in moco.predictor.parameters()} <= optimised


def test_freeze_patch_embed__patch_projection_has_no_grad_and_stays_at_its_random_init():
    moco = tiny_moco()
    proj = moco.backbone.patch_embed.proj
    start = [p.clone() for p in proj.parameters()]
    opt = torch.optim.AdamW([p for p in moco.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        moco.on_step_start(step, 3)
        moco(views(seed=step))["loss"].backward()
        assert all(p.grad is None and not p.requires_grad for p in proj.parameters())
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            moco.on_step_end(step, 3)
    assert all(torch.equal(p, s) for p, s in zip(proj.parameters(), start))
    for key, s in zip(moco.momentum_backbone.patch_embed.proj.parameters(), start):  # m * x + (1 - m) * x, rounded
        torch.testing.assert_close(key, s, rtol=1e-6, atol=1e-7)
    assert not torch.equal(moco.backbone.blocks[0].mlp.fc1.weight, moco.momentum_backbone.blocks[0].mlp.fc1.weight)

    unfrozen = tiny_moco(freeze_patch_embed=False)
    unfrozen(views())["loss"].backward()
    assert all(p.requires_grad and p.grad is not None for p in unfrozen.backbone.patch_embed.proj.parameters())


def test_init__follows_the_official_vit_init():
    moco = tiny_moco()
    bb = moco.backbone
    qkv = bb.blocks[0].attn.qkv.weight  # (3D, D): q, k and v each as a D x D xavier matrix
    assert qkv.abs().max() <= math.sqrt(6 / (qkv.shape[0] // 3 + qkv.shape[1]))
    proj = bb.patch_embed.proj.weight  # (D, 3, p, p)
    assert proj.abs().max() <= math.sqrt(6 / (proj[0].numel() + proj.shape[0]))
    assert torch.count_nonzero(bb.blocks[0].attn.qkv.bias) == 0 and bb.cls_token.abs().max() < 1e-5
    # The key encoder starts as an exact copy.
    key_state = moco.momentum_backbone.state_dict()
    assert all(torch.equal(value, key_state[name]) for name, value in bb.state_dict().items())
    assert exported_backbone(moco) == (bb, "backbone.")  # the base encoder is what gets exported


def test_train_transform__two_normalised_views_picklable_and_seeded():
    moco = tiny_moco()
    transform = pickle.loads(pickle.dumps(moco.train_transform(DataConfig(image_size=IMG))))
    image = Image.fromarray((torch.rand(24, 24, 3) * 255).to(torch.uint8).numpy())

    def seeded(seed):
        torch.manual_seed(seed)
        random.seed(seed)
        return transform(image)["views"]

    a, b = seeded(0), seeded(0)
    assert len(a) == 2 and all(v.shape == (3, IMG, IMG) and v.dtype == torch.float32 for v in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="blur_prob"):
        MoCoV3(tiny_backbone(), blur_prob=(1.5, 0.1)).train_transform(DataConfig())
    with pytest.raises(ValueError, match="data.interpolation='cubic' is unknown"):
        moco.train_transform(DataConfig(interpolation="cubic"))


# -- processes: 2 processes x B must train as 1 process x 2B ------------------------------------


def head_and_data(seed=0):
    """A projector-like MLP (BN in every layer), inputs (2B, D) and momentum keys (2B, C), all seeded."""
    torch.manual_seed(seed)
    head = mlp(2, 12, HIDDEN, OUT)
    return head, torch.randn(2 * B, 12) * 2 + 1, torch.randn(2 * B, OUT)


def one_process_step(tau=0.2):
    head, x, k = head_and_data()
    x.requires_grad_(True)
    loss = contrastive_loss(head(x), k, tau)
    loss.backward()
    return loss.detach(), x.grad, {n: p.grad for n, p in head.named_parameters()}, head.state_dict()


def _two_process_worker(rank: int, port: int, out_dir: str, tau: float = 0.2) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        head, x, k = head_and_data()
        local = slice(rank * B, (rank + 1) * B)  # Accelerate's shards: consecutive halves of the global batch
        x_local = x[local].clone().requires_grad_(True)
        all_k, offset = gather_keys(k[local])
        loss = contrastive_loss(head(x_local), all_k, tau, offset)
        loss.backward()
        grads = {n: p.grad for n, p in head.named_parameters()}
        for g in grads.values():  # as DDP: the mean of the processes' gradients
            dist.all_reduce(g)
            g /= 2
        dist.all_reduce(loss_sum := loss.detach().clone())
        torch.save(
            {"keys": all_k, "offset": offset, "loss": loss_sum / 2, "x_grad": x_local.grad, "grads": grads,
             "state": head.state_dict()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes: seconds, mostly their imports
def test_two_processes__global_batch_norm_and_gathered_keys_equal_one_process_with_the_whole_batch(tmp_path):
    # The official code runs SyncBatchNorm and gathers keys with concat_all_gather, labels offset by
    # rank; so do we (GlobalBatchNorm1d, gather_keys), and 2 x B is then 1 x 2B up to float rounding.
    mp.spawn(_two_process_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    loss, x_grad, grads, state = one_process_step()
    _, _, k = head_and_data()
    for r, got in enumerate(ranks):
        assert torch.equal(got["keys"], k) and got["offset"] == r * B
        torch.testing.assert_close(got["loss"], loss, rtol=1e-6, atol=1e-6)
        # Each process's loss is the mean over its B queries: d(its loss)/dx is twice the 2B mean's.
        torch.testing.assert_close(got["x_grad"] / 2, x_grad[r * B : (r + 1) * B], rtol=1e-5, atol=1e-7)
        for name, g in grads.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
        for name, value in state.items():  # BN running statistics of the global batch
            torch.testing.assert_close(got["state"][name].to(value.dtype), value, rtol=1e-5, atol=1e-6, msg=name)
