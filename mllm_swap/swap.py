"""Swap a vision encoder into a multimodal LLM: choose the mode, account for tokens, measure drift, report.

``swap(mllm, encoder, out, mode="auto")`` writes a checkpoint of the same family and format as ``mllm``
with the new tower inside, and ``out/swap_report.json``. Modes: ``dropin`` (same architecture, width
and token layout: only the tower's weights change) and ``rebuild`` (new tower, connector input layer
re-initialised, image token count / processor / select layer updated). ``auto`` picks drop-in when
nothing but the weights differ. ``fuse`` (HF Llava; ``encoder`` ``"A+B"``) is a rebuild onto a fused tower
(:mod:`mllm_swap.fuse`): both towers' patch tokens concatenated along channels.

Prefix-token rule (``prefix``): ``"drop"`` (default) feeds only the ``(S/p)^2`` patch tokens: the CLS of
CLIP/DINOv2 is dropped by the MLLM's own rule (HF ``"default"``, original ``"patch"``), and CLS + registers
of DINOv2-with-registers are all dropped inside an aligned tower (the MLLMs' rules drop index 0 only and
would otherwise keep 4 register tokens); SigLIP has no prefix (``"full"``). ``"keep"`` feeds every token,
and the processor is told the count (``num_additional_image_tokens``), so expansion always matches.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from align.errors import UserError
from align.integrity import record_checksums
from align.io import write_json
from align.paths import portable, portable_tree
from align.rundir import OutDir, claims_out_dir
from mllm_swap.checkpoints import resolve_checkpoint
from mllm_swap.families import Family, Loaded, SwapPlan, detect_family
from mllm_swap.measure import DEFAULT_IMAGES, held_out, measure_after, measure_before
from mllm_swap.towers import PREFIX_RULES, NewTower, new_tower, openclip_as_hf

MODES = ("auto", "dropin", "rebuild", "fuse")
DEFAULT_PROMPT = "What colour is the shape?"
REPORT = "swap_report.json"


@dataclass
class SwapReport:
    """What a swap changed and what must be trained before the result is useful."""

    family: str
    mode: str
    reason: str
    mllm: str
    encoder: str
    out: str
    old_tower: dict[str, Any]
    new_tower: dict[str, Any]
    new_modules: list[str]
    untrained: list[str]
    drift: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    sample: dict[str, Any] = field(default_factory=dict)
    bridge: dict[str, Any] = field(default_factory=dict)  # a bridge swap's training and comparisons
    measurements: dict[str, float | None] = field(default_factory=dict)  # :mod:`mllm_swap.measure`
    measured_on: dict[str, Any] = field(default_factory=dict)  # the held-out images they come from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A short human-readable account (what the CLI prints)."""
        o, n, d = self.old_tower, self.new_tower, self.drift
        lines = [
            f"swap: {self.family} {self.mllm} <- {self.encoder}",
            f"  mode: {self.mode} ({self.reason})",
            f"  tower: {o.get('source')} -> {n.get('source')}",
            f"  width: {o.get('width')} -> {n.get('width')}; image tokens: {o.get('image_tokens')} -> "
            f"{n.get('image_tokens')}; select layer: {o.get('select_layer')} -> {n.get('select_layer')}",
            f"  prefix rule: {n.get('prefix_rule')}",
            *(
                f"  part {p['source']}: width {p['width']}, grid {p['grid']}x{p['grid']}"
                + (f" resampled to {p['resampled_to']}x{p['resampled_to']}" if p["resampled_to"] else "")
                for p in n.get("parts", [])
            ),
            f"  new modules: {', '.join(self.new_modules) or 'none'}",
            f"  untrained (train before use): {', '.join(self.untrained) or 'none'}",
        ]
        if d.get("cosine_mean") is not None:
            lines.append(f"  feature drift: cosine mean {d['cosine_mean']:.4f}, min {d['cosine_min']:.4f}")
        elif d.get("linear_cka") is not None:
            lines.append(f"  feature drift: linear CKA {d['linear_cka']:.4f} ({d.get('cosine_note')})")
        if d.get("next_token_kl") is not None:
            lines.append(
                f"  next-token change: KL {d['next_token_kl']:.3g}, max |dp| {d['next_token_max_abs']:.3g}, "
                f"top-1 kept: {d['next_token_top1_same']}"
            )
        if d.get("cosine_before_adapter_training") is not None:
            lines.append(
                f"  bridge: cosine to the old tokens {d['cosine_before_adapter_training']:.4f} before training "
                f"the adapter, {d['cosine_after_adapter_training']:.4f} after; at the LLM input "
                f"{d['llm_input_cosine']:.4f}"
            )
        for mode, row in self.bridge.get("compare", {}).items():
            if row.get("available"):
                lines.append(f"  {mode} (untrained): LLM-input cosine {row['llm_input_cosine']:.4f}")
        vqa = {k: v for k, v in self.bridge.get("vqa_zero_tuning", {}).items() if k != "n" and v is not None}
        if vqa:
            lines.append("  quick VQA, no LLM tuning: " + ", ".join(f"{k} {v:.3f}" for k, v in vqa.items()))
        if self.measurements:
            lines.append("  measurements (held-out, before any LLM training): " + ", ".join(
                f"{k} {v:.3f}" for k, v in self.measurements.items() if v is not None))  # fmt: skip
        lines += [f"  note: {x}" for x in self.notes]
        lines.append(f"  written: {self.out}")
        return "\n".join(lines)


