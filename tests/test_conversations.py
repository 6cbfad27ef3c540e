"""LLaVA conversation data: validation, assistant-only labels, pad-to-square, grouping, collation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, LlavaProcessor

from align.encoders.tokenizer import build_bpe_tokenizer
from mllm_swap.chat_templates import DEFAULT_CHAT_TEMPLATE, LLAVA_HF_LIST_TEMPLATE, llava_chat_template
from mllm_swap.families.prompts import expand2square
from mllm_swap.tune.batches import ConversationCollator, ConversationDataset, LengthGroupedSampler
from mllm_swap.tune.conversations import (
    IGNORE_INDEX,
    ROLES,
    encode,
    generation_prompt,
    load_conversations,
    to_messages,
)

MEAN = [0.48145466, 0.4578275, 0.40821073]


@pytest.fixture(scope="module")
def processor() -> LlavaProcessor:
    tok = build_bpe_tokenizer(extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_mean=MEAN
    )
    return LlavaProcessor(
        images, tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1
    )


def _write_data(root: Path, records: list[dict], images: dict[str, tuple[int, int]]) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for name, size in images.items():
        Image.new("RGB", size, (200, 30, 30)).save(root / "img" / name)
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def _conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


GOOD = {
    "id": "good",
    "image": "a.png",
    "conversations": _conv("<image>\nWhat color is the shape?", "red", "How many shapes are there?", "one"),
}


def test_labels_cover_exactly_the_assistant_replies(processor: LlavaProcessor) -> None:
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    item = encode(processor, to_messages(GOOD["conversations"], True), image)
    ids, labels = item["input_ids"], item["labels"]
    assert labels.shape == ids.shape and item["pixel_values"].shape == (1, 3, 64, 64)
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])
    # Decoding the labelled tokens gives the replies, each closed by eos, and nothing else.
    assert processor.tokenizer.decode(ids[kept]).split() == ["red</s>", "one</s>"]
    # Image tokens: exactly 64 patches (CLS dropped), none labelled.
    image_id = processor.image_token_id
    assert int((ids == image_id).sum()) == 64 and not bool(kept[ids == image_id].any())
    # Every unlabelled token decodes to template/prompt text.
    prompt = processor.tokenizer.decode(ids[~kept & (ids != image_id)], skip_special_tokens=True)
    assert "What color is the shape?" in prompt and "red" not in prompt and "ASSISTANT:" in prompt


def test_labels_match_transformers_assistant_mask(processor: LlavaProcessor) -> None:
    """Independent reference: the HF processor's own ``{% generation %}`` mask of the same template."""
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    messages = to_messages(GOOD["conversations"], True)
    ours = encode(processor, messages, image, template=DEFAULT_CHAT_TEMPLATE, append_eos=False)
    with_image = [
        {**m, "content": [{**c, "image": image} if c["type"] == "image" else c for c in m["content"]]}
        for m in messages
    ]
    ref = processor.apply_chat_template(
        [with_image],
        chat_template=DEFAULT_CHAT_TEMPLATE,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ref_ids = torch.tensor(ref["input_ids"][0])
    ref_mask = torch.tensor(ref["assistant_masks"][0]).bool()
    assert torch.equal(ours["input_ids"], ref_ids)
    assert torch.equal(ours["labels"] != IGNORE_INDEX, ref_mask)


def test_chat_template_renders_string_and_list_content_alike(processor: LlavaProcessor) -> None:
    """String content (lmms-eval's llava_hf wrapper, plain chat code) renders exactly as list content, and list
    content exactly as LLaVA-1.5's list-only template (as llava-hf ships it), which drops string content."""
    as_list = to_messages(GOOD["conversations"], True)
    as_string = [{"role": ROLES[t["from"]], "content": t["value"]} for t in GOOD["conversations"]]
    tok = processor.tokenizer

    def render(messages: list[dict], template: str, **kwargs):
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)

    want = "USER: <image>\nWhat color is the shape? ASSISTANT: red USER: How many shapes are there? ASSISTANT: one "
    assert render(as_string, DEFAULT_CHAT_TEMPLATE) == render(as_list, DEFAULT_CHAT_TEMPLATE) == want
    assert render(as_list, LLAVA_HF_LIST_TEMPLATE) == want
    for n in (1, 3):  # generation prompts after each user turn
        prompt = render(as_string[:n], DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True)
        assert prompt == render(as_list[:n], DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True)
        assert prompt == render(as_list[:n], LLAVA_HF_LIST_TEMPLATE, add_generation_prompt=True)
        assert prompt.endswith("ASSISTANT:") and prompt.startswith("USER: <image>\nWhat color")
    masks = [
        tok.apply_chat_template(
            m, chat_template=DEFAULT_CHAT_TEMPLATE, return_dict=True, return_assistant_tokens_mask=True
        )["assistant_masks"]
        for m in (as_string, as_list)
    ]
    assert masks[0] == masks[1] and sum(masks[0]) > 0
    assert (
        render(as_string, LLAVA_HF_LIST_TEMPLATE) == "USER: ASSISTANT: USER: ASSISTANT: "
    )  # the bug it fixes


