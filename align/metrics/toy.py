"""freeze_align's toy experiment: does linear CKA predict how well a CLIP loss can align two spaces?

Each instance draws a latent ``Z ~ U[-1, 1]^{n x d}`` and two "modalities" ``A = T1(Z) + w1 eps_1``,
``B = T2(Z) + w2 eps_2`` where ``T1, T2`` are random 2-layer ReLU MLPs ``d -> hidden -> d`` (hidden
much wider than d; each output rescaled to unit RMS so the noise weights mean the same in every
instance) and ``w1, w2 ~ U[0, max_noise]``. For each instance we record ``linear_cka(A, B)`` and the
symmetric CLIP (InfoNCE) loss reached after ``steps`` full-batch SGD steps (lr 0.01, temperature
0.07) of linear maps on the frozen features.

Where the linear map sits: freeze_align trains a projector on *each* frozen encoder, so by default
(``side="both"``) each instance trains ``P_A, P_B: d -> d`` and scores ``norm(A P_A) . norm(B P_B)``;
``side="a"`` trains only ``P_A`` to map A into B's space. Maps start from a random Gaussian
(std ``1/sqrt(d)``). Every instance is independent, so all instances train at once with batched
matmuls (the summed loss gives each instance its own gradient).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from align.io import write_json
from align.metrics.cka import batched_linear_cka

__all__ = ["ToyConfig", "pearson", "run_toy", "save_toy"]


@dataclass
class ToyConfig:
    """Settings of the toy experiment (defaults follow freeze_align)."""

    instances: int = 200
    n: int = 32
    d: int = 16
    hidden: int = 0  # 0 means 16 * d
    steps: int = 500
    lr: float = 0.01
    temperature: float = 0.07
    max_noise: float = 2.0
    side: str = "both"
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        for name in ("instances", "n", "d", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"toy: {name} must be >= 1, found {getattr(self, name)}")
        if self.n < 2:
            raise ValueError(f"toy: n must be >= 2 (a contrastive loss needs negatives), found {self.n}")
        if self.hidden < 0 or self.lr <= 0 or self.temperature <= 0 or self.max_noise < 0:
            raise ValueError("toy: hidden must be >= 0 and lr, temperature > 0, max_noise >= 0")
        if self.side not in ("both", "a"):
            raise ValueError(f"toy: side must be 'both' or 'a', found {self.side!r}")


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two 1-D tensors (float64)."""
    x = x.double() - x.double().mean()
    y = y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    if float(denom) == 0:
        raise ValueError("pearson: a series is constant")
    return float((x * y).sum() / denom)


def _random_mlp(z: Tensor, hidden: int, gen: torch.Generator) -> Tensor:
    """``relu(z W1 + b1) W2`` with He-scaled random weights, per instance; rescaled to unit RMS."""
    inst, _, d = z.shape
    w1 = torch.randn(inst, d, hidden, generator=gen, dtype=z.dtype) * math.sqrt(2.0 / d)
    b1 = torch.randn(inst, 1, hidden, generator=gen, dtype=z.dtype) * 0.1
    w2 = torch.randn(inst, hidden, d, generator=gen, dtype=z.dtype) / math.sqrt(hidden)
    out = torch.relu(z @ w1 + b1) @ w2
    out = out - out.mean(dim=1, keepdim=True)
    return out / out.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()


def _clip_loss(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Per-instance symmetric InfoNCE of ``a, b [I, n, d]`` -> ``[I]``."""
    inst, n, _ = a.shape
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2) / temperature
    labels = torch.arange(n).repeat(inst)
    i2t = F.cross_entropy(logits.reshape(inst * n, n), labels, reduction="none").view(inst, n).mean(1)
    t2i = F.cross_entropy(logits.transpose(1, 2).reshape(inst * n, n), labels, reduction="none")
    return 0.5 * (i2t + t2i.view(inst, n).mean(1))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The toy's matrices are tiny: extra intra-op threads only add synchronisation, and on a busy
    2-core machine their spin-waits made a run up to 30x slower. Restores the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_toy(config: ToyConfig | None = None) -> dict:
    """Run every instance; returns config, per-instance points and the Pearson correlation."""
    cfg = config or ToyConfig()
    cfg.validate()
    with _one_thread():
        return _run(cfg)


def _run(cfg: ToyConfig) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    inst, n, d = cfg.instances, cfg.n, cfg.d
    hidden = cfg.hidden or 16 * d
    z = torch.rand(inst, n, d, generator=gen) * 2 - 1
    w1 = torch.rand(inst, generator=gen) * cfg.max_noise
    w2 = torch.rand(inst, generator=gen) * cfg.max_noise
    a = _random_mlp(z, hidden, gen) + w1[:, None, None] * torch.randn(inst, n, d, generator=gen)
    b = _random_mlp(z, hidden, gen) + w2[:, None, None] * torch.randn(inst, n, d, generator=gen)
    cka = batched_linear_cka(a, b).float()

    proj_a = (torch.randn(inst, d, d, generator=gen) / math.sqrt(d)).requires_grad_()
    proj_b = (torch.randn(inst, d, d, generator=gen) / math.sqrt(d)).requires_grad_(cfg.side == "both")
    params = [proj_a, proj_b] if cfg.side == "both" else [proj_a]
    opt = torch.optim.SGD(params, lr=cfg.lr)
    initial = None
    for _ in range(cfg.steps):
        loss = _clip_loss(a @ proj_a, b @ proj_b if cfg.side == "both" else b, cfg.temperature)
        if initial is None:
            initial = loss.detach().clone()
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        final = _clip_loss(a @ proj_a, b @ proj_b if cfg.side == "both" else b, cfg.temperature)
    if not torch.isfinite(final).all():
        raise ValueError("toy: the CLIP loss became non-finite; lower lr or raise temperature")
    points = [
        {"cka": float(c), "loss": float(lo), "initial_loss": float(i0), "w1": float(x), "w2": float(y)}
        for c, lo, i0, x, y in zip(cka, final, initial, w1, w2, strict=True)
    ]
    return {
        "config": {**asdict(cfg), "hidden": hidden},
        "pearson_r": pearson(cka, final),
        "chance_loss": math.log(n),
        "points": points,
    }


def save_toy(result: dict, out_dir: str | os.PathLike) -> tuple[str, str]:
    """Write ``toy.json`` and the scatter plot ``toy.png`` into ``out_dir``; returns both paths."""
    from align.plots import pyplot, save_figure

    plt = pyplot()
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "toy.json")
    png_path = os.path.join(out_dir, "toy.png")
    write_json(json_path, result)
    cka = [p["cka"] for p in result["points"]]
    loss = [p["loss"] for p in result["points"]]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(cka, loss, s=12, alpha=0.7)
    ax.set_xlabel("linear CKA(A, B)")
    ax.set_ylabel(f"CLIP loss after {result['config']['steps']} SGD steps")
    ax.set_title(f"toy: Pearson r = {result['pearson_r']:.3f} ({len(cka)} instances)")
    fig.tight_layout()
    save_figure(fig, png_path, dpi=120)
    return json_path, png_path
