"""The shapes world: a procedural image-text dataset of coloured shapes, generated from a seed.

Each image shows 1-3 shapes on a plain light background; the first is the large *main* object whose
colour and shape are the image's top-level ``color`` and ``shape`` (well defined for zero-shot
classification), the others are small distractors in other cells of a 3x3 grid. Masks use the
**shape** class set: 0 = background, ``SHAPES.index(shape) + 1`` for each shape's pixels (later
objects are drawn over earlier ones, the main object last, in image and mask alike).

Text (captions, questions, templates) lives in :mod:`align.data.shapes_text`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from align.data.shapes_text import (
    COLOR_NAMES,
    COUNT_WORDS,
    POSITIONS,
    SHAPES,
    classes_json,
    instruct_entry,
    long_caption,
    shapes_corpus,
    short_caption,
    vqa_rows,
)
from align.io import read_json, read_jsonl
from align.rundir import OutDir, OutDirError, claims_out_dir

GENERATOR = "mllm-swap shapes"
VERSION = 1
DATASET_ENTRIES = (
    "images", "masks", "pairs.jsonl", "images.txt", "instruct.json", "vqa_test.jsonl", "classes.json", "meta.json"
)  # fmt: skip
# written into a world by `mllm-swap data mmvp` (align.evals.mmvp); stale once the world is rewritten
MMVP_PAIRS, MMVP_META = "mmvp_pairs.jsonl", "mmvp_meta.json"

# Base RGB per colour name (each object gets +-15 per channel of jitter).
COLORS: dict[str, tuple[int, int, int]] = dict(
    zip(
        COLOR_NAMES,
        [(215, 40, 40), (40, 160, 60), (40, 80, 215), (230, 200, 30), (140, 60, 180), (240, 130, 30)],
        strict=True,
    )
)
COUNT_PROBS = (0.4, 0.3, 0.3)  # P(1, 2, 3 objects)
MASK_CLASSES = ["background", *SHAPES]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square, triangle or cross of radius ``r`` rotated by ``angle`` radians."""
    if shape == "square":
        s = 0.82 * r
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a) + 0.12 * r) for a in np.radians([-90, 30, 150])]
    elif shape == "cross":
        w = 0.34 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
               (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]  # fmt: skip
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    c, s_ = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s_, cy + x * s_ + y * c) for x, y in pts]


def _draw(draw: ImageDraw.ImageDraw, obj: dict, fill: Any) -> None:
    cx, cy, r = obj["_cx"], obj["_cy"], obj["_r"]
    if obj["shape"] == "circle":
        rc = 0.9 * r
        draw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=fill)
    else:
        draw.polygon(_polygon(obj["shape"], cx, cy, r, obj["_angle"]), fill=fill)


def _layout(rng: np.random.Generator, size: int) -> list[dict]:
    """Random objects, main first: colour, shape, grid position, centre, radius, rotation."""
    cell = size / 3
    count = int(rng.choice([1, 2, 3], p=COUNT_PROBS))
    cells = rng.permutation(9)[:count]
    objects = []
    for k, c in enumerate(cells):
        main = k == 0
        r = cell * (rng.uniform(0.48, 0.62) if main else rng.uniform(0.24, 0.32))
        jitter = cell * (0.15 if main else 0.2)
        cx = (c % 3 + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (c // 3 + 0.5) * cell + rng.uniform(-jitter, jitter)
        cx, cy = float(np.clip(cx, r, size - r)), float(np.clip(cy, r, size - r))
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES))
        rgb = np.clip(np.array(COLORS[color]) + rng.integers(-15, 16, 3), 0, 255)
        objects.append(
            {
                "color": color,
                "shape": shape,
                "position": POSITIONS[int(c)],
                "size": "large" if main else "small",
                "bbox": [round(cx - r), round(cy - r), round(cx + r), round(cy + r)],
                "_cx": cx,
                "_cy": cy,
                "_r": r,
                "_angle": float(rng.uniform(-0.35, 0.35)),
                "_rgb": tuple(int(v) for v in rgb),
            }
        )
    return objects


def render(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image, list[dict]]:
    """Draw one random scene: ``(rgb image, mask "L" image, objects main-first)``."""
    objects = _layout(rng, size)
    grey = int(rng.integers(200, 251))
    bg = tuple(int(v) for v in np.clip(grey + rng.integers(-8, 9, 3), 0, 255))
    img = Image.new("RGB", (size, size), bg)
    mask = Image.new("L", (size, size), 0)
    d_img, d_mask = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for obj in reversed(objects):  # distractors first, the main object on top
        _draw(d_img, obj, obj["_rgb"])
        _draw(d_mask, obj, SHAPES.index(obj["shape"]) + 1)
    if rng.random() < 0.5:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), (size, size, 3))
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img, mask, [{k: v for k, v in o.items() if not k.startswith("_")} for o in objects]


def _attributes(objects: list[dict]) -> dict:
    main = objects[0]
    return {
        "color": main["color"],
        "shape": main["shape"],
        "count": len(objects),
        "position": main["position"],
        "objects": objects,
    }


def _save_png(img: Image.Image, path: Path) -> None:
    img.save(path, format="PNG", optimize=False, compress_level=6)


def _existing_meta(out: Path) -> dict | None:
    """The meta of a shapes dataset at ``out``; ``None`` if there is none."""
    meta_path = out / "meta.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    return meta if isinstance(meta, dict) and meta.get("generator") == GENERATOR else None