def test_llava_directories_get_the_string_and_list_template() -> None:
    assert llava_chat_template(None) == DEFAULT_CHAT_TEMPLATE
    # llava-hf's copy carries Jinja comments and other spacing
    shipped = LLAVA_HF_LIST_TEMPLATE.replace(
        "{% for message in messages %}", "{% for message in messages %}{# x #} "
    )
    assert llava_chat_template(shipped) == DEFAULT_CHAT_TEMPLATE
    custom = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    assert llava_chat_template(custom) == custom


def test_text_only_record_and_generation_prompt(processor: LlavaProcessor) -> None:
    item = encode(processor, to_messages(_conv("Say yes.", "yes"), False), None)
    assert "pixel_values" not in item
    kept = item["labels"] != IGNORE_INDEX
    assert processor.tokenizer.decode(item["input_ids"][kept]).strip() == "yes</s>"
    prompt = generation_prompt(processor, "What color is it?")
    assert prompt == "USER: <image>\nWhat color is it? ASSISTANT:"


def test_pad_to_square_uses_mean_colour(tmp_path: Path, processor: LlavaProcessor) -> None:
    path = _write_data(tmp_path, [dict(GOOD, image="wide.png")], {"wide.png": (64, 32)})
    ds = ConversationDataset(path, tmp_path / "img", processor, max_length=256)
    image = ds.load_image(ds.records[0])
    assert image.size == (64, 64)
    pixels = np.asarray(image)
    background = tuple(int(m * 255) for m in MEAN)
    assert (pixels[:16] == background).all() and (pixels[48:] == background).all()
    assert (pixels[16:48] == (200, 30, 30)).all()
    # Same result as pasting onto a canvas by hand.
    manual = Image.new("RGB", (64, 64), background)
    manual.paste(Image.new("RGB", (64, 32), (200, 30, 30)), (0, 16))
    assert np.array_equal(np.asarray(expand2square(Image.new("RGB", (64, 32), (200, 30, 30)), background)),
                          np.asarray(manual))  # fmt: skip
    tall = expand2square(Image.new("RGB", (10, 30), (0, 0, 0)), (1, 2, 3))
    assert tall.size == (30, 30) and np.asarray(tall)[0, 0].tolist() == [1, 2, 3]


BAD = [
    ({"id": "missing", "image": "nope.png", "conversations": GOOD["conversations"]}, "missing image file"),
    ({"id": "notoken", "image": "a.png", "conversations": _conv("What?", "red")}, "image given but no"),
    ({"id": "noimage", "conversations": _conv("<image>\nWhat?", "red")}, "<image> without image"),
    ({"id": "empty", "image": "a.png", "conversations": []}, "empty conversation"),
    ({"id": "order", "conversations": _conv("hi", "there")[::-1]}, "wrong role order"),
    ({"id": "odd", "conversations": _conv("hi", "there", "again")}, "wrong role order"),
    (
        {"id": "twice", "image": "a.png", "conversations": _conv("<image> <image> hi", "x")},
        "2 <image> tokens",
    ),
]


