"""Swaps into original LLaVA-1.5 checkpoints: the tower is written where ``mm_vision_tower`` loads it from
(changing those weights changes the output; changing the tower weights stored in the checkpoint does not,
unless ``unfreeze_mm_vision_tower``), ``mm_*`` keys follow the new tower, and the HF conversion agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mllm_swap.families.llava_original import (
    convert_llava_original_to_hf,
    convert_original_state_dict,
    load_llava_original_with_processor,
)
from mllm_swap.fixtures import ensure_tiny_mllm
from mllm_swap.swap import sample_images, swap

PROMPT = "What colour is the shape?"


@torch.no_grad()
def logits_of(path) -> torch.Tensor:
    model, proc = load_llava_original_with_processor(path)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True,
    )
    return model(**proc(images=sample_images(1)[0], text=text, return_tensors="pt")).logits


def perturb(file, prefix: str = "") -> None:
    """Add noise to every floating tensor of a safetensors file whose key starts with ``prefix``."""
    state = load_file(str(file))
    gen = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if k.startswith(prefix) and v.is_floating_point() and v.ndim >= 1:
            state[k] = v + 0.1 * torch.randn(v.shape, generator=gen)
    save_file(state, str(file), {"format": "pt"})


@pytest.fixture(scope="module")
def swaps(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("original-swaps")
    return {
        "clip": (
            root / "clip",
            swap("tiny-llava-original", "tiny-clip", root / "clip", num_images=2, verbose=False),
        ),
        "dinov2": (
            root / "dinov2",
            swap(
                "tiny-llava-original", "tiny-dinov2-random", root / "dinov2", to_hf=True, num_images=2, verbose=False
            ),
        ),
    }


def test_dropin_writes_tower_where_it_loads_from(swaps, tmp_path) -> None:
    import shutil

    path, report = swaps["clip"]
    config = json.loads((path / "config.json").read_text())
    assert (
        config["mm_vision_tower"] == str(path / "vision_tower")
        and (path / "vision_tower" / "config.json").is_file()
    )
    assert report.mode == "dropin" and report.drift["next_token_kl"] == pytest.approx(0.0, abs=1e-9)
    before = logits_of(ensure_tiny_mllm("tiny-llava-original"))
    after = logits_of(path)
    assert torch.equal(before, after)  # identical tower -> identical model
    # Changing the weights stored in the checkpoint does nothing (upstream drops them at load time) ...
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    perturb(copy / "model.safetensors", prefix="model.vision_tower.")
    assert torch.equal(logits_of(copy), after)
    # ... unless unfreeze_mm_vision_tower is set; and changing the tower directory always changes the output.
    config["unfreeze_mm_vision_tower"] = True
    (copy / "config.json").write_text(json.dumps(config))
    assert not torch.allclose(logits_of(copy), after)
    perturb(path / "vision_tower" / "model.safetensors")
    assert not torch.allclose(logits_of(path), after)


def test_rebuild_updates_mm_keys_and_projector(swaps) -> None:
    path, report = swaps["dinov2"]
    config = json.loads((path / "config.json").read_text())
    assert (
        config["mm_hidden_size"],
        config["mm_vision_select_feature"],
        config["mm_vision_select_layer"],
    ) == (96, "patch", -2)
    assert json.loads((path / "vision_tower" / "config.json").read_text())["model_type"] == "dinov2"
    state = load_file(str(path / "model.safetensors"))
    assert state["model.mm_projector.0.weight"].shape == (64, 96)
    original = load_file(str(ensure_tiny_mllm("tiny-llava-original") / "model.safetensors"))
    assert torch.equal(state["model.mm_projector.2.weight"], original["model.mm_projector.2.weight"])
    assert torch.equal(state["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert report.mode == "rebuild" and report.untrained == ["model.mm_projector.0"]
    assert any("upstream llava's builder loads CLIP towers only" in n for n in report.notes)


@pytest.mark.slow
def test_rebuild_reloads_in_fresh_process_and_hf_copy_agrees(swaps) -> None:
    """The original-format result reloads with the loader, the --to-hf copy with plain transformers, and both
    give the same logits; both generate."""
    path, _ = swaps["dinov2"]
    image = path.parent / "probe.png"
    sample_images(1)[0].save(image)
    code = f"""
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
image = Image.open({str(image)!r}).convert("RGB")
msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {PROMPT!r}}}]}}]
hf = AutoModelForImageTextToText.from_pretrained({str(path / "hf")!r}).eval()
hf_proc = AutoProcessor.from_pretrained({str(path / "hf")!r})
plain = sorted(m for m in ("mllm_swap", "align") if m in sys.modules)
from mllm_swap.families.llava_original import load_llava_original_with_processor
orig, proc = load_llava_original_with_processor({str(path)!r})
res = {{"plain": plain}}
for name, model, p in (("hf", hf, hf_proc), ("orig", orig, proc)):
    inputs = p(images=image, text=p.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
    with torch.no_grad():
        res[name] = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    res[name + "_new"] = out.shape[1] - inputs["input_ids"].shape[1]
res["max_diff"] = float((res.pop("hf") - res.pop("orig")).abs().max())
print(json.dumps(res))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {"plain": [], "hf_new": 3, "orig_new": 3, "max_diff": 0.0}


def test_convert_to_hf_matches_loader(tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    src = ensure_tiny_mllm("tiny-llava-original")
    out = convert_llava_original_to_hf(src, tmp_path / "hf")
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    loaded, _ = load_llava_original_with_processor(src)
    ref = loaded.state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert model.config.text_config.vocab_size % 64 == 0


def test_state_dict_key_mapping() -> None:
    t = torch.zeros(1)
    original = {
        "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding": t,
        "model.vision_tower.vision_tower.embeddings.cls_token": t,
        "model.mm_projector.0.weight": t,
        "model.mm_projector.2.bias": t,
        "model.layers.0.self_attn.q_proj.weight": t,
        "model.embed_tokens.weight": t,
        "model.norm.weight": t,
        "lm_head.weight": t,
        "model.layers.0.self_attn.rotary_emb.inv_freq": t,
        "model.image_newline": t,
    }
    assert sorted(convert_original_state_dict(original)) == sorted(
        [
            "model.vision_tower.embeddings.class_embedding",
            "model.vision_tower.embeddings.cls_token",
            "model.multi_modal_projector.linear_1.weight",
            "model.multi_modal_projector.linear_2.bias",
            "model.language_model.layers.0.self_attn.q_proj.weight",
            "model.language_model.embed_tokens.weight",
            "model.language_model.norm.weight",
            "lm_head.weight",
        ]
    )


def test_original_errors(tmp_path) -> None:
    src = ensure_tiny_mllm("tiny-llava-original")
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="original LLaVA checkpoint is missing model.safetensors"):
        load_llava_original_with_processor(bad)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (bad / name).write_bytes((src / name).read_bytes())
    (bad / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(ValueError, match="mm_projector_type 'linear'"):
        load_llava_original_with_processor(bad)
    (bad / "config.json").write_text(json.dumps({**config, "mm_hidden_size": 1024}))
    with pytest.raises(ValueError, match="mm_hidden_size 1024"):
        load_llava_original_with_processor(bad)
