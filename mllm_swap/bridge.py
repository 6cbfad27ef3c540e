"""Bridge swap: a new tower whose tokens are mapped onto the old tower's, so the old connector and LLM answer at once.

A small token adapter (:class:`align.heads.TokenBridgeHead`) is trained on images only (no text, no LLM) to map
the new encoder's tokens at the consumed layer (prefix tokens dropped, patch grid resampled to the old grid
when it differs) onto the tokens the MLLM consumes from its old tower (LLaVA: ``vision_feature_layer``, -2,
after its select strategy). Objective: relative MSE + (1 - cosine) per token (:func:`bridge_loss`). Training
is a ``Method`` of the shared loop (``align.train.loop.train``) in ``out/bridge_training/``: checkpointed
atomically, resumed by rerunning the same command. The swapped checkpoint is an HF Llava whose tower is an
:class:`~align.modeling_aligned_tower.AlignedTower` carrying the adapter as its head (remote code included);
the connector and the LLM are the old ones, unchanged. ``encoder`` ``"A+B"`` bridges a fused tower
(:mod:`mllm_swap.fuse`): the adapter maps its fused tokens, and the saved tower is a ``FusedTower`` with the head. ``swap_report.json`` holds the drift on held-out
images (cosine to the old tokens before/after training the adapter, and at the LLM's input beside the
untrained rebuild and, when the towers allow it, the drop-in) and a quick VQA of each at zero LLM tuning.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.errors import UserError
from align.heads import build_token_head
from align.integrity import record_checksums
from align.io import read_json, read_tensors, write_json
from align.paths import portable, portable_tree
from align.rundir import OutDir, claims_out_dir
from align.train.config import TrainConfig
from mllm_swap.checkpoints import resolve_checkpoint
from mllm_swap.families import Family, Loaded, detect_family
from mllm_swap.fuse import is_fuse_spec, load_fuse_parts
from mllm_swap.measure import (
    DEFAULT_IMAGES,
    HeldOut,
    connector_outputs,
    held_out,
    mean_cosine,
    measure_after,
    measure_before,
)
from mllm_swap.swap import DEFAULT_PROMPT, REPORT, SwapReport, check_select_layer, feature_drift
from mllm_swap.towers import NewTower, bridged_tower, new_tower, openclip_as_hf

TRAIN_DIR = "bridge_training"
HEAD_FILE = "bridge_head.safetensors"
HEAD_CONFIG = "bridge_head.json"


@dataclass
class BridgeSettings:
    """How the adapter trains. ``hidden_dim`` None: the wider of the two towers; ``held_out``: the fraction of
    an image folder kept for the drift check (a shapes world uses its test split)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    hidden_dim: int | None = None
    cosine_weight: float = 1.0
    seed: int = 0
    save_every: int = 100
    held_out: float = 0.1
    shapes_n: int = 512  # the generated shapes world when no images are given


