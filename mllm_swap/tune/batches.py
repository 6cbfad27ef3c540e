"""Batches of LLaVA conversations for training: the torch dataset (conversations tokenised once, images read
per item; :mod:`mllm_swap.tune.conversations`), the length-grouped sampler and the padding collator."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from mllm_swap.chat_templates import chat_template
from mllm_swap.families.prompts import expand2square, pad_colour
from mllm_swap.tune.conversations import (
    IGNORE_INDEX,
    encode,
    load_conversations,
    to_messages,
)


class ConversationDataset(Dataset):
    """LLaVA conversations, tokenised once when the dataset is made (:meth:`tokenise`); an item adds its
    image's ``pixel_values``, read and processed per item, or with a ``tower_cache`` its image's cached tower
    tokens (the image is not read). ``summary`` says what was kept and skipped."""

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None,
        processor: Any,
        *,
        max_length: int = 2048,
        image_aspect_ratio: str = "pad",
        on_error: str = "skip",
        append_eos: bool = True,
        tower_cache: Any = None,
    ) -> None:
        if image_aspect_ratio not in ("pad", "none"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'none', found {image_aspect_ratio!r}")
        self.records, self.summary = load_conversations(json_path, image_folder, on_error)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.processor = processor
        self.template = chat_template(processor)
        self.max_length = max_length
        self.image_aspect_ratio = image_aspect_ratio
        self.append_eos = append_eos
        self.background = pad_colour(processor)
        self.image_tokens = image_token_count(processor)
        self.tower_cache = tower_cache  # a tune.tower_cache.TowerCache: tokens instead of pixels
        if self.summary.with_image and self.image_tokens >= max_length:
            raise ValueError(f"max_length {max_length} leaves no room after {self.image_tokens} image tokens")
        start = time.perf_counter()
        self.texts = [self.tokenise(index) for index in range(len(self.records))]
        self.tokenise_s = time.perf_counter() - start  # the one-off cost, logged by the stage

    def tokenise(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Record ``index``'s conversation as (``input_ids`` int32, assistant-label mask): its ids do not depend on
        the image's pixels (the processor expands the placeholder to ``image_tokens``), so a blank image stands in."""
        record = self.records[index]
        blank = Image.new("RGB", (8, 8)) if "image" in record else None
        item = encode(
            self.processor,
            to_messages(record["conversations"], blank is not None),
            blank,
            template=self.template,
            max_length=self.max_length,
            append_eos=self.append_eos,
            record_id=str(record.get("id", index)),
        )
        return item["input_ids"].to(torch.int32), item["labels"] != IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, record: dict) -> Image.Image | None:
        """The record's image as RGB, padded to square when ``image_aspect_ratio`` is "pad"."""
        if "image" not in record:
            return None
        image = Image.open(self.image_folder / record["image"]).convert("RGB")
        return expand2square(image, self.background) if self.image_aspect_ratio == "pad" else image

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        ids, scored = self.texts[index]
        ids = ids.long()
        item = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.where(scored, ids, IGNORE_INDEX),
            "id": str(record.get("id", index)),
        }
        if "image" in record:
            if self.tower_cache is not None:
                item["pixel_values"] = self.tower_cache.tokens(record)
            else:
                pixels = self.processor.image_processor(images=[self.load_image(record)], return_tensors="pt")
                item["pixel_values"] = pixels["pixel_values"]
        return item

    def lengths(self) -> list[int]:
        """Cheap length estimates (words + image tokens), as LLaVA's grouping uses."""
        return [
            sum(len(t["value"].split()) for t in r["conversations"])
            + (self.image_tokens if "image" in r else 0)
            for r in self.records
        ]


def image_token_count(processor: Any) -> int:
    """How many placeholder tokens the processor expands one image to."""
    size = getattr(processor.image_processor, "crop_size", None) or processor.image_processor.size
    height = size.get("height") or size.get("shortest_edge")
    width = size.get("width") or size.get("shortest_edge")
    count = (height // processor.patch_size) * (width // processor.patch_size)
    count += processor.num_additional_image_tokens
    return count - (1 if processor.vision_feature_select_strategy == "default" else 0)


class LengthGroupedSampler(Sampler[int]):
    """Indices shuffled by ``seed + epoch`` and grouped into batches of similar length (HF's grouping)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


@dataclass
class ConversationCollator:
    """Right-pads a list of encoded conversations into a batch; images are concatenated in order."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.full((len(features), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), width), dtype=torch.long),
            "labels": torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long),
        }
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            for key in ("input_ids", "attention_mask", "labels"):
                batch[key][row, :n] = f[key]
        images = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.cat(images)
        return batch
