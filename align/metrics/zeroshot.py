"""Zero-shot scoring of dual encoders, following CLIP-benchmark conventions.

Metric functions work on embeddings (so they are checked on hand-built cases):
``zeroshot_classifier`` (templates averaged per class: normalize each, average, renormalize),
``classification_metrics`` (``logits = 100 * img @ W``; acc1, acc5, mean-per-class recall),
``retrieval_metrics`` (R@k both directions; a hit if any ground truth is in the top k),
``paired_accuracy`` (MMVP-VLM / Winoground style: a pair counts only if both texts pick their own
image) and ``segmentation_miou`` (patch-text similarity upsampled to the image, argmax per pixel).

The dual encoders they score are :class:`align.encoders.dual.DualEncoder`; the tasks that feed them data
are in :mod:`align.evals.zeroshot`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "class_embeddings",
    "classification_metrics",
    "paired_accuracy",
    "retrieval_metrics",
    "segmentation_miou",
    "zeroshot_classifier",
]


def class_embeddings(encode_texts: Callable[[list[str]], Tensor], prompts: Sequence[Sequence[str]]) -> Tensor:
    """``[C, D]``: each class's prompts embedded, L2-normalized, averaged, renormalized."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one class and at least one prompt per class")
    flat = [text for group in prompts for text in group]
    emb = F.normalize(encode_texts(flat).float(), dim=-1)
    bounds = torch.tensor([0, *[len(p) for p in prompts]]).cumsum(0).tolist()
    means = [emb[a:b].mean(dim=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return F.normalize(torch.stack(means), dim=-1)


def zeroshot_classifier(
    encode_texts: Callable[[list[str]], Tensor], classnames: Sequence[str], templates: Sequence[str]
) -> Tensor:
    """Class weights ``[C, D]``: every template filled with the class name, normalized, averaged, renormalized."""
    if not classnames or not templates:
        raise ValueError(
            f"need at least one class and one template, found {len(classnames)} and {len(templates)}"
        )
    return class_embeddings(encode_texts, [[t.format(c) for t in templates] for c in classnames])


def classification_metrics(
    image_emb: Tensor, classifier: Tensor, labels: Tensor, k: int = 5
) -> dict[str, float]:
    """acc1, acc``k`` (top ``min(k, C)``), mean-per-class recall, chance (1/C) and majority-class rate."""
    if image_emb.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} image embeddings but {labels.shape[0]} labels")
    n_classes = classifier.shape[0]
    logits = 100.0 * F.normalize(image_emb.float(), dim=-1) @ classifier.float().T
    topk = logits.topk(min(k, n_classes), dim=1).indices
    labels = labels.long()
    correct1 = topk[:, 0] == labels
    correctk = (topk == labels[:, None]).any(dim=1)
    recalls = [correct1[labels == c].float().mean() for c in range(n_classes) if (labels == c).any()]
    counts = torch.bincount(labels, minlength=n_classes)
    return {
        "acc1": float(correct1.float().mean()),
        f"acc{k}": float(correctk.float().mean()),
        "mean_per_class_recall": float(torch.stack(recalls).mean()),
        "chance": 1.0 / n_classes,
        "majority": float(counts.max()) / labels.numel(),
        "n": int(labels.numel()),
    }


def retrieval_metrics(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k for text->image (``image_retrieval``) and image->text (``text_retrieval``).

    ``text_to_image[j]`` is the index of text ``j``'s image; an image may own several texts and counts
    as a hit if any of them is in its top k.
    """
    if text_emb.shape[0] != text_to_image.shape[0]:
        raise ValueError(f"{text_emb.shape[0]} texts but {text_to_image.shape[0]} text->image indices")
    sims = F.normalize(text_emb.float(), dim=-1) @ F.normalize(image_emb.float(), dim=-1).T  # [T, I]
    n_img, n_txt = sims.shape[1], sims.shape[0]
    owner = torch.zeros(n_txt, n_img, dtype=torch.bool)
    owner[torch.arange(n_txt), text_to_image.long()] = True
    out = {}
    for k in ks:
        top_img = sims.topk(min(k, n_img), dim=1).indices  # texts -> images
        out[f"image_retrieval_recall@{k}"] = float(owner.gather(1, top_img).any(dim=1).float().mean())
        top_txt = sims.T.topk(min(k, n_txt), dim=1).indices  # images -> texts
        out[f"text_retrieval_recall@{k}"] = float(owner.T.gather(1, top_txt).any(dim=1).float().mean())
    return out


def paired_accuracy(image_emb: Tensor, text_emb: Tensor) -> dict[str, float]:
    """``image_emb``, ``text_emb``: ``[P, 2, D]`` (text ``j`` describes image ``j`` of its pair).

    For each text a softmax over the pair's two images picks one (strictly higher similarity); a pair
    counts only if both texts pick their own image. Also reports per-text accuracy.
    """
    if image_emb.shape[:2] != text_emb.shape[:2] or image_emb.shape[1] != 2:
        raise ValueError(
            f"expected [P, 2, D] images and texts, found {tuple(image_emb.shape)}, {tuple(text_emb.shape)}"
        )
    sims = torch.einsum(
        "ptd,pid->pti", F.normalize(text_emb.float(), dim=-1), F.normalize(image_emb.float(), dim=-1)
    )
    own = torch.stack([sims[:, 0, 0] > sims[:, 0, 1], sims[:, 1, 1] > sims[:, 1, 0]], dim=1)
    return {
        "pair_acc": float(own.all(dim=1).float().mean()),
        "text_acc": float(own.float().mean()),
        "n": int(len(own)),
    }


def segmentation_miou(
    patch_emb: Tensor, class_emb: Tensor, masks: Tensor, ignore_index: int | None = None
) -> dict[str, float | list[float | None]]:
    """mIoU of per-pixel argmax over ``patch_emb @ class_emb.T`` upsampled (bilinear) to the masks.

    ``patch_emb`` ``[B, N, D]`` with ``N`` a square grid (row-major); ``masks`` ``[B, H, W]`` of class
    indices. IoU per class is accumulated over the whole set; the mean is over classes that occur in
    the ground truth or the prediction.
    """
    b, n, _ = patch_emb.shape
    side = int(round(n**0.5))
    if side * side != n or masks.shape[0] != b:
        raise ValueError(
            f"expected [B, g*g, D] patches and [B, H, W] masks, found {tuple(patch_emb.shape)}, {tuple(masks.shape)}"
        )
    n_cls = class_emb.shape[0]
    sims = F.normalize(patch_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).T  # [B, N, C]
    grid = sims.transpose(1, 2).reshape(b, n_cls, side, side)
    pred = F.interpolate(grid, size=masks.shape[-2:], mode="bilinear", align_corners=False).argmax(dim=1)
    gt = masks.long()
    valid = torch.ones_like(gt, dtype=torch.bool) if ignore_index is None else gt != ignore_index
    inter, union = torch.zeros(n_cls), torch.zeros(n_cls)
    for c in range(n_cls):
        p, g = (pred == c) & valid, (gt == c) & valid
        inter[c], union[c] = (p & g).sum(), (p | g).sum()
    ious = [float(inter[c] / union[c]) if union[c] > 0 else None for c in range(n_cls)]
    present = [v for v in ious if v is not None]
    acc = float(((pred == gt) & valid).sum() / valid.sum().clamp(min=1))
    return {"miou": sum(present) / max(len(present), 1), "per_class_iou": ious, "pixel_acc": acc}