def test_bad_records_are_reported_with_ids(tmp_path: Path) -> None:
    records = [GOOD] + [rec for rec, _ in BAD] + [{"id": "text", "conversations": _conv("hi", "yo")}]
    path = _write_data(tmp_path, records, {"a.png": (64, 64)})
    kept, summary = load_conversations(path, tmp_path / "img", on_error="skip")
    assert [r["id"] for r in kept] == ["good", "text"]
    assert summary.total == len(records) and summary.kept == 2 and summary.with_image == 1
    assert [b.id for b in summary.bad] == [rec["id"] for rec, _ in BAD]
    for bad, (_, reason) in zip(summary.bad, BAD, strict=True):
        assert reason in bad.reason, (bad.id, bad.reason)
    assert sum(summary.reasons().values()) == len(BAD)
    assert "missing" in summary.describe()
    with pytest.raises(ValueError, match=r"7 bad record\(s\)") as err:
        load_conversations(path, tmp_path / "img", on_error="raise")
    assert "id missing" in str(err.value) and "id notoken" in str(err.value)


def test_unusable_inputs_fail_early(tmp_path: Path, processor: LlavaProcessor) -> None:
    path = _write_data(tmp_path, [GOOD], {"a.png": (64, 64)})
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_conversations(path, tmp_path / "absent")
    with pytest.raises(ValueError, match="on_error"):
        load_conversations(path, tmp_path / "img", on_error="ignore")
    with pytest.raises(ValueError, match="max_length 40 leaves no room"):
        ConversationDataset(path, tmp_path / "img", processor, max_length=40)
    obj = tmp_path / "obj.json"
    obj.write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_conversations(obj, tmp_path / "img")


def test_truncation_keeps_image_tokens_or_fails(tmp_path: Path, processor: LlavaProcessor) -> None:
    path = _write_data(tmp_path, [GOOD], {"a.png": (64, 64)})
    ds = ConversationDataset(path, tmp_path / "img", processor, max_length=80)
    item = ds[0]
    assert len(item["input_ids"]) == 80 and int((item["input_ids"] == processor.image_token_id).sum()) == 64
    with pytest.raises(ValueError, match="record good: image tokens reach position"):
        ConversationDataset(path, tmp_path / "img", processor, max_length=65)  # when tokenised, before training


def test_items_equal_encoding_each_record_with_its_image(tmp_path: Path, processor: LlavaProcessor) -> None:
    """Conversations are tokenised once, without the image's pixels; an item equals ``encode`` of its record
    with its real image (a wide one padded to square too), text-only records included."""
    records = [GOOD, {"id": "text", "conversations": _conv("hi", "yo")}, dict(GOOD, id="wide", image="w.png")]
    path = _write_data(tmp_path, records, {"a.png": (64, 64), "w.png": (64, 32)})
    ds = ConversationDataset(path, tmp_path / "img", processor, max_length=256)
    for index, record in enumerate(records):
        image = ds.load_image(record)
        expected = encode(processor, to_messages(record["conversations"], image is not None), image)
        item = ds[index]
        assert item.keys() - {"id"} == expected.keys()
        for key, value in expected.items():
            assert torch.equal(item[key], value), (record["id"], key)


def test_length_grouped_sampler_is_deterministic_and_groups() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=400).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    first, again = list(sampler), list(sampler)
    assert first == again and sorted(first) == list(range(400))
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=4)) != first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(400))

    def spread(order: list[int]) -> float:
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return float(np.mean([np.ptp([lengths[j] for j in b]) for b in batches]))

    random_order = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    assert spread(first) < 0.25 * spread(random_order)
    assert lengths[first[0]] == max(lengths)  # longest batch first (OOM early)


def test_collator_pads_and_concatenates_images(tmp_path: Path, processor: LlavaProcessor) -> None:
    records = [GOOD, {"id": "text", "conversations": _conv("hi", "yo")}, dict(GOOD, id="g2")]
    path = _write_data(tmp_path, records, {"a.png": (64, 64)})
    ds = ConversationDataset(path, tmp_path / "img", processor, max_length=256)
    items = [ds[i] for i in range(3)]
    batch = ConversationCollator(processor.tokenizer.pad_token_id)(items)
    width = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == (3, width) and batch["pixel_values"].shape == (2, 3, 64, 64)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert torch.equal(batch["labels"][row, :n], item["labels"])
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == n
    assert len(ds.lengths()) == 3 and ds.lengths()[1] < ds.lengths()[0]
