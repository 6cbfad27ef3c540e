"""Concept-balanced curation (freeze_align): pick up to K image-text pairs per concept, rarest concept first.

1. Prototypes: per concept, the mean of L2-normalized CLIP image embeddings of a few example images,
   renormalized (:func:`concept_prototypes`).
2. Scores: cosine of every caption's CLIP text embedding to every prototype, ``[N, C]``.
3. Selection (:func:`select_balanced`): a sample is a candidate of concept ``c`` when ``c`` is among its
   ``top_k`` best concepts and its score reaches ``min_score``. Concepts are visited from the fewest
   candidates to the most (ties by concept order); each takes its unclaimed candidates, best score first,
   up to ``k``. A sample is claimed at most once.

``curate(...)`` runs the whole thing on a pairs source and writes ``curated.jsonl`` (the chosen rows with
``concept`` and ``score``) and ``concept_counts.json`` / ``concept_counts.tsv`` (candidates and kept per
concept) into an output directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from align.io import atomic_path, write_json

__all__ = ["concept_prototypes", "curate", "fewshot_from_folder", "select_balanced", "shapes_fewshot"]


def concept_prototypes(embeddings: Sequence[Tensor]) -> Tensor:
    """``[C, D]`` prototypes from one ``[n_c, D]`` tensor of image embeddings per concept."""
    if not embeddings or any(e.ndim != 2 or e.shape[0] == 0 for e in embeddings):
        raise ValueError("every concept needs at least one example embedding [n_c, D]")
    return F.normalize(torch.stack([F.normalize(e.float(), dim=-1).mean(0) for e in embeddings]), dim=-1)


def select_balanced(
    scores: Tensor, k: int = 2000, top_k: int | None = 1, min_score: float | None = None
) -> tuple[list[list[int]], list[int]]:
    """(chosen sample indices per concept, candidate count per concept) from ``scores [N, C]``.

    Candidates of concept ``c``: samples with ``c`` among their ``top_k`` concepts (``None``: any) and a
    score ``>= min_score`` (``None``: any). Rarest concept first; each concept takes its unclaimed
    candidates by descending score (ties: lower index first), at most ``k``; no sample twice.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], found shape {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, found {k}")
    n, c = scores.shape
    candidate = torch.ones(n, c, dtype=torch.bool)
    if top_k is not None:
        top = scores.topk(min(top_k, c), dim=1).indices
        candidate = torch.zeros(n, c, dtype=torch.bool).scatter_(1, top, True)
    if min_score is not None:
        candidate &= scores >= min_score
    counts = candidate.sum(0).tolist()
    claimed = torch.zeros(n, dtype=torch.bool)
    chosen: list[list[int]] = [[] for _ in range(c)]
    for concept in sorted(range(c), key=lambda j: (counts[j], j)):
        idx = torch.nonzero(candidate[:, concept] & ~claimed).flatten()
        if idx.numel() == 0:
            continue
        # stable sort on descending score keeps lower indices first among ties
        order = torch.sort(-scores[idx, concept], stable=True).indices
        take = idx[order[:k]]
        claimed[take] = True
        chosen[concept] = take.tolist()
    return chosen, counts


def fewshot_from_folder(root: str | os.PathLike, shots: int | None = None) -> dict[str, list[Path]]:
    """Example images per concept from ``root/<concept>/<image>`` (the first ``shots`` by name)."""
    from align.data.readers import read_image_folder

    samples, classes = read_image_folder(root)
    out: dict[str, list[Path]] = {c: [] for c in classes}
    for s in sorted(samples, key=lambda s: str(s.image)):
        if s.label is not None and (shots is None or len(out[s.label]) < shots):
            out[s.label].append(Path(s.image))
    return out


def shapes_fewshot(
    data: str | os.PathLike, attribute: str, shots: int = 8, split: str = "train"
) -> dict[str, list[Path]]:
    """Example images per value of a shapes-world ``attribute`` (``color``, ``shape``, or ``object`` =
    "colour shape"), the first ``shots`` of ``split`` in file order."""
    from align.data.shapes import load_shapes

    out: dict[str, list[Path]] = {}
    for row in load_shapes(data, split):
        attrs = row["attributes"]
        if attribute == "object":
            name = f"{attrs['color']} {attrs['shape']}"
        elif attribute in attrs and isinstance(attrs[attribute], str):
            name = attrs[attribute]
        else:
            raise ValueError(
                f"{data}: attribute {attribute!r} is not a shapes concept; expected color, shape or object"
            )
        if len(out.setdefault(name, [])) < shots:
            out[name].append(Path(row["image"]))
    return dict(sorted(out.items()))


def curate(
    model: str | os.PathLike,
    data: str | os.PathLike,
    concepts: Mapping[str, Sequence[str | os.PathLike]],
    out: str | os.PathLike,
    k: int = 2000,
    top_k: int | None = 1,
    min_score: float | None = None,
    split: str | None = None,
    caption_col: str | None = None,
) -> dict:
    """Curate ``data`` (a pairs source) against ``concepts`` (name -> example images) with CLIP ``model``.

    Writes ``curated.jsonl``, ``concept_counts.json`` and ``concept_counts.tsv`` into ``out``; returns
    the counts summary.
    """
    from PIL import Image

    from align.data.readers import open_data
    from align.load import load_dual_encoder

    if not concepts:
        raise ValueError("no concepts given: need at least one concept with example images")
    empty = [name for name, paths in concepts.items() if not paths]
    if empty:
        raise ValueError(f"concepts without example images: {empty}")
    dual = load_dual_encoder(model)
    names = list(concepts)
    protos = concept_prototypes(
        [dual.encode_pil([Image.open(p).convert("RGB") for p in concepts[name]]) for name in names]
    )
    src = open_data(data, split=split, text_col=caption_col)
    samples = [s for s in src.samples if s.texts]
    if not samples:
        raise ValueError(f"{data}: no samples with a caption to score")
    text_emb = torch.cat(
        [dual.encode_texts([s.texts[0] for s in samples[i : i + 512]]) for i in range(0, len(samples), 512)]
    )
    scores = text_emb @ protos.T
    chosen, counts = select_balanced(scores, k=k, top_k=top_k, min_score=min_score)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "curated.jsonl") as tmp, tmp.open("w") as fh:
        for c, idx in enumerate(chosen):
            for i in idx:
                s = samples[i]
                row = {"id": s.id, "image": str(s.image), "caption": s.texts[0], "concept": names[c]}
                fh.write(json.dumps({**row, "score": round(float(scores[i, c]), 6)}) + "\n")
    table = [{"concept": n, "candidates": counts[c], "kept": len(chosen[c])} for c, n in enumerate(names)]
    summary = {"model": str(model), "data": str(data), "k": k, "top_k": top_k, "min_score": min_score,
               "samples": len(samples), "kept": sum(len(c) for c in chosen), "concepts": table}  # fmt: skip
    write_json(out / "concept_counts.json", summary)
    with atomic_path(out / "concept_counts.tsv") as tmp:
        tmp.write_text(
            "concept\tcandidates\tkept\n"
            + "".join(f"{r['concept']}\t{r['candidates']}\t{r['kept']}\n" for r in table)
        )
    return summary
