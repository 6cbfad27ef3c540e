"""What each vision tower knows, measured: linear probes of labelled attributes on frozen features.

For every encoder (any spec :func:`align.load.load_vision_encoder` takes) and every attribute (the shapes
world's ``color``, ``shape``, ``count``, ``position``, or any scalar attribute a data source's samples
carry), a linear probe (:func:`align.metrics.linear_probe.linear_probe`) is fitted on the training
split's frozen features and scored on the test split, next to chance and the majority class. Two
features per encoder:

* ``cls``: its global output, the CLS token after the final norm (``projected`` for towers without one,
  e.g. SigLIP or an aligned artifact's head);
* ``patch_mean``: the patch tokens an MLLM's connector sees, mean-pooled: the layer LLaVA consumes
  (``-2``; ``-1`` for an aligned artifact with a token head, which swaps in on the layer it was trained on),
  prefix tokens (CLS, registers) dropped;
* ``patch_grid``: the same tokens mean-pooled to a coarse ``GRID x GRID`` grid and concatenated: where
  things are survives (a LLaVA reads every patch token; a mean over them keeps no layout).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from align.errors import UserError
from align.rundir import OutDir, claims_out_dir

__all__ = [
    "DEFAULT_LABELS",
    "FEATURES",
    "ProbeData",
    "consumer_layer",
    "encoder_features",
    "format_table",
    "parse_labels",
    "probe_attributes",
    "read_probe_data",
    "run_probe",
    "save_probe",
]

DEFAULT_LABELS = ("color", "shape", "count", "position")
FEATURES = ("cls", "patch_mean", "patch_grid")
GRID = 4  # cells per side of patch_grid
SCALARS = (str, int, float, bool)


@dataclass
class ProbeData:
    """The labelled samples of both splits: ``classes[label]`` is the sorted class list and
    ``train_y[label]`` / ``test_y[label]`` the class indices per sample (``-1``: a test class unseen in
    training, which the probe can only get wrong)."""

    source: str
    splits: tuple[str, str]
    train: list
    test: list
    classes: dict[str, list[str]]
    train_y: dict[str, torch.Tensor]
    test_y: dict[str, torch.Tensor]


def parse_labels(value: str | Sequence[str]) -> list[str]:
    """Comma-separated attribute names (or a list), in order, without duplicates."""
    names = value.split(",") if isinstance(value, str) else list(value)
    labels = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not labels:
        raise UserError(f"--labels: expected attribute names, comma-separated (e.g. {','.join(DEFAULT_LABELS)}), found {value!r}")
    return labels


def sample_attributes(sample) -> dict:
    """A sample's scalar attributes: its ``attributes`` record (shapes world) or else its other columns,
    plus ``label`` when it has one."""
    meta = sample.meta.get("attributes") if isinstance(sample.meta.get("attributes"), dict) else sample.meta
    found = {k: str(v) for k, v in meta.items() if isinstance(v, SCALARS) and k != "split"}
    if sample.label is not None:
        found.setdefault("label", sample.label)
    return found


def read_probe_data(
    data: str | os.PathLike,
    labels: Sequence[str] = DEFAULT_LABELS,
    train_split: str = "train",
    test_split: str = "test",
    on_error: str = "raise",
) -> ProbeData:
    """Both splits of ``data`` (any :func:`align.data.readers.open_data` source) with every label checked:
    present on every sample, and at least two classes among the training samples."""
    from align.data.readers import open_data

    splits = {}
    for flag, split in (("--train-split", train_split), ("--test-split", test_split)):
        samples = [s for s in open_data(data, split=split, on_error=on_error) if s.image is not None]
        if not samples:
            raise UserError(f"{data}: no samples with an image in split {split!r} ({flag}); a probe needs "
                            f"a {train_split!r} split to fit on and a {test_split!r} split to score")  # fmt: skip
        splits[split] = [sample_attributes(s) for s in samples], samples
    (train_attrs, train), (test_attrs, test) = splits[train_split], splits[test_split]
    available = sorted({k for attrs in train_attrs for k in attrs})
    classes, train_y, test_y = {}, {}, {}
    for label in labels:
        for split, attrs in ((train_split, train_attrs), (test_split, test_attrs)):
            missing = [i for i, a in enumerate(attrs) if label not in a]
            if missing:
                raise UserError(
                    f"{data}: attribute {label!r} (--labels) is missing on {len(missing)} of {len(attrs)} "
                    f"{split!r} samples (first: sample {missing[0]}); attributes found: {', '.join(available)}"
                )
        names = sorted({a[label] for a in train_attrs}, key=_natural)
        if len(names) < 2:
            raise UserError(
                f"{data}: attribute {label!r} has one class ({names[0]!r}) in split {train_split!r}; "
                "a probe needs at least two classes to tell apart"
            )
        index = {name: i for i, name in enumerate(names)}
        classes[label] = names
        train_y[label] = torch.tensor([index[a[label]] for a in train_attrs])
        test_y[label] = torch.tensor([index.get(a[label], -1) for a in test_attrs])
    return ProbeData(str(data), (train_split, test_split), train, test, classes, train_y, test_y)


def _natural(name: str) -> tuple:
    """Numbers in numeric order, before words in alphabetical order."""
    try:
        return (0, float(name), "")
    except ValueError:
        return (1, 0.0, name)


def consumer_layer(encoder) -> int:
    """The hidden state an MLLM's connector reads: ``-2`` (LLaVA), or ``-1`` behind an aligned token head."""
    return -1 if getattr(encoder, "image_head", None) is not None else -2


