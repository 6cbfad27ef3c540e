"""``tiny-clip-shapes``: tiny-clip briefly contrastively pretrained on the shapes world.

The tiny models are randomly initialised, so zero-shot scores of ``tiny-clip`` sit at chance and say
nothing about whether an alignment keeps a CLIP's text compatibility. This recipe gives the embedded
default a CLIP that actually knows its world: a few hundred InfoNCE steps (``align.losses.
infonce_loss``, learnable logit scale clamped at 100) on the train split of a seeded shapes world,
through the shared loop (``align.train.loop.train``), written in the same HF ``CLIPModel`` format as
``tiny-clip`` (weights, tokenizer, ``CLIPImageProcessor``) plus ``pretrain.json`` with its zero-shot
scores on the held-out split. Captions alternate between the short (``"a red circle"``) and the long
(``"two shapes: a large red circle in ..."``) caption of each image.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.losses import infonce_loss
from align.train.config import TrainConfig

TINY_CLIP_SHAPES = "tiny-clip-shapes"
BUILD_VERSION = 1


@dataclass
class PretrainSettings:
    """Data and schedule of the tiny contrastive pretraining (defaults: ~1 min on 2 CPU cores)."""

    base: str = "tiny-clip"
    shapes: int = 2000
    shapes_seed: int = 1234
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 40
    seed: int = 0


def _features(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


class ClipPretrain:
    """A ``Method`` for ``align.train.loop.train``: symmetric InfoNCE over (image, caption) pairs."""

    def __init__(self, clip_dir: Path, shapes_dir: Path, settings: PretrainSettings) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor

        from align.data.images import open_image
        from align.data.shapes import load_shapes

        self.clip_dir, self.settings = Path(clip_dir), settings
        self.tokenizer = AutoTokenizer.from_pretrained(clip_dir)
        self.processor = CLIPImageProcessor.from_pretrained(clip_dir)
        rows = load_shapes(shapes_dir, split="train")
        images = [open_image(Path(r["image"])) for r in rows]
        self.pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        texts = [r["caption"] for r in rows] + [r["long_caption"] for r in rows]
        enc = self.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(self.clip_dir)

    def train_dataset(self) -> torch.utils.data.Dataset:
        """Item ``k``: image ``k mod N`` with its short caption (``k < N``) or long caption."""
        n = len(self.pixels)
        index = torch.arange(2 * n)
        return torch.utils.data.TensorDataset(self.pixels[index % n], self.input_ids, self.attention_mask)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Mapping[str, Any]]:
        from align.train.accelerator import unwrap

        pixels, ids, mask = batch
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        scale = unwrap(model).logit_scale.exp()
        return infonce_loss(out.image_embeds, out.text_embeds, scale), {"logit_scale": scale.detach()}

    def after_step(self, model: nn.Module) -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))

    def save(self, model: nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
        final = out_dir / "model"
        model.save_pretrained(final)
        self.tokenizer.save_pretrained(final)
        self.processor.save_pretrained(final)


@torch.no_grad()
def shapes_zeroshot(clip_dir: str | Path, shapes_dir: str | Path, split: str = "test") -> dict[str, float]:
    """Zero-shot accuracy (acc1) of an HF CLIP directory on the main object's colour and shape."""
    from align.data.images import open_image
    from align.data.shapes import load_shapes, shapes_classes
    from align.encoders import load_text_encoder, load_vision_encoder
    from align.metrics.zeroshot import classification_metrics, zeroshot_classifier

    vision, text = load_vision_encoder(str(clip_dir)), load_text_encoder(str(clip_dir))
    rows = load_shapes(shapes_dir, split=split)
    classes = shapes_classes(shapes_dir)
    emb = vision.encode_images([open_image(Path(r["image"])) for r in rows], pool="projected")
    scores = {}
    for attr in ("color", "shape"):
        names = classes[attr]
        weights = zeroshot_classifier(lambda t: text.encode(t), names, classes["templates"][attr])
        labels = torch.tensor([names.index(r["attributes"][attr]) for r in rows])
        scores[f"{attr}_acc1"] = classification_metrics(emb, weights, labels)["acc1"]
    return scores


def pretrain_clip_on_shapes(out: str | Path, settings: PretrainSettings | None = None) -> dict[str, Any]:
    """Train ``settings.base`` on a fresh shapes world and write the HF ``CLIPModel`` dir to ``out``.

    Returns the record written to ``out/pretrain.json`` (settings, final loss, zero-shot before/after).
    """
    from align.data.shapes import generate_shapes
    from align.encoders.registry import resolve
    from align.train.loop import train

    settings = settings or PretrainSettings()
    out = Path(out)
    base = Path(resolve(settings.base))
    with tempfile.TemporaryDirectory(prefix="clip-pretrain-") as tmp:
        shapes_dir = Path(tmp) / "shapes"
        generate_shapes(shapes_dir, n=settings.shapes, seed=settings.shapes_seed, progress=False)
        method = ClipPretrain(base, shapes_dir, settings)
        cfg = TrainConfig(
            steps=settings.steps,
            batch_size=settings.batch_size,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            warmup=settings.warmup,
            seed=settings.seed,
            save_every=0,
            log_every=50,
            report_to=["jsonl"],
        )
        result = train(method, cfg, Path(tmp) / "run", resume=False)
        before = shapes_zeroshot(base, shapes_dir)
        after = shapes_zeroshot(Path(tmp) / "run" / "model", shapes_dir)
        record = {
            "base": settings.base,
            "settings": settings.__dict__,
            "final_loss": result.final_loss,
            "zeroshot_test_before": before,
            "zeroshot_test_after": after,
        }
        out.mkdir(parents=True, exist_ok=True)
        for item in (Path(tmp) / "run" / "model").iterdir():
            item.replace(out / item.name)
    (out / "pretrain.json").write_text(json.dumps(record, indent=2))
    return record


def ensure_tiny_clip_shapes() -> Path:
    """Directory of ``tiny-clip-shapes`` (built once under ``$MLLM_SWAP_HOME/models``, about a minute)."""
    from align.embedded import build_once

    return build_once(TINY_CLIP_SHAPES, lambda out: pretrain_clip_on_shapes(out), version=BUILD_VERSION)
