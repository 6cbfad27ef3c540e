"""What a swap changes, measured before any LLM training: the ``measurements`` of ``swap_report.json``.

On held-out images (a shapes world's test split, an image folder, or seeded shapes scenes), the patch tokens
the MLLM consumes from its tower (the family's :meth:`~mllm_swap.families.Family.consumed_tokens`: its layer,
after its prefix rule; prefix tokens a ``keep`` rule feeds are left out here) are taken before the swap (old)
and after it (new: the drop-in, the bridged tower, the rebuild or the fused tower), new patch grids resampled
to the old grid when they differ
(:func:`align.heads.resample_grid`). An image's feature is its tokens mean-pooled to a 4x4 grid
(:func:`align.evals.attributes.grid_pool`, the probes' ``patch_grid``), so CKA and k-NN compare images and
keep where things are. ``LLM inputs`` are the connector over the consumed tokens (the new one after a swap:
kept, bridged, rebuilt or fused). Every value is a float (``None`` where undefined):

========================  ==============================================================================
``token_cosine``          mean per-token cosine of new to old consumed tokens (``None`` when widths differ)
``token_cka``             debiased linear CKA (unbiased HSIC) of new vs old image features
``token_mknn``            mutual k-NN (k = 10) of new vs old image features
``llm_input_cosine``      mean per-token cosine of the new LLM inputs to the old ones
``llm_input_cka``         debiased linear CKA of new vs old LLM-input image features
``llm_input_mknn``        mutual k-NN of new vs old LLM-input image features
``llm_vocab_cosine``      mean over new LLM-input tokens of the cosine to the nearest row of the LLM's
                          input-embedding table (how close projected tokens lie to word embeddings)
``probe_old``             the old tower's linear-probe accuracy (mean over the shapes attributes) on
``probe_new``             the consumed tokens' image features; the new tower's likewise
========================  ==============================================================================

Probes (:func:`align.metrics.linear_probe.linear_probe`) are fitted on the first half of the labelled
images and scored on the second half; images without shapes attributes (a plain folder) are probed on seeded
shapes scenes instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from align.errors import UserError
from mllm_swap.families import Family, Loaded

NAMES = ("token_cosine", "token_cka", "token_mknn", "llm_input_cosine", "llm_input_cka", "llm_input_mknn",
         "llm_vocab_cosine", "probe_old", "probe_new")  # fmt: skip
PROBED = ("color", "shape", "count", "position")
KNN = 10
DEFAULT_IMAGES = 64
SCENE_SEED = 7919  # seeded shapes scenes, when no images are given


@dataclass
class HeldOut:
    """Held-out images; ``labels[attribute][i]`` of image i for the probes (``None``: the images carry none)."""

    images: list[Image.Image]
    labels: dict[str, list[str]] | None
    source: str


def scenes(n: int, size: int = 64, seed: int = SCENE_SEED) -> HeldOut:
    """``n`` seeded shapes scenes with their attributes."""
    import numpy as np

    from align.data.shapes import render

    rng = np.random.default_rng(seed)
    images, labels = [], {a: [] for a in PROBED}
    for _ in range(n):
        image, _, objects = render(rng, size)
        images.append(image)
        main = objects[0]
        for attribute, value in (("color", main["color"]), ("shape", main["shape"]),
                                 ("count", len(objects)), ("position", main["position"])):  # fmt: skip
            labels[attribute].append(str(value))
    return HeldOut(images, labels, f"{n} shapes scenes (seed {seed})")


def held_out(data: str | os.PathLike | None, n: int = DEFAULT_IMAGES) -> HeldOut:
    """The first ``n`` (or all, when fewer) held-out images of ``data``: a shapes world's test split (with its attributes), any image
    folder or data source (no labels), or (``None``) seeded shapes scenes."""
    if n < 4:
        raise UserError(f"measurements: need at least 4 held-out images (debiased CKA), asked for {n}")
    if data is None:
        return scenes(n)
    from align.data.images import open_image
    from align.data.readers import open_data

    shapes = (Path(data) / "pairs.jsonl").is_file()
    samples = [s for s in open_data(str(data), split="test" if shapes else None).samples if s.image is not None]
    if len(samples) < 4:
        raise UserError(f"--data {data}: {len(samples)} held-out image(s){' (test split)' if shapes else ''}; the "
                        "measurements need at least 4")  # fmt: skip
    samples = samples[:n]
    images = [open_image(s.image).convert("RGB") for s in samples]
    attrs = [s.meta.get("attributes") for s in samples]
    labels = None
    if shapes and all(isinstance(a, dict) and all(k in a for k in PROBED) for a in attrs):
        labels = {k: [str(a[k]) for a in attrs] for k in PROBED}
    return HeldOut(images, labels, f"{data} ({'test split, ' if shapes else ''}first {len(images)})")


@dataclass
class Snapshot:
    """What the MLLM makes of the held-out images: consumed tokens, LLM inputs, probe accuracy."""

    tokens: torch.Tensor  # [N, T, D]
    inputs: torch.Tensor | None  # [N, T, H]
    probe: float


def patch_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """The square patch grid of consumed ``tokens [N, T, D]``: prefix tokens a ``keep`` rule feeds (first) dropped."""
    side = math.isqrt(tokens.shape[1])
    return tokens[:, tokens.shape[1] - side * side :]


def image_features(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens ``[N, T, D]`` on a square grid -> ``[N, 16 D]`` (4x4 grid means, the probes' ``patch_grid``)."""
    from align.evals.attributes import grid_pool

    return grid_pool(tokens.float())


