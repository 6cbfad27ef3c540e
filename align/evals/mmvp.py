"""Shapes-MMVP: CLIP-blind pairs of held-out shapes scenes, and the MMVP-VLM score of a dual encoder.

MMVP (Tong et al. 2024, "Eyes Wide Shut? Exploring the Visual Shortcomings of Multimodal LLMs") collects
"CLIP-blind pairs": two images that CLIP embeds as nearly the same (cosine > 0.95 for CLIP ViT-L/14)
while a vision-only self-supervised model tells them apart (DINOv2 ViT-L/14 cosine < 0.6), then asks a
question whose answer differs between the two. :func:`mine_mmvp_pairs` does the same on a shapes world:
among the held-out scenes, every two whose CLIP cosine (projected image embeddings) is at least
``clip_min`` and whose DINOv2 cosine (CLS token) is at most ``dino_max`` (quantiles of each tower's
cosines over all pairs, see ``CLIP_QUANTILE``) and whose main-object answers differ in at least one
question kind; the most CLIP-blind first (largest CLIP-minus-DINOv2 gap), each image in at most one pair
(so pairs are independent and a binomial standard error holds). On a 2,000-scene world (seed 0, 400
held out) ``tiny-clip-shapes`` against ``tiny-dinov2-random`` gives 21 pairs (17 count, 4 position). The question asks
about the first differing kind in ``QUESTION_ORDER`` with the two images' answers as its two options
(same order for both images, as in MMVP); each image also gets an MMVP-VLM statement about that kind.

The pairs go to ``mmvp_pairs.jsonl`` (image paths relative to the file; ``images``/``texts`` as in the
generic pairs format) with each pair's cosines and differing attributes; ``mmvp_meta.json`` records the
models, thresholds and counts. ``mllm-swap zeroshot --task pairs`` scores dual encoders on it
(:func:`mmvp_vlm_score`), the lmms-eval task ``shapes_mmvp`` scores multimodal LLMs.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from align.data.shapes import MMVP_META, MMVP_PAIRS
from align.errors import UserError

QUESTION_ORDER = ("count", "position", "color", "shape")  # the question asks about the first that differs
# The thresholds are quantiles of each tower's cosines over all pairs of held-out scenes: MMVP's absolute
# 0.95 / 0.6 fit ViT-L/14 towers, but a tower's cosines live on its own scale (a random tiny DINOv2 puts
# every pair of shapes scenes between 0.95 and 1.0). Default: among CLIP's 5% most similar pairs, and
# below DINOv2's median. The resolved cosines are recorded in mmvp_meta.json.
CLIP_QUANTILE = 0.95
DINO_QUANTILE = 0.5
CHANCE = 0.25  # a coin flip per image: both right with probability 1/4 (a blind model scores 0)


@torch.no_grad()
def image_cosines(clip: str, dino: str, images: list, batch_size: int = 128) -> tuple[Tensor, Tensor]:
    """``[N, N]`` cosine matrices: CLIP's projected image embeddings and DINOv2's CLS token."""
    from align.load import load_dual_encoder, load_vision_encoder

    clip_emb = load_dual_encoder(clip).encode_pil(images, batch_size=batch_size)
    tower = load_vision_encoder(dino).eval()
    dino_emb = torch.cat(
        [
            tower.encode_images(images[i : i + batch_size], pool="cls")
            for i in range(0, len(images), batch_size)
        ]
    )
    clip_emb, dino_emb = (F.normalize(e.float().cpu(), dim=-1) for e in (clip_emb, dino_emb))
    return clip_emb @ clip_emb.T, dino_emb @ dino_emb.T


def differing_kinds(a: dict, b: dict) -> list[str]:
    """The question kinds (``QUESTION_ORDER``) whose answers differ between two scenes' attributes."""
    from align.data.shapes_text import answer

    return [kind for kind in QUESTION_ORDER if answer(a, kind) != answer(b, kind)]