def bridge_loss(
    pred: torch.Tensor, target: torch.Tensor, cosine_weight: float = 1.0
) -> tuple[torch.Tensor, dict]:
    """``mean((p - t)^2) / mean(t^2) + w * (1 - mean_token cos(p, t))``; the MSE is relative to the targets'
    power so that both terms are O(1) whatever the old tower's scale."""
    mse = (pred - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
    cos = nn.functional.cosine_similarity(pred, target, dim=-1).mean()
    return mse + cosine_weight * (1 - cos), {"mse_rel": mse.detach(), "cosine": cos.detach()}


def bridge_images(data: Any, image_dir: Any, settings: BridgeSettings) -> tuple[list, list, Path | None]:
    """(train, held-out image references, the VQA file): a shapes world's train/test splits and its
    ``vqa_test.jsonl``, an image folder with its last ``held_out`` fraction held out (no VQA), or (neither
    given) a generated shapes world."""
    from align.data.readers import open_data

    if data is not None and image_dir is not None:
        raise UserError("--data and --images DIR: give one image source for the bridge, not both")
    if image_dir is not None:
        refs = [s.image for s in open_data(str(image_dir)).samples]
        n_held = max(1, int(round(len(refs) * settings.held_out)))
        if len(refs) < 2 * n_held:
            raise UserError(
                f"--images {image_dir}: {len(refs)} image(s); the bridge needs at least {2 * n_held}"
            )
        return refs[:-n_held], refs[-n_held:], None
    if data is None:
        from align.data.shapes import generate_shapes
        from align.paths import home

        data = home() / "data" / f"shapes-n{settings.shapes_n}-s{settings.seed}"
        generate_shapes(data, settings.shapes_n, seed=settings.seed, progress=False)
    if not (Path(data) / "pairs.jsonl").is_file():
        raise UserError(
            f"--data {data}: expected a shapes world directory (with pairs.jsonl); use --images DIR for a folder"
        )
    train, held = (
        [s.image for s in open_data(str(data), split=split).samples] for split in ("train", "test")
    )
    if not train or not held:
        raise UserError(
            f"--data {data}: the bridge needs train and test images, found {len(train)} and {len(held)}"
        )
    vqa = Path(data) / "vqa_test.jsonl"
    return train, held, vqa if vqa.is_file() else None


class BridgeMethod:
    """The adapter's training as a ``Method`` of the shared loop: the model is the head alone; both towers
    stay frozen outside it (old tokens through the family's own :meth:`~Family.consumed_tokens`)."""

    def __init__(
        self, family: Family, loaded: Loaded, plain: NewTower, head_config: dict, layer: int,
        train_images: list, held_images: list, settings: BridgeSettings,
    ) -> None:  # fmt: skip
        self.family, self.loaded, self.plain, self.layer = family, loaded, plain, layer
        self.head_config, self.settings = head_config, settings
        self.train_images, self.held_images = train_images, held_images
        self.new_processor = plain.image_processor or loaded.processor.image_processor
        self.vqa: Path | None = None  # the quick VQA's questions (a shapes world's)
        # a fused tower's tokens come from the fused tower itself; an encoder's from the encoder
        self.encoder = plain.module() if plain.kind == "fused" else plain.encoder.eval()

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        return build_token_head(self.head_config)

    def train_dataset(self) -> list:
        return self.train_images

    def collate(self, refs: list) -> list:
        from align.data.images import open_image

        return [open_image(ref) for ref in refs]

    @torch.no_grad()
    def pair(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(old tokens the MLLM consumes, new tower's tokens at ``layer`` with prefix) for PIL ``images``."""
        old = self.family.consumed_tokens(self.loaded, images)
        pixels = self.new_processor(images=images, return_tensors="pt")["pixel_values"]
        param = next(self.encoder.parameters())
        pixels = pixels.to(param.device, param.dtype)
        if self.plain.kind == "fused":
            new = self.encoder(pixels, output_hidden_states=self.layer).hidden_states[self.layer]
        else:
            new = self.encoder(pixels, layer=self.layer)
        return old.float(), new.float()

    def loss(self, model: nn.Module, batch: list) -> tuple[torch.Tensor, dict]:
        old, new = self.pair(batch)
        device = next(model.parameters()).device
        pred = model(new.to(device), num_prefix_tokens=self.plain.num_prefix_tokens)
        return bridge_loss(pred, old.to(device), self.settings.cosine_weight)

    @torch.no_grad()
    def held_out_cosine(self, head: nn.Module) -> float:
        """Mean token cosine between ``head``'s output and the old tokens on the held-out images."""
        old, new = self.pair(self.collate(self.held_images))
        pred = head.float().cpu()(new, num_prefix_tokens=self.plain.num_prefix_tokens)
        return float(nn.functional.cosine_similarity(pred, old, dim=-1).mean())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"held_out_cosine": self.held_out_cosine(model)}

    def save(self, model: nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(out_dir / HEAD_FILE))
        write_json(out_dir / HEAD_CONFIG, self.head_config)


def head_config_for(plain: NewTower, old_width: int, old_tokens: int, hidden_dim: int | None) -> dict:
    """The bridge head's config: new width -> old width, the old tower's patch grid."""
    grid = math.isqrt(old_tokens)
    if grid * grid != old_tokens:
        raise UserError(
            f"--mode bridge: the MLLM consumes {old_tokens} image tokens, not a square patch grid (prefix tokens "
            "kept?); a bridge maps patch grids only"
        )
    width = hidden_dim or max(plain.width, old_width)
    return {
        "kind": "bridge",
        "in_dim": plain.width,
        "out_dim": old_width,
        "hidden_dim": width,
        "out_grid": grid,
    }


def prepare_bridge(
    family: Family, src: Path, enc: Any, out: Path, data: Any, image_dir: Any, settings: BridgeSettings,
    select_layer: int | None,
) -> BridgeMethod:  # fmt: skip
    """The adapter's training job for ``enc`` (a ``VisionEncoder``, or the two of a fused tower) into the HF Llava
    at ``src`` (loaded here), checked first."""
    if family.name != "llava_hf":
        raise UserError(
            f"--mode bridge: supported for HF Llava checkpoints; {src} is a {family.name} checkpoint"
        )
    if isinstance(enc, list):  # "A+B": the fused tower, its tokens bridged
        from mllm_swap.fuse import fused_tower

        plain = fused_tower(enc, out)
        check_select_layer(select_layer, plain.config.num_hidden_layers, plain.source)
    else:
        check_select_layer(select_layer, getattr(enc, "num_layers", None), getattr(enc, "source", enc))
        if getattr(enc, "kind", "") == "aligned" and enc.image_head is not None:
            raise UserError(
                f"--mode bridge: {enc.source} has an image head; bridge its backbone or swap it with rebuild"
            )
        plain = new_tower(enc, prefix="drop")
        if plain.kind == "openclip":
            plain = openclip_as_hf(plain)
        plain.source = portable(plain.source, out)
    train_refs, held_refs, vqa = bridge_images(data, image_dir, settings)
    loaded = family.load(src)
    layer = loaded.model.config.vision_feature_layer if select_layer is None else select_layer
    old = family.old_view(loaded)
    head_config = head_config_for(plain, old.width, old.num_tokens, settings.hidden_dim)
    method = BridgeMethod(family, loaded, plain, head_config, layer, train_refs, held_refs, settings)
    method.vqa = vqa
    return method


def train_bridge(method: BridgeMethod, settings: BridgeSettings, run_dir: Path, overwrite: bool) -> dict:
    """Train (or resume, or reuse a finished run of) the adapter in ``run_dir``; returns its ``result.json``."""
    from align.train.loop import train

    if overwrite or not (run_dir / "result.json").is_file():
        cfg = TrainConfig(
            steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
            save_every=settings.save_every, log_every=10, report_to=["jsonl"], warmup=0.05,
        )  # fmt: skip
        train(method, cfg, run_dir, resume="auto", overwrite=overwrite)
    return read_json(run_dir / "result.json")


def llm_inputs(family: Family, loaded: Loaded, images: list) -> torch.Tensor:
    """What the LLM receives for ``images``: the connector over the consumed tokens."""
    return connector_outputs(family, loaded, family.consumed_tokens(loaded, images))


def quick_vqa(loaded: Loaded, vqa: Path | None, limit: int) -> float | None:
    """Exact-match accuracy on ``vqa`` (a shapes ``vqa_test.jsonl``) with no tuning; None without one."""
    if vqa is None or limit < 1:
        return None
    from mllm_swap.tune.quick_vqa import evaluate_vqa

    return float(evaluate_vqa(loaded.model, loaded.processor, vqa, limit=limit, progress=False)["accuracy"])


def compare_swaps(
    family: Family, src: Path, plain: NewTower, select_layer: int | None, held: list, old_inputs: torch.Tensor,
    vqa: Path | None, limit: int,
) -> dict[str, Any]:  # fmt: skip
    """The untrained rebuild and (when the towers allow one) the drop-in of the same encoder, built in memory:
    their cosine to the old LLM inputs on the held-out images and their quick VQA at zero tuning."""
    out: dict[str, Any] = {}
    for mode in ("rebuild", "dropin"):
        loaded = family.load(src)
        try:
            plan = family.plan(loaded, plain, mode, select_layer)
        except ValueError as err:
            found = str(err).split(". Use")[0].split(" needs ", 1)[-1]  # without the machine's path
            out[mode] = {"available": False, "reason": f"{mode} needs {found}"}
            continue
        family.apply(loaded, plain, plan)
        out[mode] = {
            "available": True,
            "llm_input_cosine": mean_cosine(llm_inputs(family, loaded, held), old_inputs),
            "vqa_accuracy": quick_vqa(loaded, vqa, limit),
        }
        del loaded
    return out


@claims_out_dir("swap", out_arg="out")
def bridge_swap(
    mllm: str | os.PathLike,
    encoder: Any,
    out: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    settings: BridgeSettings | None = None,
    select_layer: int | None = None,
    prompt: str = DEFAULT_PROMPT,
    compare: bool = True,
    vqa_limit: int = 100,
    measure_images: int = DEFAULT_IMAGES,
    overwrite: bool = False,
    verbose: bool = True,
) -> SwapReport:
    """Bridge-swap ``encoder`` (id, path or ``VisionEncoder``) into the HF Llava ``mllm``; write ``out``.

    ``data`` (a shapes world) or ``image_dir`` (any images) are what the adapter trains on; ``select_layer``
    the new tower's layer (default: the MLLM's ``vision_feature_layer``). ``compare`` also builds the untrained
    rebuild and the drop-in in memory for the report; the quick VQA needs a shapes world's ``vqa_test.jsonl``.
    ``measure_images``: held-out images of ``data`` (or ``image_dir``'s held-out ones) for the ``measurements``.
    """
    settings = settings or BridgeSettings()
    out = Path(out).expanduser().resolve()
    claim = OutDir.current(out)
    if overwrite:  # the previous output, its adapter training included
        claim.clear()
    src = resolve_checkpoint(mllm)
    family = detect_family(src)
    if isinstance(encoder, nn.Module):
        enc: Any = encoder
    elif is_fuse_spec(encoder):
        enc = load_fuse_parts(encoder)
    else:
        from align.load import load_vision_encoder

        enc = load_vision_encoder(encoder)
    method = prepare_bridge(family, src, enc, out, data, image_dir, settings, select_layer)
    loaded, plain, layer, head_config = method.loaded, method.plain, method.layer, method.head_config
    old = family.old_view(loaded)
    torch.manual_seed(settings.seed)  # the loop builds the head after seeding alike: this is its start
    before = method.held_out_cosine(build_token_head(head_config))
    result = train_bridge(method, settings, out / TRAIN_DIR, overwrite)
    head_state = read_tensors(out / TRAIN_DIR / HEAD_FILE)

    held, vqa = method.collate(method.held_images), method.vqa
    old_tokens = family.consumed_tokens(loaded, held)
    old_inputs = llm_inputs(family, loaded, held)
    old_vqa = quick_vqa(loaded, vqa, vqa_limit) if compare else None
    tower = bridged_tower(plain, head_config, head_state, layer)
    plan = family.plan(loaded, tower, "rebuild", layer)
    connector = loaded.model.get_submodule(family.trainable_parts(loaded.model)["connector"])
    kept = {k: v.clone() for k, v in connector.state_dict().items()}
    measured = held_out(data, measure_images) if image_dir is None else HeldOut(held, None, f"{image_dir} (held out)")
    unswapped = measure_before(family, loaded, measured)
    family.apply(loaded, tower, plan)
    connector.load_state_dict(kept)  # a rebuild installs the tower; the bridge keeps the old connector
    drift = feature_drift(old_tokens, family.consumed_tokens(loaded, held))
    bridge_inputs = llm_inputs(family, loaded, held)
    drift.update(
        images=len(held),
        cosine_before_adapter_training=before,
        cosine_after_adapter_training=drift["cosine_mean"],
        llm_input_cosine=mean_cosine(bridge_inputs, old_inputs),
    )
    compared = (
        compare_swaps(family, src, plain, select_layer, held, old_inputs, vqa, vqa_limit) if compare else {}
    )
    vqa_table = {"unswapped": old_vqa, "bridge": quick_vqa(loaded, vqa, vqa_limit) if compare else None}
    vqa_table.update({m: c.get("vqa_accuracy") for m, c in compared.items()})
    generated = family.generate(loaded, held[0], prompt)
    report = SwapReport(
        family=family.name,
        mode="bridge",
        reason=f"requested: a token adapter maps {plain.source}'s layer {layer} tokens onto the old tower's",
        mllm=str(mllm),
        encoder=plain.source if isinstance(encoder, nn.Module) else str(encoder),
        out=str(out),
        old_tower=old.describe(),
        new_tower={**plan.new.describe(), "kind": tower.kind,
                   **({"parts": tower.parts, "fuse_rule": plain.prefix_rule} if tower.parts else {})},
        new_modules=[f"model.vision_tower ({type(tower.config).__name__[:-6]}: {plain.source} + bridge head "
                     f"{head_config})"],
        untrained=[],
        drift=drift,
        notes=[
            "connector and LLM unchanged: the model answers at once; connector/LoRA tuning may follow "
            "(unfreeze_head trains the bridge with them)",
            *plain.notes,
        ],
        sample={"prompt": prompt, "generated": generated} if generated is not None else {},
        bridge={
            "settings": asdict(settings),
            "layer": layer,
            "head": head_config,
            "train": {"steps": result["steps"], "final_loss": result["final_loss"], "eval": result["eval"]},
            "compare": compared,
            "vqa_zero_tuning": {**vqa_table, "n": vqa_limit if vqa else None},
        },
    )
    report.measurements, report.measured_on = measure_after(family, loaded, measured, unswapped)
    tmp = claim.temp_dir()
    family.save(loaded, tmp, out, plan, tower)
    write_json(tmp / REPORT, portable_tree(report.to_dict(), out))
    record_checksums(tmp)
    claim.publish(tmp)
    claim.finish([TRAIN_DIR])
    if verbose:
        print(report.summary())
    return report
