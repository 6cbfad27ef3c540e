"""Losses against naive loops and open_clip's reference losses; chunked == direct incl. gradients."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from align.kernels import build_kernel
from align.losses import (
    LogitScale,
    Temperature,
    _ChunkedSigmoidLoss,
    anchor_loss,
    gather_features,
    infonce_loss,
    kernel_alignment_loss,
    sigmoid_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pair(n=12, d=6, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=dtype), torch.randn(n, d, generator=gen, dtype=dtype)


def _naive_sigmoid(img, txt, scale, bias, per_image=False):
    """Every pair written out: -log(sigmoid(y * (s * cos + b)))."""
    n = len(img)
    total = 0.0
    for i in range(n):
        for j in range(n):
            cos = float(F.cosine_similarity(img[i], txt[j], dim=0))
            y = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-y * (scale * cos + bias)))
    return total / (n if per_image else n * n)


@pytest.mark.parametrize("chunk", [None, 1, 5, 12, 64])
@pytest.mark.parametrize("reduction", ["mean_pairs", "sum_per_image"])
def test_sigmoid_equals_naive(chunk, reduction):
    img, txt = _pair()
    got = sigmoid_loss(img, txt, 7.0, -3.0, chunk_size=chunk, reduction=reduction)
    expected = _naive_sigmoid(img, txt, 7.0, -3.0, per_image=reduction == "sum_per_image")
    assert float(got) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("chunk", [None, 4])
def test_sigmoid_per_image_equals_open_clip_siglip(chunk):
    img, txt = _pair(n=20, d=8, dtype=torch.float32)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = sigmoid_loss(img, txt, scale, bias, chunk_size=chunk, reduction="sum_per_image")
    ref = SigLipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale, bias)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_infonce_equals_open_clip_clip_loss():
    img, txt = _pair(n=16, d=8, dtype=torch.float32)
    temperature = Temperature()
    ours = infonce_loss(img, txt, temperature())
    ref = ClipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), 1 / torch.tensor(0.07))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    unnormalized = infonce_loss(img, txt, 2.0, normalize=False)
    torch.testing.assert_close(unnormalized, ClipLoss()(img, txt, 2.0), rtol=1e-6, atol=1e-6)


def _loss_and_grads(img, txt, scale, bias, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (img, txt, scale, bias)]
    loss = sigmoid_loss(*leaves, **kw)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("chunk", [1, 7, 37, 100])
def test_chunked_equals_direct_with_gradients(dtype, tol, chunk):
    img, txt = _pair(n=37, d=10, dtype=dtype, seed=3)
    scale, bias = torch.tensor(12.0, dtype=dtype), torch.tensor(-4.0, dtype=dtype)
    for reduction in ("mean_pairs", "sum_per_image"):
        direct, g_direct = _loss_and_grads(img, txt, scale, bias, reduction=reduction)
        chunked, g_chunked = _loss_and_grads(img, txt, scale, bias, reduction=reduction, chunk_size=chunk)
        torch.testing.assert_close(chunked, direct, rtol=tol, atol=tol)
        for a, b in zip(g_chunked, g_direct, strict=True):
            torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("bias", [-50.0, 0.0, 30.0])
def test_chunked_exact_on_wide_blocks_and_saturated_logits(bias):
    """Rows wider than the 64 pairs that share one log1p, odd widths at every halving (150 -> 75 -> 37 ...)
    and logits far in both tails (|z| up to 150): the blockwise sum still equals the direct one."""
    img, txt = _pair(n=150, d=8, seed=11)
    scale = torch.tensor(100.0, dtype=torch.float64)
    direct, g_direct = _loss_and_grads(img, txt, scale, torch.tensor(bias, dtype=torch.float64))
    for chunk in (7, 64, 150):
        chunked, g_chunked = _loss_and_grads(
            img, txt, scale, torch.tensor(bias, dtype=torch.float64), chunk_size=chunk
        )
        torch.testing.assert_close(chunked, direct, rtol=1e-12, atol=0)
        for a, b in zip(g_chunked, g_direct, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)


def test_chunked_in_bfloat16_autocast_and_mixed_dtypes():
    img, txt = _pair(n=40, d=16, dtype=torch.float32)
    ref = float(sigmoid_loss(img, txt, 10.0, -5.0))
    half = sigmoid_loss(img.bfloat16(), txt.bfloat16(), 10.0, -5.0, chunk_size=8)
    assert half.dtype == torch.float32 and float(half) == pytest.approx(ref, rel=2e-2)
    leaf = img.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sigmoid_loss(leaf, txt, 10.0, -5.0, chunk_size=8)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(ref, rel=2e-2) and torch.isfinite(leaf.grad).all()
    mixed = sigmoid_loss(img, txt.bfloat16(), 10.0, -5.0, chunk_size=8)
    assert float(mixed) == pytest.approx(ref, rel=2e-2)


def test_chunked_backward_passes_gradcheck():
    img, txt = _pair(n=9, d=4, seed=5)
    u, v = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    args = [
        t.requires_grad_()
        for t in (u, v, torch.tensor(3.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64))
    ]
    assert torch.autograd.gradcheck(lambda a, b, s, c: _ChunkedSigmoidLoss.apply(a, b, s, c, 4, 81.0), args)


def test_chunked_graph_holds_no_n_squared_tensor():
    """Everything autograd keeps for backward is O(N * D), never an [N, N] block."""
    n, d = 64, 8
    img, txt = _pair(n=n, d=d, dtype=torch.float32)
    img.requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sigmoid_loss(img, txt, 10.0, -10.0, chunk_size=16)
    assert sizes and max(sizes) <= n * d
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sigmoid_loss(img, txt, 10.0, -10.0)
    assert max(sizes) >= n * n  # the direct form does keep N x N logits (sanity check of the probe)


def test_multi_positive_is_joint_mean_over_caption_sets():
    img, txt = _pair(n=10, d=5, seed=1)
    extra = [
        torch.randn(10, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in (7, 8)
    ]
    joint = sum(_naive_sigmoid(img, t, 9.0, -2.0) * 100 for t in [txt, *extra]) / 300  # mean over 300 pairs
    for chunk in (None, 3):
        got = sigmoid_loss(img, txt, 9.0, -2.0, chunk_size=chunk, extra_text=extra)
        assert float(got) == pytest.approx(joint, rel=1e-12)
    with pytest.raises(ValueError, match=r"extra_text\[0\]"):
        sigmoid_loss(img, txt, 9.0, -2.0, extra_text=[torch.zeros(9, 5, dtype=torch.float64)])


def test_sigmoid_input_errors():
    img, txt = _pair()
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_loss(img, txt[:5], 1.0, 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        sigmoid_loss(img, txt, 1.0, 0.0, chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_loss(img, txt, 1.0, 0.0, reduction="mean")


def test_logit_scale_init_and_clamp():
    mod = LogitScale()
    scale, bias = (t.detach() for t in mod())
    assert float(scale) == pytest.approx(20.0) and float(bias) == pytest.approx(-10.0)
    with torch.no_grad():
        mod.log_scale.fill_(9.0)
    assert float(mod.clamp_()()[0].detach()) == pytest.approx(100.0)
    with torch.no_grad():
        mod.log_scale.fill_(-3.0)
    mod.clamp_()
    assert float(mod.log_scale.detach()) == 0.0 and isinstance(mod.log_scale, torch.nn.Parameter)
    temp = Temperature()
    assert float(temp().detach()) == pytest.approx(1 / 0.07)
    with torch.no_grad():
        temp.temperature.fill_(2.0)
    assert float(temp.clamp_().temperature.detach()) == 0.5
    with torch.no_grad():
        temp.temperature.fill_(-1.0)
    assert float(temp.clamp_().temperature.detach()) == pytest.approx(0.001)


def test_logit_scale_trains_through_sigmoid_loss():
    mod = LogitScale(init_scale=5.0, init_bias=0.0)
    img, txt = _pair(dtype=torch.float32)
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    loss = sigmoid_loss(img, txt, *mod(), chunk_size=4)
    loss.backward()
    assert mod.log_scale.grad is not None and mod.bias.grad is not None
    opt.step()
    assert float(mod.bias.detach()) != 0.0


def test_kernel_alignment_loss_equals_mean_squared_difference():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 4, generator=gen), torch.randn(7, 9, generator=gen)
    ks, kt = build_kernel("polynomial", 4, "student"), build_kernel("polynomial", 9, "target")
    a, b = ks(s).tolist(), kt(t).tolist()
    expected = sum((a[i][j] - b[i][j]) ** 2 for i in range(7) for j in range(7)) / 49
    assert float(kernel_alignment_loss(s, t, ks, kt).detach()) == pytest.approx(expected, rel=1e-5)
    assert float(kernel_alignment_loss(s, s, ks, ks).detach()) == 0.0
    with pytest.raises(ValueError, match="same N"):
        kernel_alignment_loss(s, t[:5], ks, kt)


def test_anchor_loss():
    gen = torch.Generator().manual_seed(0)
    f, f0 = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    expected = sum(sum((f[i, k] - f0[i, k]) ** 2 for k in range(3)) for i in range(5)) / 5
    assert float(anchor_loss(f, f0)) == pytest.approx(float(expected), rel=1e-6)
    assert float(anchor_loss(f, f.clone())) == 0.0
    tokens, tokens0 = torch.randn(2, 4, 3, generator=gen), torch.randn(2, 4, 3, generator=gen)
    assert float(anchor_loss(tokens, tokens0)) == pytest.approx(
        float((tokens - tokens0).pow(2).sum() / 8), rel=1e-6
    )
    f0.requires_grad_()
    anchor_loss(f.requires_grad_(), f0).backward()
    assert f0.grad is None and f.grad is not None
    with pytest.raises(ValueError, match="same shape"):
        anchor_loss(f, f0[:2])


def test_gather_features_is_identity_without_distributed():
    x = torch.randn(3, 2)
    assert gather_features(x) is x


_GATHER_WORKER = """
import sys, torch, torch.distributed as dist
from align.losses import gather_features
rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
x = torch.full((rank + 1, 3), float(rank + 1), requires_grad=True)  # ranks hold 1 and 2 rows
gathered = gather_features(x)
(gathered * torch.arange(1, gathered.shape[0] + 1)[:, None]).sum().backward()
torch.save({"gathered": gathered.detach(), "grad": x.grad}, f"{out_dir}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_gather_features_two_processes(tmp_path):
    cmd = [sys.executable, "-c", _GATHER_WORKER]
    procs = [subprocess.Popen([*cmd, str(r), "2", str(tmp_path / "init"), str(tmp_path)]) for r in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    expected = torch.tensor([[1.0] * 3, [2.0] * 3, [2.0] * 3])
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["gathered"], expected) and torch.equal(r1["gathered"], expected)
    # Only the local slice gets gradient (rank 0 owns row 1, rank 1 rows 2 and 3 of the weights),
    # times the world size 2, so that averaging over the 2 processes gives the one-process gradient.
    assert torch.equal(r0["grad"], 2 * torch.ones(1, 3))
    assert torch.equal(r1["grad"], 2 * torch.tensor([[2.0] * 3, [3.0] * 3]))