def global_pool(encoder) -> str:
    """The encoder's global output: ``cls`` where it has a CLS token, else ``projected``."""
    if "cls" in encoder.poolings and encoder.num_prefix_tokens > 0:
        return "cls"
    if "projected" in encoder.poolings:
        return "projected"
    raise UserError(f"{encoder.source}: no global output (no CLS token and no projection) to probe")


@torch.no_grad()
def encoder_features(encoder, samples: Sequence, batch_size: int = 64, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``{"cls": [N, D], "patch_mean": [N, D'], "patch_grid": [N, GRID^2 D']}`` float32 on the CPU (module doc)."""
    from align.data.images import open_image

    encoder.to(device).eval()
    pool, layer, prefix = global_pool(encoder), consumer_layer(encoder), encoder.num_prefix_tokens
    out: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    desc = f"probe features {encoder.source or type(encoder).__name__}"
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch"):
        pixels = encoder.preprocess([open_image(s.image) for s in samples[start : start + batch_size]]).to(device)
        out["cls"].append(encoder.pooled(pixels, pool).float().cpu())
        patches = encoder(pixels, layer=layer)[:, prefix:].float()
        out["patch_mean"].append(patches.mean(dim=1).cpu())
        out["patch_grid"].append(grid_pool(patches, encoder.source).cpu())
    return {name: torch.cat(rows) for name, rows in out.items()}


def grid_pool(patches: torch.Tensor, source: object = None) -> torch.Tensor:
    """Patch tokens ``[N, side^2, D]`` (row-major) mean-pooled to ``[N, GRID * GRID * D]`` (adaptive cells)."""
    n, count, dim = patches.shape
    side = round(count**0.5)
    if side * side != count:
        raise UserError(f"{source}: {count} patch tokens do not form a square grid; patch_grid needs one")
    grid = patches.transpose(1, 2).reshape(n, dim, side, side)
    return torch.nn.functional.adaptive_avg_pool2d(grid, GRID).flatten(1)


def describe_features(encoder) -> dict[str, str]:
    """What each of :data:`FEATURES` is for this encoder, in words."""
    prefix = encoder.num_prefix_tokens
    tokens = f"the patch tokens of layer {consumer_layer(encoder)} ({prefix} prefix token(s) dropped)"
    return {
        "cls": "CLS token after the final norm" if global_pool(encoder) == "cls" else "projected image embedding",
        "patch_mean": f"mean of {tokens}",
        "patch_grid": f"{tokens} mean-pooled to a {GRID}x{GRID} grid, concatenated",
    }


def probe_attributes(
    encoders: Sequence[str], data: ProbeData, *, batch_size: int = 64, device: str = "cpu", l2: float = 1e-3
) -> dict:
    """Probe every attribute of ``data`` in every encoder's features: the ``probe.json`` record."""
    from align.load import load_vision_encoder
    from align.metrics.linear_probe import linear_probe

    rows, described = [], []
    for spec in encoders:
        encoder = load_vision_encoder(spec)
        described.append({"encoder": str(spec), "kind": encoder.kind, "features": describe_features(encoder)})
        train = encoder_features(encoder, data.train, batch_size, device)
        test = encoder_features(encoder, data.test, batch_size, device)
        for feature in FEATURES:
            for label, names in data.classes.items():
                scores = linear_probe(train[feature], data.train_y[label], test[feature], data.test_y[label],
                                      len(names), l2=l2)  # fmt: skip
                rows.append({"encoder": str(spec), "feature": feature, "attribute": label, **scores})
    return {
        "data": data.source,
        "splits": {"train": data.splits[0], "test": data.splits[1]},
        "classes": data.classes,
        "probe": {
            "model": "multinomial logistic regression on standardized features",
            "fit": "full-batch L-BFGS from zero weights (deterministic)",
            "l2": l2,
            "chance": "1 / number of classes",
            "majority": "test accuracy of always answering the most frequent training class",
        },
        "encoders": described,
        "results": rows,
    }


COLUMNS = ("encoder", "feature", "attribute", "accuracy", "stderr", "chance", "majority", "n_test")


def format_table(result: dict) -> str:
    """The results as a markdown table (accuracies with 3 decimals)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in result["results"]:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_probe(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``probe.json`` (paths relative to ``out_dir``), ``probe.md`` and the bar chart ``probe.png``."""
    from align.io import atomic_path, write_json
    from align.paths import portable_tree

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "probe.json", portable_tree(result, out))
    with atomic_path(out / "probe.md") as tmp:
        Path(tmp).write_text(f"# Linear probes on {Path(result['data']).name}\n\n{format_table(result)}\n")
    save_chart(result, out / "probe.png")
    return [out / "probe.json", out / "probe.md", out / "probe.png"]


