"""Finding and loading MLLMs: one resolver (tiny id, path, hub id), the FAMILIES table's detection, one factory."""

from __future__ import annotations

import pytest
import torch

from mllm_swap.checkpoints import load_mllm, resolve_checkpoint
from mllm_swap.families import FAMILIES, detect_family, family_by_name
from mllm_swap.fixtures import ensure_tiny_mllm
from mllm_swap.swap import sample_images

TINY_FAMILY = {
    "tiny-llava": "llava_hf",
    "tiny-llava-original": "llava_original",
    "tiny-idefics": "idefics",
    "tiny-openflamingo": "openflamingo",
}


@pytest.mark.parametrize("name", sorted(TINY_FAMILY))
def test_tiny_ids_resolve_through_the_hook_and_detect_their_family(name: str) -> None:
    path = resolve_checkpoint(name)
    assert path == ensure_tiny_mllm(name)
    assert detect_family(path).name == TINY_FAMILY[name] == family_by_name(TINY_FAMILY[name]).name
    assert set(FAMILIES) == set(TINY_FAMILY.values())


def test_an_openflamingo_state_file_alone_is_detected() -> None:
    assert detect_family(ensure_tiny_mllm("tiny-openflamingo") / "checkpoint.safetensors").name == "openflamingo"


def test_bad_specs_are_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory.*tiny-llava.*not a hub id"):
        resolve_checkpoint(tmp_path / "gone")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a LoRA adapter, not a full checkpoint; merge it first"):
        resolve_checkpoint(adapter)
    with pytest.raises(ValueError, match="unknown MLLM family 'nope'"):
        family_by_name("nope")
    with pytest.raises(ValueError, match="openflamingo checkpoints have no transformers generation path"):
        load_mllm("tiny-openflamingo")


def test_the_factory_loads_an_original_llava_in_the_asked_dtype() -> None:
    from transformers import LlavaForConditionalGeneration

    loaded = load_mllm("tiny-llava-original", dtype="bf16", device="cpu")
    assert loaded.family.name == "llava_original" and isinstance(loaded.model, LlavaForConditionalGeneration)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16} and not loaded.model.training
    assert loaded.family.trainable_parts(loaded.model)["connector"] == "model.multi_modal_projector"


def test_a_llava_familys_inputs_are_its_chat_template_with_one_image() -> None:
    loaded = load_mllm("tiny-llava")
    image, prompt = sample_images(1)[0], "What colour is the shape?"
    processor = loaded.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = processor(images=image, text=text, return_tensors="pt")
    got = loaded.family.inputs(loaded, image, prompt)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    logprobs = loaded.family.next_token_logprobs(loaded, image, prompt)
    with torch.no_grad():
        reference = torch.log_softmax(loaded.model(**expected).logits[0, -1].double(), -1)
    assert torch.allclose(logprobs, reference)