def select_pairs(
    clip_cos: Tensor,
    dino_cos: Tensor,
    attrs: list[dict],
    clip_min: float,
    dino_max: float,
    max_pairs: int | None,
) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``: CLIP cosine >= ``clip_min``, DINOv2 cosine <= ``dino_max``, some
    answer differs; largest CLIP-minus-DINOv2 gap first, each index used once, at most ``max_pairs``."""
    n = len(attrs)
    if clip_cos.shape != (n, n) or dino_cos.shape != (n, n):
        raise ValueError(
            f"expected [{n}, {n}] cosine matrices, found {tuple(clip_cos.shape)}, {tuple(dino_cos.shape)}"
        )
    i, j = torch.triu_indices(n, n, offset=1)
    keep = (clip_cos[i, j] >= clip_min) & (dino_cos[i, j] <= dino_max)
    i, j = i[keep], j[keep]
    order = torch.argsort(clip_cos[i, j] - dino_cos[i, j], descending=True, stable=True)
    used: set[int] = set()
    pairs = []
    for a, b in zip(i[order].tolist(), j[order].tolist(), strict=True):
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
        if a in used or b in used or not differing_kinds(attrs[a], attrs[b]):
            continue
        used.update((a, b))
        pairs.append((a, b))
    return pairs


def pair_record(
    index: int, rows: tuple[dict, dict], images: list[str], cos: tuple[float, float], rng: random.Random
) -> dict:
    """One line of ``mmvp_pairs.jsonl``: question, options, answers and statements of a pair of scenes."""
    from align.data.shapes_text import ANSWER_HINT, QUESTIONS, answer, statement

    a, b = (r["attributes"] for r in rows)
    differs = differing_kinds(a, b)
    kind = differs[0]
    answers = [answer(a, kind), answer(b, kind)]
    options = rng.sample(answers, 2)
    return {
        "id": f"mmvp-{index:04d}",
        "ids": [r["id"] for r in rows],
        "images": images,
        "kind": kind,
        "differs": differs,
        "question": rng.choice(QUESTIONS[kind]) + ANSWER_HINT,
        "options": options,
        "answers": answers,
        "texts": [statement(a, kind), statement(b, kind)],
        "clip_cos": round(cos[0], 6),
        "dino_cos": round(cos[1], 6),
    }


def mine_mmvp_pairs(
    shapes_dir: str | os.PathLike,
    clip: str = "tiny-clip-shapes",
    dino: str = "tiny-dinov2",
    out: str | os.PathLike | None = None,
    *,
    split: str = "test",
    clip_quantile: float = CLIP_QUANTILE,
    dino_quantile: float = DINO_QUANTILE,
    max_pairs: int | None = None,
    seed: int = 0,
) -> dict:
    """Find the CLIP-blind pairs of a shapes world's ``split``; write ``out/mmvp_pairs.jsonl`` and
    ``out/mmvp_meta.json`` (``out`` defaults to ``shapes_dir``). Returns the meta record.

    ``clip_min`` / ``dino_max`` are the ``clip_quantile`` / ``dino_quantile`` quantiles of the two towers'
    cosines over all pairs of the split's scenes."""
    from align.data.images import open_image
    from align.data.shapes import load_shapes
    from align.io import atomic_path, write_json
    from align.paths import portable

    shapes_dir = Path(shapes_dir)
    if not (shapes_dir / "pairs.jsonl").is_file() or not (shapes_dir / "classes.json").is_file():
        raise UserError(f"{shapes_dir}: not a shapes-world folder (no pairs.jsonl / classes.json)")
    if not (0.0 <= clip_quantile <= 1.0 and 0.0 <= dino_quantile <= 1.0):
        raise UserError(f"quantiles must lie in [0, 1]; got clip {clip_quantile}, dino {dino_quantile}")
    if max_pairs is not None and max_pairs < 1:
        raise UserError(f"max_pairs must be at least 1, got {max_pairs}")
    rows = load_shapes(shapes_dir, split=split)
    if len(rows) < 2:
        raise UserError(f"{shapes_dir}: {len(rows)} scene(s) in split {split!r}; need at least 2")
    out = Path(out) if out is not None else shapes_dir
    clip_cos, dino_cos = image_cosines(clip, dino, [open_image(Path(r["image"])) for r in rows])
    attrs = [r["attributes"] for r in rows]
    upper = torch.triu_indices(len(rows), len(rows), offset=1)
    clip_all, dino_all = clip_cos[upper[0], upper[1]], dino_cos[upper[0], upper[1]]
    clip_min, dino_max = (
        float(torch.quantile(clip_all, clip_quantile)),
        float(torch.quantile(dino_all, dino_quantile)),
    )
    chosen = select_pairs(clip_cos, dino_cos, attrs, clip_min, dino_max, max_pairs)
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    records = [
        pair_record(
            k,
            (rows[i], rows[j]),
            [Path(os.path.relpath(rows[m]["image"], out.resolve())).as_posix() for m in (i, j)],
            (float(clip_cos[i, j]), float(dino_cos[i, j])),
            rng,
        )
        for k, (i, j) in enumerate(chosen)
    ]
    meta = {
        "clip": portable(clip, out),
        "dino": portable(dino, out),
        "split": split,
        "clip_quantile": clip_quantile,
        "dino_quantile": dino_quantile,
        "clip_min": round(clip_min, 6),
        "dino_max": round(dino_max, 6),
        "max_pairs": max_pairs,
        "seed": seed,
        "scenes": len(rows),
        "candidates": int(((clip_all >= clip_min) & (dino_all <= dino_max)).sum()),
        "pairs": len(records),
        "by_kind": {kind: sum(r["kind"] == kind for r in records) for kind in QUESTION_ORDER},
        "clip_cos_quantiles": _quantiles(clip_all),
        "dino_cos_quantiles": _quantiles(dino_all),
    }
    with atomic_path(out / MMVP_PAIRS) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_json(out / MMVP_META, meta)
    return meta


