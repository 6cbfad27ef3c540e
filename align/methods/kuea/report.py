"""Compatibility report of a kernel-aligned (KUEA) CLIP against its original, on held-out images, and the
evaluation record of a run built from it (:func:`kuea_report`).

What it answers: did the image tower move toward the target's geometry (kernel discrepancy and
linear CKA to the target, before/after), and is it still the same CLIP for everything that consumed
the original (cosine between aligned and original embeddings, zero-shot accuracy through the frozen
text tower before/after, agreement of the zero-shot predictions)?

``kernel_discrepancy`` is the training objective's kernel term, ``mean_{i,j} (k_s - k_t)^2``, over
all pairs of the held-out set. "before" uses the original embeddings with the student kernel's
initial parameters; "after" the aligned embeddings with the trained parameters; "after, initial
kernel" the aligned embeddings with the initial parameters, separating what the embeddings learned
from what the trainable kernel parameters absorbed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from align.encoders.base import VisionEncoder
from align.io import write_json
from align.losses import kernel_alignment_loss
from align.methods.evaluation import eval_data
from align.methods.kuea.data import encode_student, load_target
from align.metrics.cka import linear_cka
from align.metrics.zeroshot import classification_metrics
from align.paths import portable_tree

__all__ = [
    "compatibility_report",
    "format_report",
    "kernel_discrepancy",
    "knn_accuracy",
    "kuea_report",
    "write_report",
    "zeroshot_tasks",
]

Kernel = Callable[[Tensor], Tensor]


@torch.no_grad()
def kernel_discrepancy(
    student_emb: Tensor, target_emb: Tensor, student_kernel: Kernel, target_kernel: Kernel
) -> float:
    """``mean_{i,j} (k_student(x_i, x_j) - k_target(y_i, y_j))^2`` over every pair of rows."""
    return float(
        kernel_alignment_loss(student_emb.float(), target_emb.float(), student_kernel, target_kernel)
    )


@torch.no_grad()
def compatibility_report(
    original: Tensor,
    aligned: Tensor,
    target: Tensor,
    kernel_before: Kernel,
    kernel_after: Kernel,
    target_kernel: Kernel,
    zeroshot: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-able dict.

    ``original``/``aligned``: the original and aligned CLIP image embeddings ``[N, D]`` (unnormalized,
    same images, same order); ``target``: the target's embeddings ``[N, D_t]``. ``zeroshot``: task name
    -> (class weights ``[C, D]`` from the frozen text tower, labels ``[N]``).
    """
    if not (original.shape == aligned.shape and original.shape[0] == target.shape[0]):
        raise ValueError(
            f"compatibility_report: original {tuple(original.shape)}, aligned {tuple(aligned.shape)} and "
            f"target {tuple(target.shape)} must describe the same N images"
        )
    original, aligned, target = original.float(), aligned.float(), target.float()
    before = kernel_discrepancy(original, target, kernel_before, target_kernel)
    after = kernel_discrepancy(aligned, target, kernel_after, target_kernel)
    cos = F.cosine_similarity(aligned, original, dim=-1)
    report: dict[str, Any] = {
        "n_images": int(original.shape[0]),
        "kernel_discrepancy": {
            "before": before,
            "after": after,
            "after_initial_kernel": kernel_discrepancy(aligned, target, kernel_before, target_kernel),
            "relative_change": (after - before) / before if before > 0 else None,
        },
        "linear_cka_to_target": {
            "before": float(linear_cka(original, target)),
            "after": float(linear_cka(aligned, target)),
        },
        "cosine_to_original": {"mean": float(cos.mean()), "min": float(cos.min())},
        "anchor_l2": float((aligned - original).pow(2).sum(-1).mean()),
        "zeroshot": {},
    }
    for name, (weights, labels) in (zeroshot or {}).items():
        acc_before = classification_metrics(original, weights, labels)
        acc_after = classification_metrics(aligned, weights, labels)
        pred_before = (F.normalize(original, dim=-1) @ weights.float().T).argmax(-1)
        pred_after = (F.normalize(aligned, dim=-1) @ weights.float().T).argmax(-1)
        report["zeroshot"][name] = {
            "acc1": acc_after["acc1"],  # the aligned model's, as every zero-shot score in this project
            "acc_before": acc_before["acc1"],
            "acc_after": acc_after["acc1"],
            "agreement": float((pred_before == pred_after).float().mean()),
            "chance": acc_before["chance"],
            "majority": acc_before["majority"],
            "n": acc_before["n"],
        }
    return report


