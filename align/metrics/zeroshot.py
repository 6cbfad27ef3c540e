"""Zero-shot scoring of dual encoders, following CLIP-benchmark conventions.

Metric functions work on embeddings (so they are checked on hand-built cases):
``zeroshot_classifier`` (templates averaged per class: normalize each, average, renormalize),
``classification_metrics`` (``logits = 100 * img @ W``; acc1, acc5, mean-per-class recall),
``retrieval_metrics`` (R@k both directions; a hit if any ground truth is in the top k),
``paired_accuracy`` (MMVP-VLM / Winoground style: a pair counts only if both texts pick their own
image) and ``segmentation_miou`` (patch-text similarity upsampled to the image, argmax per pixel).

:class:`DualEncoder` adapts aligned artifacts, HF CLIP/SigLIP and open_clip models to one interface;
the task runners (``run_classify``, ``run_retrieve``, ``run_pairs``, ``run_segment``; ``run_task`` writes JSON)
feed it data: the shapes world (labels and templates from ``classes.json``, masks for segmentation), pairs
files and image folders via :func:`align.data.readers.open_data`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from align.encoders.base import TextEncoder, VisionEncoder

__all__ = [
    "DualEncoder",
    "class_embeddings",
    "classification_metrics",
    "format_table",
    "load_dual_encoder",
    "paired_accuracy",
    "retrieval_metrics",
    "run_classify",
    "run_pairs",
    "run_retrieve",
    "run_segment",
    "run_task",
    "segmentation_miou",
    "shapes_minimal_pairs",
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


class DualEncoder:
    """One interface over dual encoders: normalized image, text and per-patch embeddings.

    ``encode_images(pixels) -> [B, D]``, ``encode_texts(list[str]) -> [N, D]`` and
    ``patch_embeddings(pixels) -> [B, N, D]`` (patch tokens in the joint space, for segmentation) are all
    L2-normalized; ``preprocess`` turns PIL images into pixels.
    """

    def __init__(self, vision: VisionEncoder, text: TextEncoder | None = None, name: str = "") -> None:
        self.vision, self.text_encoder = vision.eval(), text.eval() if text is not None else None
        self.name = name or vision.source
        self.preprocess = vision.preprocess
        self.aligned = hasattr(vision, "encode_text")

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        pixels = pixels.to(self._device(), self._dtype())
        if self.aligned:
            return self.vision.encode_image(pixels).float().cpu()
        return F.normalize(self.vision.pooled(pixels, "projected").float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        if self.aligned:
            return self.vision.encode_text(list(texts))
        return F.normalize(self.text_encoder.encode(list(texts)).float(), dim=-1)

    @torch.no_grad()
    def patch_embeddings(self, pixels: Tensor) -> Tensor:
        pixels = pixels.to(self._device(), self._dtype())
        if self.aligned:
            return F.normalize(self.vision(pixels).float(), dim=-1).cpu()
        vision, kind = self.vision, self.vision.kind
        patches = vision(pixels)[:, vision.num_prefix_tokens :]
        if kind == "clip":
            model = vision.model
            out = model.visual_projection(model.vision_model.post_layernorm(patches))
        elif kind == "openclip":
            out = vision.visual.ln_post(patches)
            out = out @ vision.visual.proj if vision.visual.proj is not None else out
        else:
            raise ValueError(
                f"{self.name}: no per-patch embeddings in the joint space for a '{kind}' model; "
                "segmentation needs an aligned artifact, HF CLIP or open_clip"
            )
        return F.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_pil(
        self, images: Sequence[Image.Image], patches: bool = False, batch_size: int = 128
    ) -> Tensor:
        """Preprocess and embed PIL images in batches (global, or per patch with ``patches=True``)."""
        fn = self.patch_embeddings if patches else self.encode_images
        parts = [
            fn(self.preprocess(list(images[i : i + batch_size]))) for i in range(0, len(images), batch_size)
        ]
        return torch.cat(parts)

    def _device(self) -> torch.device:
        return next(self.vision.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype


def load_dual_encoder(spec: str | os.PathLike) -> DualEncoder:
    """An aligned artifact directory, or a CLIP-like id/path (HF CLIP/SigLIP, ``openclip:...``, tiny-clip)."""
    from align.encoders.registry import load_text_encoder, load_vision_encoder

    vision = load_vision_encoder(spec)
    if hasattr(vision, "encode_text"):
        return DualEncoder(vision, name=str(spec))
    if "projected" not in vision.poolings:
        raise ValueError(
            f"{spec}: not a dual encoder (a '{vision.kind}' vision model without a joint image-text space); "
            "expected an aligned artifact directory, an HF CLIP/SigLIP model or an open_clip model"
        )
    if isinstance(spec, Path) or Path(str(spec)).is_dir():
        spec = str(spec)
    return DualEncoder(vision, load_text_encoder(spec), name=str(spec))


# ---------------------------------------------------------------------------------------- tasks

DEFAULT_TEMPLATES = ("a photo of a {}.",)
BACKGROUND_PROMPTS = ("a plain light background.", "an empty background.", "nothing on a plain background.")
TASKS = ("classify", "retrieve", "pairs", "segment")


def _is_shapes(data: str | os.PathLike) -> bool:
    return (Path(data) / "classes.json").is_file() and (Path(data) / "pairs.jsonl").is_file()


def _images(samples: Sequence) -> list[Image.Image]:
    from align.data.images import open_image

    return [open_image(s.image) for s in samples]


def _open(data: str | os.PathLike, split: str | None, **cols):
    from align.data.readers import open_data

    tabular = Path(data).is_file() or (Path(data) / "pairs.jsonl").is_file()
    return open_data(data, split=split if tabular else None, **cols)


def run_classify(
    dual: DualEncoder,
    data: str | os.PathLike,
    label: str = "color",
    split: str | None = "test",
    templates: Sequence[str] | None = None,
    limit: int | None = None,
) -> dict:
    """Zero-shot classification of ``data``: a shapes world (class ``label``: ``color`` or ``shape``) or an
    ImageNet-style folder (classes = sub-directories)."""
    from align.io import read_json

    if _is_shapes(data):
        classes = read_json(Path(data) / "classes.json")
        if label not in classes or label == "templates":
            raise ValueError(
                f"{data}/classes.json: no class set '{label}'; expected one of {[k for k in classes if k != 'templates']}"
            )
        names = list(classes[label])
        templates = templates or classes.get("templates", {}).get(label) or DEFAULT_TEMPLATES
        src = _open(data, split, label_col=f"attributes.{label}")
    else:
        src = _open(data, split)
        names = sorted({s.label for s in src if s.label is not None})
        templates = templates or DEFAULT_TEMPLATES
    samples = [s for s in src.samples if s.label is not None][:limit]
    unknown = sorted({s.label for s in samples} - set(names))
    if not samples or unknown:
        raise ValueError(
            f"{data}: {len(samples)} labelled samples; labels outside the class list: {unknown[:5]}"
        )
    classifier = zeroshot_classifier(dual.encode_texts, names, templates)
    labels = torch.tensor([names.index(s.label) for s in samples])
    result = classification_metrics(dual.encode_pil(_images(samples)), classifier, labels)
    return {"label": label, "classes": names, "templates": list(templates), **result}


def run_retrieve(
    dual: DualEncoder,
    data: str | os.PathLike,
    split: str | None = "test",
    captions: Sequence[str] = ("caption",),
    limit: int | None = None,
) -> dict:
    """Image<->text retrieval over a pairs source; every caption column gives each image one more text."""
    samples = [s for s in _open(data, split, text_col=list(captions)).samples if s.texts][:limit]
    if not samples:
        raise ValueError(f"{data}: no samples with captions in columns {list(captions)}")
    texts = [t for s in samples for t in s.texts]
    owner = torch.tensor([i for i, s in enumerate(samples) for _ in s.texts])
    result = retrieval_metrics(dual.encode_pil(_images(samples)), dual.encode_texts(texts), owner)
    return {"n_images": len(samples), "n_texts": len(texts), **result}


def shapes_minimal_pairs(rows: Sequence[dict], n_pairs: int, seed: int = 0) -> list[tuple[dict, dict]]:
    """Pairs of shapes images whose main objects differ in exactly one of colour and shape (seeded)."""
    import numpy as np

    rng, pairs, seen = np.random.default_rng(seed), [], set()
    for _ in range(200 * n_pairs):
        if len(pairs) == n_pairs:
            break
        i, j = (int(v) for v in rng.choice(len(rows), size=2, replace=False))
        a, b = rows[i]["attributes"], rows[j]["attributes"]
        if (a["color"] == b["color"]) != (a["shape"] == b["shape"]) and (i, j) not in seen:
            seen.update({(i, j), (j, i)})
            pairs.append((rows[i], rows[j]))
    return pairs


def run_pairs(
    dual: DualEncoder, data: str | os.PathLike, split: str | None = "test", n_pairs: int = 200, seed: int = 0
) -> dict:
    """Paired accuracy: a shapes world (minimal pairs differing in colour or shape) or a JSONL file of
    ``{"images": [a, b], "texts": [ta, tb]}`` rows (paths relative to the file)."""
    from align.data.shapes import load_shapes
    from align.io import read_jsonl

    if _is_shapes(data):
        pairs = shapes_minimal_pairs(load_shapes(data, split), n_pairs, seed)
        images = [[a["image"], b["image"]] for a, b in pairs]
        texts = [[a["caption"], b["caption"]] for a, b in pairs]
    else:
        rows = read_jsonl(data)
        bad = [i for i, r in enumerate(rows) if len(r.get("images", [])) != 2 or len(r.get("texts", [])) != 2]
        if bad:
            raise ValueError(f"{data}: rows {bad[:5]} need 'images' and 'texts' lists of length 2")
        images = [[str(Path(data).parent / p) for p in r["images"]] for r in rows]
        texts = [list(r["texts"]) for r in rows]
    if not images:
        raise ValueError(f"{data}: no pairs to score")
    pil = [Image.open(p).convert("RGB") for pair in images for p in pair]
    img = dual.encode_pil(pil).reshape(len(images), 2, -1)
    txt = dual.encode_texts([t for pair in texts for t in pair]).reshape(len(texts), 2, -1)
    return paired_accuracy(img, txt)


def run_segment(
    dual: DualEncoder, data: str | os.PathLike, split: str | None = "test", limit: int | None = None
) -> dict:
    """Zero-shot segmentation of a shapes world's masks (background + shape classes), mIoU."""
    import numpy as np

    from align.data.shapes import load_shapes
    from align.io import read_json

    if not _is_shapes(data):
        raise ValueError(f"{data}: segmentation needs a shapes-world directory (masks and classes.json)")
    rows = load_shapes(data, split)[:limit]
    classes = read_json(Path(data) / "classes.json")
    names = ["background", *classes["shape"]]
    templates = classes.get("templates", {}).get("shape") or DEFAULT_TEMPLATES
    prompts = [list(BACKGROUND_PROMPTS), *[[t.format(c) for t in templates] for c in classes["shape"]]]
    masks = torch.from_numpy(np.stack([np.asarray(Image.open(r["mask"])) for r in rows]))
    patches = dual.encode_pil([Image.open(r["image"]).convert("RGB") for r in rows], patches=True)
    result = segmentation_miou(patches, class_embeddings(dual.encode_texts, prompts), masks)
    return {"classes": names, "n": len(rows), **result}


def run_task(dual: DualEncoder, task: str, data: str | os.PathLike, **opts) -> dict:
    """Run one task by name; returns a JSON-able result with the model, task and data recorded."""
    runners = {"classify": run_classify, "retrieve": run_retrieve, "pairs": run_pairs, "segment": run_segment}
    if task not in runners:
        raise ValueError(f"task {task!r}: expected one of {list(TASKS)}")
    result = runners[task](dual, data, **opts)
    return {
        "model": dual.name,
        "task": task,
        "data": str(data),
        **{k: v for k, v in opts.items() if v is not None},
        **result,
    }


def format_table(result: dict) -> str:
    """The numeric scores of a result as a two-column text table."""
    rows = [(k, v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max((len(k) for k, _ in rows), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