def connector_outputs(family: Family, loaded: Loaded, tokens: torch.Tensor) -> torch.Tensor | None:
    """The connector over consumed ``tokens``: what the LLM receives (``None`` for a family without one)."""
    try:
        path = family.trainable_parts(loaded.model)["connector"]
    except (ValueError, KeyError):
        return None
    connector = loaded.model.get_submodule(path)
    param = next(connector.parameters())
    with torch.no_grad():
        return connector(tokens.to(param.device, param.dtype)).float().cpu()


def probe_accuracy(features: torch.Tensor, labels: dict[str, list[str]]) -> float:
    """Mean over attributes of a linear probe's accuracy, fitted on the first half of the rows, scored on the rest."""
    from align.metrics.linear_probe import linear_probe

    half = features.shape[0] // 2
    scores = []
    for values in labels.values():
        names = sorted(set(values))
        y = torch.tensor([names.index(v) for v in values])
        scores.append(linear_probe(features[:half], y[:half], features[half:], y[half:], len(names))["accuracy"])
    return float(sum(scores) / len(scores))


@torch.no_grad()
def snapshot(family: Family, loaded: Loaded, held: HeldOut) -> Snapshot:
    """Run the MLLM's current tower (and connector) over ``held``."""
    tokens = patch_tokens(family.consumed_tokens(loaded, held.images).float().cpu())
    if held.labels is not None:
        probe = probe_accuracy(image_features(tokens), held.labels)
    else:
        probe_set = scenes(len(held.images))
        scene_tokens = patch_tokens(family.consumed_tokens(loaded, probe_set.images).float().cpu())
        probe = probe_accuracy(image_features(scene_tokens), probe_set.labels)
    return Snapshot(tokens, connector_outputs(family, loaded, tokens), probe)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of the cosine between ``a`` and ``b`` (same shape)."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def vocab_cosine(inputs: torch.Tensor, table: torch.Tensor) -> float:
    """Mean over the tokens of ``inputs [..., H]`` of the cosine to the nearest row of ``table [V, H]``."""
    unit = torch.nn.functional.normalize(inputs.reshape(-1, inputs.shape[-1]).float(), dim=-1)
    words = torch.nn.functional.normalize(table.float(), dim=-1)
    return float((unit @ words.T).max(dim=1).values.mean())


def compare(old: Snapshot, new: Snapshot, table: torch.Tensor | None) -> dict[str, float | None]:
    """The measurements (module doc) of ``new`` against ``old``; ``table``: the LLM's input embeddings."""
    from align.heads import resample_grid
    from align.metrics.cka import linear_cka, mutual_knn

    n, grid = old.tokens.shape[0], old.tokens.shape[1]
    side = round(grid**0.5)
    tokens = resample_grid(new.tokens, side) if new.tokens.shape[1] != grid else new.tokens
    k = min(KNN, n - 1)
    f_old, f_new = image_features(old.tokens), image_features(tokens)
    out: dict[str, float | None] = {
        "token_cosine": mean_cosine(tokens, old.tokens) if tokens.shape == old.tokens.shape else None,
        "token_cka": linear_cka(f_new, f_old, debiased=True),
        "token_mknn": mutual_knn(f_new, f_old, k=k),
        "llm_input_cosine": None, "llm_input_cka": None, "llm_input_mknn": None, "llm_vocab_cosine": None,
        "probe_old": old.probe,
        "probe_new": new.probe,
    }  # fmt: skip
    if old.inputs is not None and new.inputs is not None:
        inputs = resample_grid(new.inputs, side) if new.inputs.shape[1] != grid else new.inputs
        g_old, g_new = image_features(old.inputs), image_features(inputs)
        out.update(
            llm_input_cosine=mean_cosine(inputs, old.inputs),
            llm_input_cka=linear_cka(g_new, g_old, debiased=True),
            llm_input_mknn=mutual_knn(g_new, g_old, k=k),
            llm_vocab_cosine=None if table is None else vocab_cosine(inputs, table),
        )
    return out


def input_table(loaded: Loaded) -> torch.Tensor | None:
    """The LLM's input-embedding table ``[V, H]`` (``None`` when the model exposes none)."""
    try:
        return loaded.model.get_input_embeddings().weight.detach()
    except (AttributeError, NotImplementedError):
        return None


def describe(held: HeldOut) -> dict[str, Any]:
    """Where the measurements come from, for the report."""
    return {"images": len(held.images), "source": held.source, "probe_images": "labelled held-out"
            if held.labels is not None else f"{len(held.images)} shapes scenes (seed {SCENE_SEED})"}  # fmt: skip


def measure_before(family: Family, loaded: Loaded, held: HeldOut) -> Snapshot | str:
    """The unswapped MLLM over ``held``, or why it cannot be measured (e.g. a checkpoint without tower weights)."""
    try:
        return snapshot(family, loaded, held)
    except ValueError as err:
        return str(err)


def measure_after(
    family: Family, loaded: Loaded, held: HeldOut, before: Snapshot | str
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """(measurements, where they come from) of the swapped MLLM against ``before``."""
    if isinstance(before, str):
        return {}, {**describe(held), "unavailable": f"old tower not measurable: {before}"}
    return compare(before, snapshot(family, loaded, held), input_table(loaded)), describe(held)