def _quantiles(values: Tensor) -> dict[str, float]:
    qs = (0.01, 0.1, 0.5, 0.9, 0.99)
    return {
        f"q{round(q * 100):02d}": round(float(v), 4)
        for q, v in zip(qs, torch.quantile(values, torch.tensor(qs)), strict=True)
    }


def load_mmvp_pairs(path: str | os.PathLike) -> list[dict]:
    """Rows of an ``mmvp_pairs.jsonl`` (or a folder holding one), checked, image paths made absolute."""
    from align.io import read_jsonl

    path = Path(path)
    path = path / MMVP_PAIRS if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path}: not found; write it with `mllm-swap data mmvp --data SHAPES_DIR`")
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        for key in ("images", "texts", "answers"):
            if not isinstance(row.get(key), list) or len(row[key]) != 2:
                raise UserError(f"{path}:{n}: '{key}' must be a list of 2, found {row.get(key)!r}")
        row["images"] = [str((path.parent / p).resolve()) for p in row["images"]]
        missing = [p for p in row["images"] if not Path(p).is_file()]
        if missing:
            raise UserError(f"{path}:{n}: image(s) not found: {missing}")
    if not rows:
        raise UserError(f"{path}: no pairs (lower --clip-min or raise --dino-max when mining)")
    return rows


def mmvp_vlm_score(image_emb: Tensor, text_emb: Tensor) -> dict[str, float]:
    """MMVP-VLM: ``[P, 2, D]`` images and statements (statement ``k`` describes image ``k``). Each image
    picks the statement it is more similar to (strictly); a pair counts only if both images pick their
    own. Returns the score, its standard error (sample sd / sqrt(P), as lmms-eval's ``mean_stderr``), the
    per-image accuracy, chance (0.25) and P."""
    if image_emb.shape[:2] != text_emb.shape[:2] or image_emb.shape[1] != 2:
        raise ValueError(
            f"expected [P, 2, D] images and texts, found {tuple(image_emb.shape)}, {tuple(text_emb.shape)}"
        )
    sims = torch.einsum(
        "pid,ptd->pit", F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    )
    own = torch.stack([sims[:, 0, 0] > sims[:, 0, 1], sims[:, 1, 1] > sims[:, 1, 0]], dim=1)
    hits = own.all(dim=1).float()
    n = len(hits)
    score = float(hits.mean()) if n else math.nan
    stderr = float(hits.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return {
        "mmvp_vlm": score,
        "mmvp_vlm_stderr": stderr,
        "image_acc": float(own.float().mean()),
        "chance": CHANCE,
        "n": n,
    }