def save_chart(result: dict, path: Path) -> None:
    """Grouped bars: test accuracy per attribute, one bar per (encoder, feature), chance as a tick."""
    from align.plots import pyplot, save_figure

    plt = pyplot()
    attributes = list(result["classes"])
    groups = list(dict.fromkeys((r["encoder"], r["feature"]) for r in result["results"]))
    by_key = {(r["encoder"], r["feature"], r["attribute"]): r for r in result["results"]}
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(4.0 + 1.4 * len(attributes), 3.6))
    for g, (encoder, feature) in enumerate(groups):
        xs = [a + (g - (len(groups) - 1) / 2) * width for a in range(len(attributes))]
        rows = [by_key[encoder, feature, attr] for attr in attributes]
        ax.bar(xs, [r["accuracy"] for r in rows], width, yerr=[r["stderr"] for r in rows],
               label=f"{Path(encoder).name} {feature}", capsize=2)  # fmt: skip
    for a, attr in enumerate(attributes):
        chance = 1 / len(result["classes"][attr])
        ax.hlines(chance, a - 0.45, a + 0.45, colors="black", linestyles="dashed", label="chance" if a == 0 else None)
    ax.set_xticks(range(len(attributes)), attributes)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"linear probes (n_test={result['results'][0]['n_test']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


@claims_out_dir("probe")
def run_probe(
    encoders: Sequence[str], data: ProbeData, out_dir: str | os.PathLike, *, overwrite: bool = False, **opts
) -> dict:
    """:func:`probe_attributes` written to ``out_dir`` (claimed as an output of ``probe``)."""
    result = probe_attributes(encoders, data, **opts)
    OutDir.current(out_dir).finish(owns=[path.name for path in save_probe(result, out_dir)])
    return result