def sample_images(n: int = 4, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """Deterministic shapes-world scenes used to measure drift."""
    from align.data.shapes import render

    rng = np.random.default_rng(seed)
    return [render(rng, size)[0] for _ in range(n)]


def feature_drift(old: torch.Tensor, new: torch.Tensor) -> dict[str, Any]:
    """Cosine between old and new tower tokens (same shape), else linear CKA over patch tokens."""
    old, new = old.float(), new.float()
    if old.shape == new.shape:
        cos = torch.nn.functional.cosine_similarity(old, new, dim=-1)
        return {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "max_abs_change": float((old - new).abs().max()),
        }
    out: dict[str, Any] = {
        "cosine_mean": None,
        "cosine_note": f"shapes differ {list(old.shape)} vs {list(new.shape)}: cosine undefined",
    }
    if old.shape[:2] == new.shape[:2]:
        from align.metrics.cka import linear_cka

        out["linear_cka"] = linear_cka(old.reshape(-1, old.shape[-1]), new.reshape(-1, new.shape[-1]))
    return out


def output_drift(old: torch.Tensor, new: torch.Tensor) -> dict[str, Any]:
    """KL(old || new), max |p_old - p_new| and whether the top-1 token is kept, from log-probabilities."""
    old, new = old.double(), new.double()
    p_old, p_new = old.exp(), new.exp()
    return {
        "next_token_kl": float((p_old * (old - new)).sum()),
        "next_token_max_abs": float((p_old - p_new).abs().max()),
        "next_token_top1_same": bool(old.argmax() == new.argmax()),
    }


def apply_and_measure(
    family: Family, loaded: Loaded, tower: NewTower, plan: SwapPlan, prompt: str, num_images: int
) -> tuple[dict[str, Any], list[Image.Image]]:
    """Measure the old tower, swap in place, measure the new one: feature drift at the consumed layer and,
    for drop-in, the change of the next-token distribution. Returns (drift, images fed to the new model)."""
    images = sample_images(num_images, size=plan.old.image_size or plan.new.image_size)
    try:
        old_tokens = family.consumed_tokens(loaded, images)
    except ValueError as err:  # e.g. an OpenFlamingo checkpoint that stores no vision weights
        old_tokens, unavailable = None, str(err)
    old_lp = family.next_token_logprobs(loaded, images[0], prompt) if plan.mode == "dropin" else None
    family.apply(loaded, tower, plan)
    same_size = plan.new.image_size == plan.old.image_size
    new_images = images if same_size else sample_images(num_images, plan.new.image_size)
    new_tokens = family.consumed_tokens(loaded, new_images)
    if old_tokens is None:
        drift: dict[str, Any] = {
            "cosine_mean": None,
            "cosine_note": f"old features unavailable: {unavailable}",
        }
    else:
        drift = feature_drift(old_tokens, new_tokens)
    drift["images"] = num_images
    if old_lp is not None:
        new_lp = family.next_token_logprobs(loaded, images[0], prompt)
        if new_lp is not None:
            drift.update(output_drift(old_lp, new_lp), prompt=prompt)
    return drift, new_images


def check_select_layer(select_layer: int | None, num_layers: int | None, encoder: Any) -> None:
    """``select_layer`` must index the tower's hidden states: ``[-(L + 1), L]`` for ``L`` layers."""
    if select_layer is None or num_layers is None or -(num_layers + 1) <= select_layer <= num_layers:
        return
    raise UserError(
        f"--select-layer {select_layer}: encoder {encoder} has {num_layers} layers; expected a hidden-state "
        f"index in [{-(num_layers + 1)}, {num_layers}] (0 = embeddings, -1 = last layer, -2 = LLaVA's default)"
    )


def swap_tower(
    encoder: Any, mode: str, prefix: str, select_layer: int | None, out: Path, family: Family
) -> NewTower:
    """The tower ``encoder`` (id, path, ``VisionEncoder``, or ``"A+B"`` with ``mode="fuse"``) becomes in ``out``."""
    if mode == "fuse":
        from mllm_swap.fuse import fused_tower, load_fuse_parts

        if family.name != "llava_hf":
            raise UserError(
                f"--mode fuse: supported for HF Llava checkpoints; found a {family.name} checkpoint"
            )
        tower = fused_tower(load_fuse_parts(encoder), out, prefix)
        check_select_layer(select_layer, tower.config.num_hidden_layers, encoder)
        return tower
    if isinstance(encoder, torch.nn.Module):
        enc = encoder
    else:
        from align.load import load_vision_encoder
        from mllm_swap.fuse import is_fuse_spec

        if is_fuse_spec(encoder):
            raise UserError(
                f"--encoder {encoder}: two encoders joined by '+' are fused by --mode fuse (or --mode bridge)"
            )
        enc = load_vision_encoder(encoder)
    check_select_layer(select_layer, getattr(enc, "num_layers", None), encoder)
    tower = new_tower(enc, prefix=prefix)
    tower.source = portable(tower.source, out)  # recorded in the checkpoint: an id or a path relative to it
    if tower.kind == "aligned":
        tower.config.source = tower.source
    if family.hf_tower and tower.kind == "openclip":
        tower = openclip_as_hf(tower)
    return tower


@claims_out_dir("swap", out_arg="out")
def swap(
    mllm: str | os.PathLike,
    encoder: Any,
    out: str | os.PathLike,
    mode: str = "auto",
    *,
    prefix: str = "drop",
    select_layer: int | None = None,
    to_hf: bool = False,
    prompt: str = DEFAULT_PROMPT,
    num_images: int = 4,
    data: str | os.PathLike | None = None,
    measure_images: int = DEFAULT_IMAGES,
    overwrite: bool = False,
    verbose: bool = True,
) -> SwapReport:
    """Swap ``encoder`` (id, path or ``VisionEncoder``; ``"A+B"`` with ``mode="fuse"``) into ``mllm`` (id or
    path); write ``out``.

    ``to_hf`` additionally writes an HF-layout copy to ``out/hf`` (original LLaVA checkpoints).
    ``data``/``measure_images``: the held-out images of the report's ``measurements`` (:mod:`mllm_swap.measure`).
    """
    if mode not in MODES:
        raise ValueError(f"mode '{mode}': expected one of {list(MODES)}")
    if prefix not in PREFIX_RULES:
        raise ValueError(f"prefix '{prefix}': expected one of {list(PREFIX_RULES)}")
    if num_images < 1:
        raise UserError(f"--images {num_images}: expected at least 1 sample image for the drift check")
    out = Path(out).expanduser().resolve()
    claim = OutDir.current(out)
    src = resolve_checkpoint(mllm)
    family = detect_family(src)
    if to_hf and not hasattr(family, "to_hf"):
        raise ValueError(f"--to-hf: {family.name} checkpoints are already in their own HF layout")
    tower = swap_tower(encoder, mode, prefix, select_layer, out, family)
    loaded = family.load(src)
    plan = family.plan(loaded, tower, "rebuild" if mode == "fuse" else mode, select_layer)
    if mode == "fuse":
        plan.mode, plan.reason = "fuse", f"requested: {tower.source} fused along channels"
    held = held_out(data, measure_images)
    before = measure_before(family, loaded, held)
    drift, new_images = apply_and_measure(family, loaded, tower, plan, prompt, num_images)
    generated = family.generate(loaded, new_images[0], prompt)
    report = SwapReport(
        family=family.name,
        mode=plan.mode,
        reason=plan.reason,
        mllm=str(mllm),
        encoder=tower.source if isinstance(encoder, torch.nn.Module) else str(encoder),
        out=str(out),
        old_tower=plan.old.describe(),
        new_tower={
            **plan.new.describe(),
            "kind": tower.kind,
            **({"parts": tower.parts, "fuse_rule": tower.prefix_rule} if tower.parts else {}),
        },
        new_modules=plan.new_modules,
        untrained=plan.untrained,
        drift=drift,
        notes=plan.notes + tower.notes,
        sample={"prompt": prompt, "generated": generated} if generated is not None else {},
    )
    report.measurements, report.measured_on = measure_after(family, loaded, held, before)
    tmp = claim.temp_dir()  # inside --out: a killed run's is removed by the next one
    family.save(loaded, tmp, out, plan, tower)
    if to_hf:
        family.to_hf(loaded, tmp / "hf")
        report.notes.append(f"HF-layout copy written to {out / 'hf'}")
    write_json(tmp / REPORT, portable_tree(report.to_dict(), out))
    record_checksums(tmp)
    claim.clear()
    claim.publish(tmp)
    if verbose:
        print(report.summary())
    return report


def read_report(out: str | os.PathLike) -> dict[str, Any]:
    """The ``swap_report.json`` of a swapped checkpoint."""
    return json.loads((Path(out) / REPORT).read_text())
