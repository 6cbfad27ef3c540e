"""Rank vision/text encoder pairs by how alike their similarity structure is on the same samples
(freeze_align section 4.1, SAIL's alignment probing).

Image feature = mean of all final-layer tokens of the vision encoder (prefix tokens included);
text feature = the text model's own sentence embedding, averaged over a sample's captions. CKA is
debiased (unbiased HSIC) unless asked otherwise; every CKA score comes with its noise floor, the same
score against row-permuted text features (``NULL_PERMUTATIONS`` shuffles: mean ± sd). The result dict
(written as ``scores.json``) and its plain-text table are read back by the demo's report.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import torch
from tqdm import tqdm

from align.errors import UserError

METRICS = {
    "cka": "linear CKA",
    "rbf_cka": "RBF CKA (median width)",
    "mknn": "mutual k-NN",
    "probe": "probe R@10 (mean i2t/t2i)",
}
NULL_KERNELS = {"cka": "linear", "rbf_cka": "rbf"}  # metrics shown with a permutation noise floor
NULL_PERMUTATIONS = 10


def parse_metrics(value: str) -> list[str]:
    """Comma-separated metric names, checked against ``METRICS``."""
    names = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise UserError(
            f"--metrics: unknown metric(s) {unknown or [value]}; expected a subset of {list(METRICS)}"
        )
    return names


def load_samples(data: str, n: int, seed: int, on_error: str) -> list:
    """Up to ``n`` samples with an image and at least one caption (a seeded random subset)."""
    from align.data.readers import open_data

    samples = [s for s in open_data(data, on_error=on_error) if s.image is not None and s.texts]
    if not samples:
        raise UserError(f"{data}: no samples with both an image and a caption")
    if len(samples) > n:
        keep = sorted(random.Random(seed).sample(range(len(samples)), n))
        samples = [samples[i] for i in keep]
    return samples


@torch.no_grad()
def image_features(encoder, samples: Sequence, batch_size: int, device: str) -> torch.Tensor:
    """Mean over all final-layer tokens, ``[N, D]`` float32 on the CPU."""
    from align.data.images import open_image

    encoder.to(device).eval()
    out = []
    desc = f"image features {encoder.source or type(encoder).__name__}"
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch"):
        images = [open_image(s.image) for s in samples[start : start + batch_size]]
        pixels = encoder.preprocess(images).to(device)
        out.append(encoder(pixels).float().mean(dim=1).cpu())
    return torch.cat(out)


@torch.no_grad()
def text_features(encoder, samples: Sequence, batch_size: int, device: str) -> torch.Tensor:
    """Sentence embedding of every caption, averaged per sample: ``[N, D]`` float32 on the CPU."""
    encoder.to(device).eval()
    texts = [t for s in samples for t in s.texts]
    owner = torch.tensor([i for i, s in enumerate(samples) for _ in s.texts])
    emb = []
    desc = f"text features {encoder.source or type(encoder).__name__}"
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
        emb.append(encoder.encode(texts[start : start + batch_size], batch_size=batch_size).float())
    emb = torch.cat(emb)
    sums = torch.zeros(len(samples), emb.shape[1]).index_add_(0, owner, emb)
    return sums / torch.bincount(owner, minlength=len(samples))[:, None].float()


def pair_scores(
    img: torch.Tensor, txt: torch.Tensor, metrics: Sequence[str], k: int, seed: int, debiased: bool = True
) -> dict:
    """Every requested metric for one (vision, text) feature pair; ``probe`` adds its details and
    each CKA metric its noise floor under ``null`` (see :func:`align.metrics.cka.cka_null`)."""
    from align.metrics.cka import cka_null, linear_cka, mutual_knn, rbf_cka
    from align.metrics.probe import alignment_probe

    out: dict = {}
    for metric in metrics:
        if metric == "cka":
            out[metric] = linear_cka(img, txt, debiased=debiased)
        elif metric == "rbf_cka":
            out[metric] = rbf_cka(img, txt, debiased=debiased)
        elif metric == "mknn":
            out[metric] = mutual_knn(img, txt, k=k)
        else:
            details = alignment_probe(img, txt, seed=seed)
            out[metric] = 0.5 * (details["i2t_R@10"] + details["t2i_R@10"])
            out["probe_details"] = details
        if metric in NULL_KERNELS:
            null = cka_null(img, txt, NULL_KERNELS[metric], debiased, NULL_PERMUTATIONS, seed)
            out.setdefault("null", {})[metric] = null
    return out


def rank_pairs(
    vision_ids: list[str],
    text_ids: list[str],
    data: str,
    samples: Sequence,
    metrics: list[str],
    *,
    knn: int,
    seed: int,
    debiased: bool,
    batch_size: int,
    device: str,
) -> dict:
    """Score every vision x text pair on ``samples``: the ``scores.json`` dict, pairs ranked by the first
    metric and a ``grid`` per metric (vision rows, text columns)."""
    from align.load import load_text_encoder, load_vision_encoder

    text_feats = {tid: text_features(load_text_encoder(tid), samples, batch_size, device) for tid in text_ids}
    rows = []
    for vid in vision_ids:
        img = image_features(load_vision_encoder(vid), samples, batch_size, device)
        for tid in text_ids:
            rows.append(
                {
                    "vision": vid,
                    "text": tid,
                    **pair_scores(img, text_feats[tid], metrics, knn, seed, debiased),
                }
            )
    by_pair = {(r["vision"], r["text"]): r for r in rows}
    return {
        "data": str(data),
        "n": len(samples),
        "vision": vision_ids,
        "text": text_ids,
        "metrics": metrics,
        "cka_estimator": "debiased (unbiased HSIC)" if debiased else "biased",
        "features": {
            "image": "mean of all final-layer tokens",
            "text": "sentence embedding, mean over captions",
        },
        "grid": {m: [[by_pair[v, t][m] for t in text_ids] for v in vision_ids] for m in metrics},
        "pairs": sorted(rows, key=lambda r: -r[metrics[0]]),
    }


def save_ranking(result: dict, out: str) -> str:
    """Write ``out/scores.json`` (paths relative to ``out``) and one ``heatmap_<metric>.png`` per metric;
    returns the path of ``scores.json``."""
    from align.io import write_json
    from align.paths import portable_tree

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "scores.json")
    write_json(path, portable_tree(result, out))
    for metric in result["metrics"]:
        save_heatmap(
            os.path.join(out, f"heatmap_{metric}.png"),
            result["grid"][metric],
            result["vision"],
            result["text"],
            f"{METRICS[metric]} (n={result['n']})",
        )
    return path


def save_heatmap(path: str, values: list[list[float]], rows: list[str], cols: list[str], title: str) -> None:
    """Vision rows x text columns, annotated, written atomically as PNG."""
    from align.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.2 + 0.6 * len(rows)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    low, high = image.get_clim()
    for r, row in enumerate(values):
        for c, value in enumerate(row):
            dark = value > (low + high) / 2  # bright cell: dark text
            ax.text(
                c, r, f"{value:.3f}", ha="center", va="center", color="black" if dark else "white", fontsize=8
            )
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def format_table(pairs: list[dict], metrics: Sequence[str]) -> str:
    """Plain-text ranking (already sorted by the first metric); each CKA metric is followed by its
    noise floor column ``<metric> null`` (mean ± sd against permuted text features)."""
    columns = table_columns(metrics)
    header = ["rank", "vision", "text", *columns]
    lines = [
        [str(i + 1), p["vision"], p["text"], *(score_cell(p, c) for c in columns)]
        for i, p in enumerate(pairs)
    ]
    widths = [max(len(row[c]) for row in [header, *lines]) for c in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*row) for row in [header, *lines])


def table_columns(metrics: Sequence[str]) -> list[str]:
    """The metrics, each CKA metric followed by its ``<metric> null`` column."""
    return [c for m in metrics for c in ([m, f"{m} null"] if m in NULL_KERNELS else [m])]


def score_cell(pair: dict, column: str) -> str:
    """A score (4 decimals) or, for ``<metric> null``, its noise floor as ``mean±sd``."""
    if column.endswith(" null"):  # scores.json of an older version has no noise floor: "-"
        null = pair.get("null", {}).get(column.removesuffix(" null"))
        return f"{null['mean']:+.4f}±{null['sd']:.4f}" if null else "-"
    return f"{pair[column]:.4f}"


def null_note(result: dict) -> str:
    """One line saying what the ``null`` columns are, for under a score table."""
    if not any(m in NULL_KERNELS for m in result["metrics"]):
        return ""
    return (
        f"null: the same {result.get('cka_estimator', 'biased')} CKA against the text features with their rows "
        f"shuffled ({NULL_PERMUTATIONS} shuffles, n={result['n']}): mean±sd; CKA differences within a "
        "few sd are noise."
    )
