"""``mllm-swap score``: rank vision/text encoder pairs by how well they will align (freeze-align
section 4.1, SAIL's alignment probing), or reproduce freeze-align's CKA toy experiment.

Two forms::

    mllm-swap score --vision ID[,ID] --text ID[,ID] --data pairs.jsonl --n 5000 --out DIR [--metrics ...]
    mllm-swap score toy --out DIR [--instances 200] [--n 32] [--d 16] [--seed 0]

Image feature = mean of all final-layer tokens of the vision encoder (prefix tokens included);
text feature = the text model's own sentence embedding, averaged over a sample's captions. CKA is
debiased (unbiased HSIC) unless ``--biased-cka``; every CKA score comes with its noise floor, the same
score against row-permuted text features (``NULL_PERMUTATIONS`` shuffles: mean ± sd).
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Sequence

import torch
from tqdm import tqdm

from align.errors import UserError
from mllm_swap.cli import at_least, device

METRICS = {
    "cka": "linear CKA",
    "rbf_cka": "RBF CKA (median width)",
    "mknn": "mutual k-NN",
    "probe": "probe R@10 (mean i2t/t2i)",
}
NULL_KERNELS = {"cka": "linear", "rbf_cka": "rbf"}  # metrics shown with a permutation noise floor
NULL_PERMUTATIONS = 10


def _split_ids(value: str | None, flag: str) -> list[str]:
    ids = [v.strip() for v in (value or "").split(",") if v.strip()]
    if not ids:
        raise UserError(f"{flag} is required in the pairs form: one or more encoder ids, comma-separated")
    return ids


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


def run_pairs(args: argparse.Namespace) -> int:
    """Score every vision x text pair on the data and write scores.json, heatmaps and a table."""
    from align.encoders.registry import load_text_encoder, load_vision_encoder
    from align.io import write_json
    from align.paths import portable_tree

    vision_ids, text_ids = _split_ids(args.vision, "--vision"), _split_ids(args.text, "--text")
    if not args.data:
        raise UserError("--data is required in the pairs form (a pairs .jsonl/.csv, shapes dir, ...)")
    metrics = parse_metrics(args.metrics)
    if args.n < 4 or args.batch_size < 1:
        raise UserError(f"--n must be >= 4 and --batch-size >= 1, found {args.n} and {args.batch_size}")
    samples = load_samples(args.data, args.n, args.seed, args.on_error)
    if "mknn" in metrics and len(samples) <= args.knn:
        raise UserError(f"mknn needs more samples than --knn={args.knn}; {args.data} gave {len(samples)}")
    if "probe" in metrics and len(samples) < 20:
        raise UserError(
            f"probe needs at least 20 samples for a train/test split; {args.data} gave {len(samples)}"
        )
    text_feats = {}
    for tid in text_ids:
        text_feats[tid] = text_features(load_text_encoder(tid), samples, args.batch_size, args.device)
    rows = []
    for vid in vision_ids:
        img = image_features(load_vision_encoder(vid), samples, args.batch_size, args.device)
        for tid in text_ids:
            rows.append(
                {
                    "vision": vid,
                    "text": tid,
                    **pair_scores(img, text_feats[tid], metrics, args.knn, args.seed, not args.biased_cka),
                }
            )
    os.makedirs(args.out, exist_ok=True)
    grid = {m: [[_find(rows, v, t)[m] for t in text_ids] for v in vision_ids] for m in metrics}
    result = {
        "data": str(args.data),
        "n": len(samples),
        "vision": vision_ids,
        "text": text_ids,
        "metrics": metrics,
        "cka_estimator": "biased" if args.biased_cka else "debiased (unbiased HSIC)",
        "features": {
            "image": "mean of all final-layer tokens",
            "text": "sentence embedding, mean over captions",
        },
        "grid": grid,
        "pairs": sorted(rows, key=lambda r: -r[metrics[0]]),
    }
    write_json(os.path.join(args.out, "scores.json"), portable_tree(result, args.out))
    for metric in metrics:
        save_heatmap(
            os.path.join(args.out, f"heatmap_{metric}.png"),
            grid[metric],
            vision_ids,
            text_ids,
            f"{METRICS[metric]} (n={len(samples)})",
        )
    print(format_table(result["pairs"], metrics))
    print(null_note(result))
    print(f"wrote {os.path.join(args.out, 'scores.json')} and {len(metrics)} heatmap(s)")
    return 0


def _find(rows: list[dict], vision: str, text: str) -> dict:
    return next(r for r in rows if r["vision"] == vision and r["text"] == text)


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


def run_toy_command(args: argparse.Namespace) -> int:
    """The freeze-align toy: toy.json and toy.png, and the correlation printed."""
    from align.metrics.toy import ToyConfig, run_toy, save_toy

    if any(getattr(args, f) for f in ("vision", "text", "data")):
        raise UserError("score toy takes no --vision/--text/--data (they belong to the pairs form)")
    n = 32 if args.n is None else args.n
    try:
        result = run_toy(ToyConfig(instances=args.instances, n=n, d=args.d, steps=args.steps, seed=args.seed))
    except ValueError as err:
        raise UserError(str(err)) from err
    json_path, png_path = save_toy(result, args.out)
    print(
        f"toy: {args.instances} instances, Pearson r(linear CKA, CLIP loss after {args.steps} steps) = "
        f"{result['pearson_r']:.3f}\nwrote {json_path} and {png_path}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch on the optional ``toy`` positional."""
    if args.mode == "toy":
        return run_toy_command(args)
    if args.n is None:
        args.n = 5000
    return run_pairs(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``score``."""
    parser = subparsers.add_parser(
        "score",
        help="rank vision/text encoder pairs by alignment (CKA, mutual k-NN, probe), or the CKA toy",
        description="Pairs form: encode --n samples of --data with every --vision and --text encoder (image "
        "feature: mean of all final-layer tokens; text: sentence embedding averaged over captions), score "
        "every pair with --metrics, write OUT/scores.json and OUT/heatmap_<metric>.png and print a ranked "
        "table. `score toy`: freeze-align's toy experiment (linear CKA vs the CLIP loss reached by linear "
        "maps), writing OUT/toy.json and OUT/toy.png.",
    )
    parser.add_argument(
        "mode", nargs="?", choices=["pairs", "toy"], default="pairs", help="pairs (default) or toy"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vision", help="vision encoder ids or directories, comma-separated")
    parser.add_argument("--text", help="text encoder ids or directories, comma-separated")
    parser.add_argument("--data", help="pairs .jsonl/.csv, shapes directory, HF dataset, tar shards")
    parser.add_argument(
        "--n", type=int, help="pairs: samples to use (default 5000); toy: points per instance (32)"
    )
    parser.add_argument("--metrics", default="cka,rbf_cka,mknn,probe", help=f"subset of {','.join(METRICS)}")
    parser.add_argument("--knn", type=at_least(1), default=10, help="k of mutual k-NN (default 10)")
    parser.add_argument(
        "--biased-cka",
        action="store_true",
        help="use the biased HSIC estimator (Kornblith et al. 2019) instead of the debiased one; it scores "
        "independent features well above 0 at small n",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument(
        "--on-error", choices=["raise", "skip"], default="raise", help="missing/corrupt images"
    )
    parser.add_argument("--seed", type=int, default=0, help="subset sampling, probe split and the toy")
    toy = parser.add_argument_group("toy form")
    toy.add_argument("--instances", type=int, default=200, help="toy instances (default 200)")
    toy.add_argument("--d", type=int, default=16, help="toy latent/feature width (default 16)")
    toy.add_argument("--steps", type=int, default=500, help="toy SGD steps (default 500)")
    parser.set_defaults(func=run)