def _adopt(out: Path) -> list[str] | None:
    """The entries of a shapes dataset written before output markers existed (see align.rundir)."""
    meta = _existing_meta(out)
    return sorted(DATASET_ENTRIES) if meta is not None else None


@claims_out_dir("data shapes", adopt=_adopt, wait=600.0, reuse=True)
def generate_shapes(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    size: int = 64,
    test_fraction: float = 0.2,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write a shapes-world dataset of ``n`` images to ``out_dir`` atomically; return a summary.

    Files: ``images/<id>.png``, ``masks/<id>.png``, ``pairs.jsonl``, ``images.txt``,
    ``instruct.json`` (train), ``vqa_test.jsonl`` (test), ``classes.json``, ``meta.json``. The same
    arguments give byte-identical files. An existing dataset made with the same arguments is reused
    unless ``overwrite``; one made with other arguments is replaced only with ``overwrite``; a
    non-empty directory that is not a shapes dataset is refused (see :mod:`align.rundir`).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 16 <= size <= 1024:
        raise ValueError(f"size must be between 16 and 1024 pixels, got {size}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    out = Path(out_dir)
    params = {
        "version": VERSION,
        "seed": int(seed),
        "n": n,
        "size": size,
        "test_fraction": float(test_fraction),
    }
    meta = _existing_meta(out)
    complete = meta is not None and (out / "pairs.jsonl").is_file()
    if complete and not overwrite and all(meta.get(k) == v for k, v in params.items()):
        return _summary(out, meta, reused=True)
    claim = OutDir.current(out)
    if complete and not overwrite:
        differs = {k: meta.get(k) for k, v in params.items() if meta.get(k) != v}
        raise OutDirError(
            f"{out}: holds a shapes dataset made with other arguments ({differs}); refusing to replace it. "
            "Use a new --out, or --overwrite to replace it."
        )

    n_test = min(round(n * test_fraction), n - 1)
    test_ids = set(np.random.default_rng(seed).choice(n, size=n_test, replace=False).tolist())
    width = max(5, len(str(n - 1)))
    rows, instruct, vqa, seen = [], [], [], set()
    tmp = claim.temp_dir()
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    for i in tqdm(range(n), desc="shapes", unit="img", disable=not progress):
        for attempt in range(1000):  # redraw (deterministically) on the rare duplicate image
            rng = np.random.default_rng([int(seed), i, attempt])
            img, mask, objects = render(rng, size)
            digest = hashlib.sha256(img.tobytes()).digest()
            if digest not in seen:
                break
        seen.add(digest)
        sid = f"shapes-{i:0{width}d}"
        _save_png(img, tmp / "images" / f"{sid}.png")
        _save_png(mask, tmp / "masks" / f"{sid}.png")
        attrs = _attributes(objects)
        split = "test" if i in test_ids else "train"
        image = f"images/{sid}.png"
        rows.append(
            {
                "id": sid,
                "image": image,
                "mask": f"masks/{sid}.png",
                "caption": short_caption(attrs),
                "long_caption": long_caption(attrs),
                "split": split,
                "attributes": attrs,
            }
        )
        if split == "train":
            instruct.append(instruct_entry(sid, image, attrs, rng))
        else:
            vqa.extend(vqa_rows(sid, image, attrs, rng))
    _write_jsonl(tmp / "pairs.jsonl", rows)
    (tmp / "images.txt").write_text("".join(f"{r['image']}\n" for r in rows))
    (tmp / "instruct.json").write_text(json.dumps(instruct, indent=1) + "\n")
    _write_jsonl(tmp / "vqa_test.jsonl", vqa)
    (tmp / "classes.json").write_text(json.dumps(classes_json(), indent=2) + "\n")
    meta = {
        "generator": GENERATOR,
        **params,
        "counts": {"train": n - n_test, "test": n_test, "instruct": len(instruct), "vqa": len(vqa)},
        "mask_classes": MASK_CLASSES,
        "max_objects": len(COUNT_PROBS),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    claim.clear([*DATASET_ENTRIES, MMVP_PAIRS, MMVP_META])
    claim.publish(tmp)
    return _summary(out, meta, reused=False)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _summary(out: Path, meta: dict, reused: bool) -> dict:
    counts = meta["counts"]
    return {
        "out": str(out),
        "n": meta["n"],
        "seed": meta["seed"],
        "size": meta["size"],
        "train": counts["train"],
        "test": counts["test"],
        "instruct": counts["instruct"],
        "vqa": counts["vqa"],
        "reused": reused,
    }


def load_shapes(dir: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Rows of ``pairs.jsonl`` with absolute ``image`` and ``mask`` paths, optionally one split."""
    root = Path(dir)
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    rows = read_jsonl(root / "pairs.jsonl")
    out = []
    for row in rows:
        if split is not None and row.get("split") != split:
            continue
        row = dict(row)
        for key in ("image", "mask"):
            if key in row:
                row[key] = str((root / row[key]).resolve())
        out.append(row)
    return out


def shapes_classes(dir: str | os.PathLike) -> dict:
    """The dataset's ``classes.json``: class names per attribute and prompt templates."""
    return read_json(Path(dir) / "classes.json")


__all__ = [
    "COLORS",
    "COUNT_WORDS",
    "MASK_CLASSES",
    "MMVP_META",
    "MMVP_PAIRS",
    "POSITIONS",
    "SHAPES",
    "generate_shapes",
    "load_shapes",
    "render",
    "shapes_classes",
    "shapes_corpus",
]
