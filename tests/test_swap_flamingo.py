"""Flamingo-style families: IDEFICS (drop-in of a same-shape CLIP, refusal otherwise) and OpenFlamingo
state dicts (``vision_encoder.*`` swapped for an open_clip visual, checked by loading it back with open_clip)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from align.fixtures import ensure_tiny
from align.load import load_vision_encoder
from mllm_swap.families.openflamingo import PREFIX
from mllm_swap.fixtures import ensure_tiny_mllm
from mllm_swap.swap import sample_images, swap

PROMPT = "What colour is the shape?"


def perturbed(spec: str, scale: float = 0.02, rename: bool = True):
    """An encoder whose weights moved by ``scale`` of each tensor's std (a slightly re-aligned tower)."""
    enc = load_vision_encoder(spec)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1.0))
    if rename:  # an open_clip encoder keeps its source: its directory supplies the model config
        enc.source = f"{spec}-perturbed"
    return enc


def small_openclip(width: int):
    """An open_clip ViT encoder of another width (64x64 images, patch 8)."""
    from open_clip.model import CLIP
    from torchvision import transforms

    from align.encoders.openclip import OpenClipVisionEncoder

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 64, "layers": 2, "width": width, "head_width": 16, "patch_size": 8},
        text_cfg={"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    )
    return OpenClipVisionEncoder(
        model.visual, transforms.Compose([transforms.ToTensor()]), f"openclip-width-{width}"
    )


@pytest.mark.slow
def test_idefics_dropin_identity_and_reload(tmp_path) -> None:
    out = tmp_path / "idefics"
    report = swap("tiny-idefics", "tiny-clip", out, num_images=2, verbose=False)
    assert report.mode == "dropin" and report.new_tower["image_tokens"] == 65
    assert report.drift["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert report.drift["next_token_kl"] == pytest.approx(0.0, abs=1e-9)
    image = tmp_path / "probe.png"
    sample_images(1)[0].save(image)
    text = f"User: {PROMPT}\nAssistant:"
    code = f"""
import json, sys, torch
from PIL import Image
from transformers import AutoProcessor, IdeficsForVisionText2Text
image = Image.open({str(image)!r}).convert("RGB")
res = {{}}
for name, path in (("base", {str(ensure_tiny_mllm("tiny-idefics"))!r}), ("swapped", {str(out)!r})):
    proc = AutoProcessor.from_pretrained(path)
    model = IdeficsForVisionText2Text.from_pretrained(path).eval()
    inputs = proc(images=[image], text=[{text!r}], return_tensors="pt")
    with torch.no_grad():
        res[name] = model(**inputs).logits
        new = model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] - inputs["input_ids"].shape[1]
res = {{"max_diff": float((res["base"] - res["swapped"]).abs().max()), "new": new,
        "plain": sorted(m for m in ("mllm_swap", "align") if m in sys.modules)}}
print(json.dumps(res))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"max_diff": 0.0, "new": 3, "plain": []}


def test_idefics_dropin_of_changed_clip_reports_small_drift(tmp_path) -> None:
    from transformers import IdeficsForVisionText2Text

    enc = perturbed("tiny-clip")
    report = swap("tiny-idefics", enc, tmp_path / "near", num_images=2, verbose=False)
    assert report.mode == "dropin" and report.untrained == []
    assert 0.9 < report.drift["cosine_mean"] < 0.99999 and 0.0 < report.drift["next_token_kl"] < 0.5
    model = IdeficsForVisionText2Text.from_pretrained(tmp_path / "near")
    want = enc.model.vision_model.state_dict()
    got = model.model.vision_model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_idefics_refuses_other_towers(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"refusing .* width 64 vs 96"):
        swap("tiny-idefics", "tiny-dinov2-random", tmp_path / "a", verbose=False)
    with pytest.raises(ValueError, match="tower type clip_vision_model vs siglip_vision_model"):
        swap("tiny-idefics", "tiny-siglip", tmp_path / "b", verbose=False)
    with pytest.raises(ValueError, match="drop-in only"):
        swap("tiny-idefics", "tiny-clip", tmp_path / "c", mode="rebuild", verbose=False)
    enc = load_vision_encoder("tiny-clip")
    enc.image_size = 32  # an encoder preprocessing to 32x32
    with pytest.raises(ValueError, match="encoder image size 32 cannot be fed"):
        swap("tiny-idefics", enc, tmp_path / "d", verbose=False)


def test_openflamingo_vision_encoder_loads_back_with_open_clip(tmp_path) -> None:
    import open_clip

    enc = perturbed("tiny-openclip", rename=False)
    out = tmp_path / "of"
    report = swap("tiny-openflamingo", enc, out, num_images=2, verbose=False)
    assert report.mode == "dropin" and 0.9 < report.drift["cosine_mean"] < 0.99999
    before = load_file(str(ensure_tiny_mllm("tiny-openflamingo") / "checkpoint.safetensors"))
    after = load_file(str(out / "checkpoint.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(PREFIX))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(PREFIX))
    meta = json.loads((out / "openflamingo.json").read_text())
    assert meta["clip_vision_encoder_path"] == f"local-dir:{out / 'vision_encoder'}"
    # Load the written vision weights into open_clip (as OpenFlamingo would) and compare the perceiver's input.
    model, _, preprocess = open_clip.create_model_and_transforms(meta["clip_vision_encoder_path"])
    visual = model.visual.eval()
    visual.load_state_dict(
        {k[len(PREFIX) :]: v for k, v in after.items() if k.startswith(PREFIX)}, strict=True
    )
    visual.output_tokens = True
    images = sample_images(2)
    pixels = torch.stack([preprocess(im) for im in images])
    with torch.no_grad():
        tokens = visual(pixels)[1]
        enc.visual.output_tokens = True
        want = enc.visual(pixels)[1]
        from_dir = model.visual(pixels)[1]
    assert tokens.shape == (2, 64, 64)
    torch.testing.assert_close(tokens, want, rtol=0, atol=0)
    torch.testing.assert_close(from_dir, want, rtol=0, atol=0)  # vision_encoder/ holds the same visual


def _mpt_language_model(state: dict[str, torch.Tensor], out) -> None:
    """An HF ``MptForCausalLM`` directory (and a tokenizer that, with OpenFlamingo's two special tokens,
    fills the 512-row embedding) holding the checkpoint's ``lang_encoder.transformer.*`` weights."""
    from transformers import MptConfig, MptForCausalLM

    from align.encoders.tokenizer import build_bpe_tokenizer

    lm = {k[len("lang_encoder.") :]: v for k, v in state.items() if k.startswith("lang_encoder.transformer.")}
    model = MptForCausalLM(MptConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=512))
    missing, unexpected = model.load_state_dict(lm, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # MPT ties lm_head to wte
    model.save_pretrained(out)
    tokenizer = build_bpe_tokenizer(vocab_size=510)
    assert len(tokenizer) == 510
    tokenizer.save_pretrained(out)


def test_openflamingo_factory_runs_the_swapped_checkpoint(tmp_path) -> None:
    """open_flamingo's own ``create_model_and_transforms`` builds from the swap's ``vision_encoder/``, loads
    the swapped ``vision_encoder.*`` strictly, and runs forward and generate on a left-padded batch; the
    perceiver really consumes the new encoder's final-layer tokens."""
    pytest.importorskip(
        "open_flamingo",
        reason="open-flamingo is not installed (pip install --no-deps open-flamingo==2.0.1 einops-exts==0.0.4)",
    )
    from open_flamingo import create_model_and_transforms

    enc = perturbed("tiny-openclip", rename=False)
    out = tmp_path / "of"
    swap("tiny-openflamingo", enc, out, num_images=2, verbose=False)
    state = load_file(str(out / "checkpoint.safetensors"))
    meta = json.loads((out / "openflamingo.json").read_text())
    _mpt_language_model(state, tmp_path / "lm")
    model, image_processor, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path=meta["clip_vision_encoder_path"],
        clip_vision_encoder_pretrained=meta["clip_vision_encoder_pretrained"],
        lang_encoder_path=str(tmp_path / "lm"),
        tokenizer_path=str(tmp_path / "lm"),
        cross_attn_every_n_layers=meta["cross_attn_every_n_layers"],
        use_local_files=True,
    )
    vision = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    model.vision_encoder.load_state_dict(vision, strict=True)
    for (
        block
    ) in model.lang_encoder.gated_cross_attn_layers:  # open the tanh gates (0 at init: images ignored)
        block.attn_gate.data.fill_(1.0)
        block.ff_gate.data.fill_(1.0)
    model.eval()
    images = sample_images(2)
    pixels = torch.stack([image_processor(im) for im in images])
    tokenizer.padding_side = "left"
    lang = tokenizer(["<image>a red", "<image>what shape is it and where"], return_tensors="pt", padding=True)
    assert not bool(lang["attention_mask"].all())  # a padded batch, passed with its mask
    vision_x = pixels[:, None, None]  # [B, T_img=1, F=1, C, H, W]
    with torch.no_grad():
        enc.visual.output_tokens = True
        torch.testing.assert_close(model.vision_encoder(pixels)[1], enc.visual(pixels)[1], rtol=0, atol=0)
        logits = model(vision_x, lang["input_ids"], attention_mask=lang["attention_mask"]).logits
        generated = model.generate(
            vision_x, lang["input_ids"], attention_mask=lang["attention_mask"], max_new_tokens=3,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        model.vision_encoder.load_state_dict(load_vision_encoder("tiny-openclip").visual.state_dict())
        original = model(vision_x, lang["input_ids"], attention_mask=lang["attention_mask"]).logits
    assert logits.shape == (2, lang["input_ids"].shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    assert generated.shape == (2, lang["input_ids"].shape[1] + 3)
    assert torch.equal(generated[:, : lang["input_ids"].shape[1]], lang["input_ids"])
    assert not torch.allclose(logits, original)  # the swapped vision weights change what the LM sees


def test_openflamingo_refusals_and_trainable_only_checkpoint(tmp_path) -> None:
    with pytest.raises(
        ValueError,
        match="width 32 but the perceiver and gated cross-attention were trained for vision width 64",
    ):
        swap("tiny-openflamingo", small_openclip(32), tmp_path / "a", verbose=False)
    with pytest.raises(ValueError, match="vision_encoder is an open_clip visual"):
        swap("tiny-openflamingo", "tiny-clip", tmp_path / "b", verbose=False)
    with pytest.raises(ValueError, match="differs from the stored vision_encoder"):
        swap("tiny-openflamingo", small_openclip(64), tmp_path / "c", verbose=False)
    # Released checkpoints keep only trainable weights: the vision weights are added, width still checked.
    state = load_file(str(ensure_tiny_mllm("tiny-openflamingo") / "checkpoint.safetensors"))
    trainable = tmp_path / "released.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith(PREFIX)}, trainable)
    report = swap(trainable, "tiny-openclip", tmp_path / "d", num_images=2, verbose=False)
    saved = torch.load(tmp_path / "d" / "released.pt", weights_only=True)
    visual = load_vision_encoder(ensure_tiny("tiny-openclip")).visual.state_dict()
    assert all(torch.equal(saved[PREFIX + k], v) for k, v in visual.items())
    assert report.drift["cosine_mean"] is None and "unavailable" in report.drift["cosine_note"]
