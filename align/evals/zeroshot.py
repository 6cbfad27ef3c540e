"""Zero-shot tasks: data sources fed to a :class:`~align.encoders.dual.DualEncoder` and scored.

The runners (``run_classify``, ``run_retrieve``, ``run_pairs``, ``run_segment``; ``run_task`` by name)
read the shapes world (labels and templates from ``classes.json``, masks for segmentation), pairs files
and image folders via :func:`align.data.readers.open_data`, and score with :mod:`align.metrics.zeroshot`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from align.encoders.dual import DualEncoder
from align.metrics.zeroshot import (
    class_embeddings,
    classification_metrics,
    paired_accuracy,
    retrieval_metrics,
    segmentation_miou,
    zeroshot_classifier,
)

__all__ = [
    "TASKS",
    "format_table",
    "run_classify",
    "run_pairs",
    "run_retrieve",
    "run_segment",
    "run_task",
    "shapes_minimal_pairs",
]

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


def _pair_rows(data: str | os.PathLike, split: str | None, n_pairs: int, seed: int) -> tuple[str, list[dict]]:
    """``(source, rows)``: each row has two ``images`` (paths) and two ``texts`` (and maybe a ``kind``)."""
    from align.data.shapes import MMVP_PAIRS, load_shapes
    from align.evals.mmvp import load_mmvp_pairs
    from align.io import read_jsonl

    path = Path(data)
    if (path / MMVP_PAIRS).is_file() or path.name == MMVP_PAIRS:
        return "shapes-mmvp", load_mmvp_pairs(path)
    if _is_shapes(data):
        pairs = shapes_minimal_pairs(load_shapes(data, split), n_pairs, seed)
        return "shapes minimal pairs", [
            {"images": [a["image"], b["image"]], "texts": [a["caption"], b["caption"]]} for a, b in pairs
        ]
    rows = read_jsonl(data)
    bad = [i for i, r in enumerate(rows) if len(r.get("images", [])) != 2 or len(r.get("texts", [])) != 2]
    if bad:
        raise ValueError(f"{data}: rows {bad[:5]} need 'images' and 'texts' lists of length 2")
    return "pairs file", [{**r, "images": [str(path.parent / p) for p in r["images"]]} for r in rows]


def run_pairs(
    dual: DualEncoder, data: str | os.PathLike, split: str | None = "test", n_pairs: int = 200, seed: int = 0
) -> dict:
    """Paired scores of image pairs with one text each: Shapes-MMVP pairs (a folder holding
    ``mmvp_pairs.jsonl``, or that file; see :mod:`align.evals.mmvp`), else a shapes world (minimal pairs
    differing in colour or shape), else a JSONL file of ``{"images": [a, b], "texts": [ta, tb]}`` rows
    (paths relative to the file).

    Reports MMVP-VLM (each image picks its own text; ``mmvp_vlm`` with its standard error and chance, per
    ``kind`` when rows have one) and the text-side paired accuracy (each text picks its own image).
    """
    from align.evals.mmvp import mmvp_vlm_score

    source, rows = _pair_rows(data, split, n_pairs, seed)
    if not rows:
        raise ValueError(f"{data}: no pairs to score")
    pil = [Image.open(p).convert("RGB") for r in rows for p in r["images"]]
    img = dual.encode_pil(pil).reshape(len(rows), 2, -1)
    txt = dual.encode_texts([t for r in rows for t in r["texts"]]).reshape(len(rows), 2, -1)
    result = {"pairs_source": source, **mmvp_vlm_score(img, txt), **paired_accuracy(img, txt)}
    for kind in sorted({r["kind"] for r in rows if r.get("kind")}):
        keep = torch.tensor([r.get("kind") == kind for r in rows])
        part = mmvp_vlm_score(img[keep], txt[keep])
        result[f"mmvp_vlm_{kind}"], result[f"n_{kind}"] = part["mmvp_vlm"], part["n"]
    return result


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