@torch.no_grad()
def knn_accuracy(emb: Tensor, labels: Tensor, k: int = 5) -> float:
    """Leave-one-out k-NN (cosine, majority vote) accuracy: how much of ``labels`` an embedding encodes."""
    if emb.shape[0] != labels.shape[0] or emb.shape[0] <= k:
        raise ValueError(
            f"knn_accuracy: need more than k={k} rows and one label per row, found {tuple(emb.shape)}"
        )
    unit = F.normalize(emb.float(), dim=-1)
    sims = unit @ unit.T
    sims.fill_diagonal_(float("-inf"))
    neighbours = labels[sims.topk(k, dim=1).indices]  # [N, k]
    n_cls = int(labels.max()) + 1
    votes = F.one_hot(neighbours, n_cls).sum(dim=1).float()
    votes += F.one_hot(neighbours[:, 0], n_cls) * 0.5  # ties go to the nearest neighbour's class
    return float((votes.argmax(dim=1) == labels).float().mean())


def _row(name: str, before: Any, after: Any, note: str = "") -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    return f"| {name} | {fmt(before)} | {fmt(after)} | {note} |"


def format_report(report: Mapping[str, Any]) -> str:
    """A Markdown table of the report (what ``mllm-swap align kuea`` prints at the end)."""
    kd, cka, cos = report["kernel_discrepancy"], report["linear_cka_to_target"], report["cosine_to_original"]
    change = kd.get("relative_change")
    lines = [
        f"KUEA compatibility report ({report['n_images']} held-out images)",
        "",
        "| metric | before | after | note |",
        "|---|---|---|---|",
        _row("kernel discrepancy to target", kd["before"], kd["after"],
             f"{change:+.1%}; with initial kernel params: {kd['after_initial_kernel']:.4f}" if change is not None else ""),
        _row("linear CKA to target", cka["before"], cka["after"]),
        _row("cosine to original embedding", 1.0, cos["mean"], f"min {cos['min']:.4f}"),
    ]  # fmt: skip
    for name, zs in report.get("zeroshot", {}).items():
        lines.append(
            _row(f"zero-shot {name} acc1", zs["acc_before"], zs["acc_after"],
                 f"agreement with original {zs['agreement']:.4f}; chance {zs['chance']:.3f}")
        )  # fmt: skip
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the report as JSON (atomically; local paths relative to its folder) and return the path."""
    write_json(path, portable_tree(dict(report), Path(path).parent))
    return Path(path)


def zeroshot_tasks(
    data: str | os.PathLike, split: str | None, labels: list[str], limit: int | None
) -> tuple[list[Any], dict[str, tuple[list[str], list[str], list[int]]]]:
    """Held-out images and their zero-shot tasks: task -> (class names, templates, label indices).

    A shapes world uses its ``classes.json`` (names and templates per attribute) and each image's
    attributes (``labels``: which attributes); any other source gives one task ``label`` from the
    sample labels (image-folder class directories; ImageNet-1k WordNet ids get their class names and
    the OpenAI templates), or none when samples are unlabelled. ``limit`` keeps that many images evenly
    spaced over the source. Returns the samples too.
    """
    from align.data.readers import open_data
    from align.data.shapes import shapes_classes

    root = Path(data)
    shapes = (root / "classes.json").is_file() and (root / "pairs.jsonl").is_file()
    tabular = shapes or root.is_file()
    samples = spread(open_data(data, split=split if tabular else None).samples, limit)
    if not samples:
        raise ValueError(f"{data}: no held-out images (split {split!r}) for the compatibility report")
    tasks: dict[str, tuple[list[str], list[str], list[int]]] = {}
    if shapes:
        classes = shapes_classes(root)
        for label in labels:
            if label not in classes.get("templates", {}):
                raise ValueError(
                    f"{root / 'classes.json'}: no zero-shot templates for {label!r}; "
                    f"expected one of {sorted(classes.get('templates', {}))}"
                )
            names = list(classes[label])
            values = [s.meta["attributes"][label] for s in samples]
            tasks[label] = (names, list(classes["templates"][label]), [names.index(v) for v in values])
    elif all(s.label is not None for s in samples):
        folders = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        classes = (
            folders if {s.label for s in samples} <= set(folders) else sorted({s.label for s in samples})
        )
        names, templates = imagenet_names(classes)
        tasks["label"] = (names, templates, [classes.index(s.label) for s in samples])
    return samples, tasks


def spread(items: list[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` items evenly spaced over the list (every class of a sorted image folder)."""
    if limit is None or len(items) <= limit:
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def imagenet_names(classes: list[str]) -> tuple[list[str], list[str]]:
    """Class names and templates: ImageNet-1k's 1000 WordNet-id folders get open_clip's class names and
    the OpenAI templates; other labels are used as names with ``"a photo of a {}."``."""
    if len(classes) == 1000 and all(re.fullmatch(r"n\d{8}", c) for c in classes):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

        return list(IMAGENET_CLASSNAMES), [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    return [c.replace("_", " ") for c in classes], ["a photo of a {}."]


PROBE_ATTRIBUTES = ("color", "shape", "count", "position")


@torch.no_grad()
def _batched(fn: Any, pixels: Tensor, device: torch.device, dtype: torch.dtype, batch: int = 64) -> Tensor:
    parts = [fn(pixels[i : i + batch].to(device, dtype)).float().cpu() for i in range(0, len(pixels), batch)]
    return torch.cat(parts)


def _probe_labels(samples: list[Any]) -> dict[str, Tensor]:
    """Per attribute, integer labels of the held-out images (shapes attributes, or the class label)."""
    out = {}
    attrs = [s.meta.get("attributes") for s in samples]
    names = PROBE_ATTRIBUTES if all(isinstance(a, dict) for a in attrs) else ()
    for name in names:
        values = [a[name] for a in attrs]
        vocab = sorted(set(values), key=str)
        out[name] = torch.tensor([vocab.index(v) for v in values])
    if not out and all(s.label is not None for s in samples):
        vocab = sorted({s.label for s in samples})
        out["label"] = torch.tensor([vocab.index(s.label) for s in samples])
    return out


@torch.no_grad()
def kuea_report(method: Any, model: Any) -> dict[str, Any]:
    """The evaluation record of a run: the compatibility report of the trained student on the held-out
    images, plus kernel parameters and a k-NN probe of what the target's embedding encodes; ``{}`` when no
    held-out data is configured."""
    from align.data.images import open_image
    from align.load import load_text_encoder
    from align.metrics.zeroshot import zeroshot_classifier

    recipe = method.recipe
    path = eval_data(recipe.eval, recipe.data)
    if path is None:
        return {}
    samples, tasks = zeroshot_tasks(path, recipe.eval.split, list(recipe.eval.labels), recipe.eval.limit)
    images = [open_image(s.image) for s in samples]
    student: VisionEncoder = model.student
    param = next(student.parameters())
    device, dtype = param.device, param.dtype
    pixels = student.preprocess(images)
    aligned = _batched(lambda x: encode_student(student, x, None)[0], pixels, device, dtype)
    original = _batched(lambda x: encode_student(model.frozen["original"], x, None)[0], pixels, device, dtype)
    target = model.frozen.get("target") or load_target(recipe.target, recipe.target_pool).to(device, dtype)
    target_emb = _batched(
        lambda x: target.pooled(x, recipe.target_pool), target.preprocess(images), device, dtype
    )
    if "target" not in model.frozen:
        target.cpu()
    zeroshot = {}
    if tasks:
        text = load_text_encoder(method.student_source).to(device).eval()
        for name, (classes, templates, labels) in tasks.items():
            weights = zeroshot_classifier(lambda t, text=text: text.encode(t), classes, templates)
            zeroshot[name] = (weights, torch.tensor(labels))
        text.cpu()
    kernels = (method.initial_kernel_module.to(device), model.student_kernel, model.target_kernel)
    report = compatibility_report(original, aligned, target_emb, *kernels, zeroshot=zeroshot)
    method.initial_kernel_module.cpu()
    report["kernel_params"] = {"initial": method.initial_kernel, "final": model.student_kernel.values()}
    report["target"] = {"source": recipe.target, "pool": recipe.target_pool, "dim": int(target_emb.shape[1])}
    probes = _probe_labels(samples)
    if probes and len(samples) > 5:
        report["knn_probe"] = {
            name: {
                "target": knn_accuracy(target_emb, labels),
                "original": knn_accuracy(original, labels),
                "aligned": knn_accuracy(aligned, labels),
            }
            for name, labels in probes.items()
        }
    report["eval_data"], report["eval_split"] = str(path), recipe.eval.split
    return report
