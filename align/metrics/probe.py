"""Alignment probing (SAIL): how well can *linear* maps align two frozen feature spaces?

Train a ``LinearHead`` per side on a training split of paired features with the sigmoid (or
InfoNCE) loss, then report image->text and text->image retrieval recall@k on the held-out split.
Features are standardized with the training split's mean and std first, so the learning rate means
the same for every encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from align.heads import LinearHead
from align.losses import LogitScale, Temperature, infonce_loss, sigmoid_loss

__all__ = ["alignment_probe", "retrieval_recall", "standardize"]


def retrieval_recall(sim: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of a square similarity matrix whose diagonal holds the true pairs, both directions.

    ``sim[i, j]`` scores image i against text j. Returns ``{"i2t_R@k": ..., "t2i_R@k": ...}`` as
    fractions in [0, 1]; ties count against the true pair (its rank is the number of scores >= it).
    """
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"retrieval_recall: expected a square [N, N] similarity, found {tuple(sim.shape)}")
    diag = sim.diagonal()
    rank_i2t = (sim > diag[:, None]).sum(dim=1)  # texts scoring above the true one, per image
    rank_t2i = (sim > diag[None, :]).sum(dim=0)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((rank_i2t < k).double().mean())
        out[f"t2i_R@{k}"] = float((rank_t2i < k).double().mean())
    return out


def standardize(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets standardized with the training rows' mean and std (std floored at 1e-6)."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def alignment_probe(
    image_feats: Tensor,
    text_feats: Tensor,
    train_fraction: float = 0.8,
    loss: str = "sigmoid",
    steps: int = 300,
    lr: float = 1e-3,
    out_dim: int = 256,
    batch_size: int = 1024,
    seed: int = 0,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """Train linear heads on a random ``train_fraction`` of the pairs; recall@k on the rest.

    ``image_feats [N, d_v]`` and ``text_feats [N, d_t]`` are paired row by row. ``loss`` is
    ``"sigmoid"`` (SAIL: learnable scale/bias starting at 20 / -10) or ``"infonce"`` (learnable
    temperature from 0.07). AdamW, ``steps`` steps of minibatches of ``batch_size`` pairs.
    Returns recall@k both directions plus ``n_train``, ``n_test`` and the final training loss.
    """
    if image_feats.ndim != 2 or text_feats.ndim != 2 or image_feats.shape[0] != text_feats.shape[0]:
        raise ValueError(
            "alignment_probe: expected paired features [N, d_v] and [N, d_t] with the same N, "
            f"found {tuple(image_feats.shape)} and {tuple(text_feats.shape)}"
        )
    if loss not in ("sigmoid", "infonce"):
        raise ValueError(f"alignment_probe: loss must be 'sigmoid' or 'infonce', found {loss!r}")
    n = image_feats.shape[0]
    n_train = int(round(n * train_fraction))
    if n_train < 2 or n - n_train < 2:
        raise ValueError(
            f"alignment_probe: {n} pairs with train_fraction={train_fraction} leave too few to train/test"
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    tr, te = perm[:n_train], perm[n_train:]
    img_tr, img_te = standardize(image_feats[tr].float(), image_feats[te].float())
    txt_tr, txt_te = standardize(text_feats[tr].float(), text_feats[te].float())

    torch.manual_seed(seed)
    img_head = LinearHead(img_tr.shape[1], out_dim)
    txt_head = LinearHead(txt_tr.shape[1], out_dim)
    scale_mod = LogitScale() if loss == "sigmoid" else Temperature()
    params = [*img_head.parameters(), *txt_head.parameters(), *scale_mod.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    batch = min(batch_size, n_train)
    last = float("nan")
    for _ in range(steps):
        idx = torch.randperm(n_train, generator=gen)[:batch]
        u, v = img_head(img_tr[idx]), txt_head(txt_tr[idx])
        if loss == "sigmoid":
            scale, bias = scale_mod()
            value = sigmoid_loss(u, v, scale, bias)
        else:
            value = infonce_loss(u, v, scale_mod())
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        scale_mod.clamp_()
        last = float(value.detach())
    with torch.no_grad():
        sim = F.normalize(img_head(img_te), dim=-1) @ F.normalize(txt_head(txt_te), dim=-1).T
    return {**retrieval_recall(sim, ks), "n_train": n_train, "n_test": n - n_train, "final_loss": last}
