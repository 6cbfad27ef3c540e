"""LLaVA instruction records: validation, and chat-template encoding with assistant-only labels.

Records are LLaVA's JSON format: ``{"id", "image": relpath, "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``. Each record is rendered with the
family's chat template (:func:`mllm_swap.chat_templates.chat_template`), the processor expands the
image placeholder to the tower's token count, and only the assistant turns carry labels. Batching for
training is :mod:`mllm_swap.tune.batches`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from align.io import read_json
from mllm_swap.chat_templates import chat_template

IGNORE_INDEX = -100
DATA_IMAGE_TOKEN = "<image>"  # the placeholder LLaVA's JSON uses, whatever the tokenizer calls it
ROLES = {"human": "user", "gpt": "assistant"}


@dataclass
class BadRecord:
    """A record that cannot be trained on, with its position, id and the reason."""

    index: int
    id: str
    reason: str


@dataclass
class DataSummary:
    """What loading a conversation file kept and dropped."""

    total: int
    kept: int
    with_image: int
    bad: list[BadRecord] = field(default_factory=list)

    def reasons(self) -> dict[str, int]:
        """Count of bad records per reason."""
        return dict(Counter(b.reason.split(":")[0] for b in self.bad))

    def describe(self) -> str:
        """One line for logs: counts and the first few bad ids."""
        text = f"{self.kept}/{self.total} records kept ({self.with_image} with an image)"
        if self.bad:
            first = ", ".join(f"{b.id} ({b.reason})" for b in self.bad[:5])
            text += f"; {len(self.bad)} bad: {first}" + (" ..." if len(self.bad) > 5 else "")
        return text


def check_record(record: Any, image_folder: Path | None) -> str | None:
    """Why ``record`` cannot be trained on, or None when it is fine."""
    if not isinstance(record, dict):
        return f"not an object (found {type(record).__name__})"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "empty conversation"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"turn {i} has no string 'value'"
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            return f"wrong role order: turn {i} is {turn.get('from')!r}, expected {expected!r}"
    if len(turns) % 2:
        return "wrong role order: conversation ends with a human turn"
    n_tokens = sum(t["value"].count(DATA_IMAGE_TOKEN) for t in turns[0::2])
    if any(DATA_IMAGE_TOKEN in t["value"] for t in turns[1::2]):
        return f"{DATA_IMAGE_TOKEN} token in an assistant turn"
    image = record.get("image")
    if image is None:
        return f"{DATA_IMAGE_TOKEN} without image" if n_tokens else None
    if not isinstance(image, str):
        return f"'image' must be one relative path (found {type(image).__name__})"
    if n_tokens == 0:
        return f"image given but no {DATA_IMAGE_TOKEN} token"
    if n_tokens > 1:
        return f"{n_tokens} {DATA_IMAGE_TOKEN} tokens for one image"
    if image_folder is None or not (image_folder / image).is_file():
        return f"missing image file: {image_folder / image if image_folder else image}"
    return None


def load_conversations(
    json_path: str | Path, image_folder: str | Path | None, on_error: str = "skip"
) -> tuple[list[dict], DataSummary]:
    """Read a LLaVA JSON list, checking every record; ``on_error`` is "skip" or "raise"."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', found {on_error!r}")
    data = read_json(json_path)
    if not isinstance(data, list):
        raise ValueError(f"{json_path}: expected a JSON list of conversations, found {type(data).__name__}")
    folder = Path(image_folder) if image_folder is not None else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder}: not a directory")
    kept, bad = [], []
    for index, record in enumerate(data):
        reason = check_record(record, folder)
        rid = str(record.get("id", index)) if isinstance(record, dict) else str(index)
        if reason is None:
            kept.append(record)
        else:
            bad.append(BadRecord(index, rid, reason))
    summary = DataSummary(len(data), len(kept), sum("image" in r for r in kept), bad)
    if bad and on_error == "raise":
        lines = "\n".join(f"  record {b.index} (id {b.id}): {b.reason}" for b in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise ValueError(f"{json_path}: {len(bad)} bad record(s):\n{lines}{more}")
    if not kept:
        raise ValueError(f"{json_path}: no usable records ({summary.describe()})")
    return kept, summary


def to_messages(turns: Sequence[dict], has_image: bool) -> list[dict]:
    """LLaVA turns as chat messages; the image goes first in the first human turn (as LLaVA does)."""
    messages = []
    for i, turn in enumerate(turns):
        text = turn["value"]
        content: list[dict] = []
        if i == 0 and has_image:
            text = text.replace(DATA_IMAGE_TOKEN, "").strip()
            content.append({"type": "image"})
        content.append({"type": "text", "text": text})
        messages.append({"role": ROLES[turn["from"]], "content": content})
    return messages


def _render(processor: Any, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def assistant_spans(processor: Any, template: str, messages: list[dict]) -> tuple[str, list[list[int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each assistant turn.

    A turn's span runs from the end of the generation prompt before it to the end of the turn, found by
    rendering the conversation's prefixes; the template must render prefixes as prefixes.
    """
    full = _render(processor, template, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(processor, template, messages[:i], True)
        upto = _render(processor, template, messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError(
                "chat template does not render conversation prefixes as prefixes of the whole "
                f"conversation (turn {i}); cannot locate assistant tokens"
            )
        spans.append([len(before), len(upto)])
    return full, spans


def _insert_eos(text: str, spans: list[list[int]], messages: list[dict], eos: str) -> str:
    """Insert ``eos`` after each assistant reply whose span has none (LLaVA trains on ``</s>``).

    The reply's span then ends at the inserted ``eos``; ``spans`` are updated in place.
    """
    replies = [m for m in messages if m["role"] == "assistant"]
    for span, message in reversed(list(zip(spans, replies, strict=True))):
        if eos in text[span[0] : span[1]]:
            continue
        reply = message["content"][-1]["text"]
        found = text.rfind(reply, span[0], span[1]) if reply else -1
        at = found + len(reply) if found >= 0 else span[1]
        text = text[:at] + eos + text[at:]
        for other in spans:
            other[0] += len(eos) if other[0] > at else 0
            other[1] += len(eos) if other[1] >= at else 0
        span[1] = at + len(eos)  # the template's whitespace after the reply is not a target
    return text


def encode(
    processor: Any,
    messages: list[dict],
    image: Image.Image | None,
    *,
    template: str | None = None,
    max_length: int | None = None,
    append_eos: bool = True,
    record_id: str = "?",
) -> dict[str, torch.Tensor]:
    """Tokenize one conversation: ``input_ids``, ``attention_mask``, ``labels`` (and ``pixel_values``).

    Labels equal ``input_ids`` on tokens overlapping an assistant span and are -100 elsewhere, image
    tokens included.
    """
    template = template or chat_template(processor)
    text, spans = assistant_spans(processor, template, messages)
    eos = processor.tokenizer.eos_token
    if append_eos and eos:
        text = _insert_eos(text, spans, messages, eos)
    n_placeholders = text.count(processor.image_token)
    if n_placeholders != (image is not None):
        raise ValueError(
            f"record {record_id}: the chat template rendered {n_placeholders} {processor.image_token!r} "
            f"placeholder(s) for {int(image is not None)} image(s)"
        )
    bos = processor.tokenizer.bos_token
    out = processor(
        text=[text],
        images=[image] if image is not None else None,
        return_tensors="pt",
        return_offsets_mapping=True,
        return_text_replacement_offsets=True,
        add_special_tokens=not (bos and text.startswith(bos)),
    )
    ids = out["input_ids"][0]
    offsets = out["offset_mapping"][0].tolist()
    replaced = (out.get("text_replacement_offsets") or [[]])[0]
    ends = [r["span"][1] for r in replaced]
    gained = [0]
    for r in replaced:
        gained.append(gained[-1] + (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]))

    def shift(char: int) -> int:
        return char + gained[sum(end <= char for end in ends)]

    labels = torch.full_like(ids, IGNORE_INDEX)
    for start, end in spans:
        start, end = shift(start), shift(end)
        for pos, (tok_start, tok_end) in enumerate(offsets):
            if tok_start < end and tok_end > start:
                labels[pos] = ids[pos]
    labels[ids == processor.image_token_id] = IGNORE_INDEX
    item = {"input_ids": ids, "attention_mask": out["attention_mask"][0], "labels": labels}
    if max_length is not None and len(ids) > max_length:
        image_pos = (ids == processor.image_token_id).nonzero()
        if len(image_pos) and int(image_pos[-1]) >= max_length:
            raise ValueError(
                f"record {record_id}: image tokens reach position {int(image_pos[-1])} but max_length is "
                f"{max_length}; raise max_length"
            )
        item = {k: v[:max_length] for k, v in item.items()}
    if image is not None:
        item["pixel_values"] = out["pixel_values"]
    return item


def generation_prompt(
    processor: Any, question: str, has_image: bool = True, template: str | None = None
) -> str:
    """The text a model sees before answering ``question`` about one image (as in training)."""
    turns = [{"from": "human", "value": (DATA_IMAGE_TOKEN + "\n" if has_image else "") + question}]
    return _render(processor, template or chat_template(processor), to_messages(turns, has_image), True)
