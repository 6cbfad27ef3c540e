"""Tiny MLLMs: real formats, the tiny encoders' own tower weights, and the original-LLaVA loader checked
against an upstream-style reimplementation (features spliced at the image position, plain Llama LM)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from align.fixtures import ensure_tiny
from mllm_swap.families.base import quiet_transformers
from mllm_swap.fixtures import build_tiny_llava, ensure_tiny_mllm

PROMPT = "What colour is the shape?"


def _image() -> Image.Image:
    from mllm_swap.swap import sample_images

    return sample_images(1)[0]


def _clip_vision_state() -> dict[str, torch.Tensor]:
    from transformers import CLIPVisionModel

    with quiet_transformers():
        return CLIPVisionModel.from_pretrained(ensure_tiny("tiny-clip")).state_dict()


def test_tiny_llava_has_tiny_clip_tower_and_generates() -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    path = ensure_tiny_mllm("tiny-llava")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(model, LlavaForConditionalGeneration)
    cfg = model.config
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.image_seq_length) == (
        -2,
        "default",
        64,
    )
    reference = _clip_vision_state()
    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == reference.keys()
    assert all(torch.equal(tower[k], reference[k]) for k in reference)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.startswith("USER: <image>\n") and text.endswith("ASSISTANT:")
    # the tokenizer (what lmms-eval's llava_hf renders with) has the template, for string content too
    string = [{"role": "user", "content": f"<image>\n{PROMPT}"}]
    assert processor.tokenizer.apply_chat_template(string, add_generation_prompt=True, tokenize=False) == text
    inputs = processor(images=_image(), text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 64  # (64/8)^2 + 1 CLS - 1 ("default")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_tiny_llava_build_is_deterministic(tmp_path) -> None:
    states = []
    for name in ("a", "b"):
        torch.manual_seed(0)
        build_tiny_llava(tmp_path / name)
        states.append(load_file(str(tmp_path / name / "model.safetensors")))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def _upstream_logits(path, image: Image.Image, prompt: str) -> torch.Tensor:
    """LLaVA-1.5's computation written out by hand: tower from mm_vision_tower, hidden_states[-2][:, 1:],
    mm_projector (Linear-GELU-Linear), features spliced where the text says <image>, plain Llama LM."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    config = json.loads((path / "config.json").read_text())
    state = load_file(str(path / "model.safetensors"))
    with quiet_transformers():
        tower = CLIPVisionModel.from_pretrained(config["mm_vision_tower"]).eval()
    pixels = CLIPImageProcessor.from_pretrained(config["mm_vision_tower"])(images=image, return_tensors="pt")
    hidden = tower(pixels["pixel_values"], output_hidden_states=True).hidden_states[
        config["mm_vision_select_layer"]
    ]
    feats = hidden[:, 1:]
    h = F.linear(feats, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])
    h = F.linear(F.gelu(h), state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"])
    fields = {
        k: v for k, v in config.items() if k in LlamaConfig.__dataclass_fields__ and k != "architectures"
    }
    lm = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    lm_state = {
        k: v for k, v in state.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))
    }
    lm.load_state_dict(lm_state, strict=True)
    tok = AutoTokenizer.from_pretrained(path)
    before, after = f"USER: <image>\n{prompt} ASSISTANT:".split("<image>")
    ids_before = tok(before, return_tensors="pt").input_ids
    ids_after = tok(after, add_special_tokens=False, return_tensors="pt").input_ids
    embed = lm.get_input_embeddings()
    embeds = torch.cat([embed(ids_before), h, embed(ids_after)], dim=1)
    return lm(inputs_embeds=embeds).logits


@torch.no_grad()
def test_original_loader_matches_upstream_semantics() -> None:
    from mllm_swap.families.llava_original import load_llava_original_with_processor

    path = ensure_tiny_mllm("tiny-llava-original")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and config["mm_projector_type"] == "mlp2x_gelu"
    assert (
        config["mm_vision_select_layer"],
        config["mm_vision_select_feature"],
        config["mm_hidden_size"],
    ) == (-2, "patch", 64)
    stored = load_file(str(path / "model.safetensors"))
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in stored)
    vocab = int(config["vocab_size"])
    model, processor = load_llava_original_with_processor(path)
    assert (
        model.config.text_config.vocab_size % 64 == 0 and len(processor.tokenizer) == vocab + 1
    )  # + <image>
    image = _image()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=image, text=text, return_tensors="pt")
    got = model(**inputs).logits[..., :vocab]
    want = _upstream_logits(path, image, PROMPT)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_tiny_idefics_tower_is_tiny_clip_and_image_matters() -> None:
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    path = ensure_tiny_mllm("tiny-idefics")
    model = IdeficsForVisionText2Text.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    reference = _clip_vision_state()
    tower = model.model.vision_model.state_dict()
    assert all(torch.equal(tower[k], reference[k]) for k in reference)
    logits = []
    for colour in ("red", "blue"):
        inputs = processor(
            images=[Image.new("RGB", (64, 64), colour)],
            text=[f"User: {PROMPT}\nAssistant:"],
            return_tensors="pt",
        )
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])  # non-zero gates: the image reaches the text
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_tiny_openflamingo_format() -> None:
    from align.encoders.openclip import load_openclip
    from mllm_swap.families.openflamingo import PREFIX

    path = ensure_tiny_mllm("tiny-openflamingo")
    state = load_file(str(path / "checkpoint.safetensors"))
    meta = json.loads((path / "openflamingo.json").read_text())
    visual = load_openclip(ensure_tiny("tiny-openclip"))[0].visual.state_dict()
    stored = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    assert stored.keys() == visual.keys() and all(torch.equal(stored[k], visual[k]) for k in visual)
    assert state["perceiver.latents"].shape[1] == meta["vis_dim"] == 64
    assert state["lang_encoder.gated_cross_attn_layers.0.attn.to_kv.weight"].shape[1] == 64
    assert {k.split(".")[0] for k in state} == {"vision_encoder", "perceiver", "lang_encoder"}


def test_unknown_tiny_mllm() -> None:
    with pytest.raises(KeyError, match="unknown tiny MLLM"):
        ensure_tiny_mllm("tiny-nothing")
