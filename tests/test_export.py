"""HF CLIPModel <-> open_clip conversion: exact round trips and equal embeddings in both directions."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

from align.clip_convert import hf_clip_to_openclip_dir, openclip_config_from_model, openclip_to_hf_dir
from align.clip_state_dict import (
    UnsupportedModelError,
    hf_to_openclip_state_dict,
    openclip_to_hf_state_dict,
)
from align.fixtures import ensure_tiny
from align.load import load_vision_encoder

TEXTS = ["a red circle.", "a photo of a blue square on a plain background.", "two shapes: a green cross"]


def _images(n: int = 3, size: int = 80) -> list[Image.Image]:
    """Random RGB images larger than the model input, so resize and crop both run."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8 * i, 3), dtype=np.uint8)) for i in range(n)]


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output


@pytest.fixture(scope="module")
def hf_clip():
    path = ensure_tiny("tiny-clip")
    model = CLIPModel.from_pretrained(path).eval()
    # perturb away from the init so layer norms and biases are not trivially equal
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model, CLIPImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def openclip_tiny():
    path = ensure_tiny("tiny-openclip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{path}")


def test_state_dict_round_trips_are_exact(hf_clip, openclip_tiny):
    model = hf_clip[0]
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    back = openclip_to_hf_state_dict(hf_to_openclip_state_dict(sd))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)

    oc = {k: v for k, v in openclip_tiny[0].state_dict().items() if k != "attn_mask"}
    again = hf_to_openclip_state_dict(openclip_to_hf_state_dict(oc))
    assert set(again) == set(oc)
    assert all(torch.equal(again[k], oc[k]) for k in oc)


def test_hf_to_openclip_same_embeddings(hf_clip, tmp_path):
    model, processor, tokenizer = hf_clip
    out = hf_clip_to_openclip_dir(model, processor, tokenizer, tmp_path / "oc", name="tiny-export-test")
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    oc_tok = open_clip.get_tokenizer(f"local-dir:{out}")
    images = _images()
    with torch.no_grad():
        hf_img = _features(model.get_image_features(**processor(images=images, return_tensors="pt")))
        oc_img = oc.encode_image(torch.stack([preprocess(im) for im in images]))
        enc = tokenizer(TEXTS, padding="max_length", max_length=32, return_tensors="pt")
        hf_txt = _features(model.get_text_features(**enc))
        oc_txt = oc.encode_text(oc_tok(TEXTS))
    # each side ran its own preprocessing (PIL vs torchvision bicubic resize): a small tolerance
    torch.testing.assert_close(oc_img, hf_img, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(oc_txt, hf_txt, atol=1e-5, rtol=1e-5)

    # the model-config JSON registers a named architecture that loads the same weights
    open_clip.add_model_config(out / "tiny-export-test.json")
    named, _, _ = open_clip.create_model_and_transforms(
        "tiny-export-test", pretrained=str(out / "open_clip_model.safetensors")
    )
    pixels = torch.stack([preprocess(im) for im in images])
    with torch.no_grad():
        torch.testing.assert_close(named.eval().encode_image(pixels), oc_img, atol=1e-6, rtol=1e-6)


def test_openclip_to_hf_same_embeddings_and_tokens(openclip_tiny, tmp_path):
    oc, preprocess, oc_tok = openclip_tiny
    out = openclip_to_hf_dir(oc, oc_tok, tmp_path / "hf")
    hf = CLIPModel.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    processor = CLIPImageProcessor.from_pretrained(out)
    oc_ids = oc_tok(TEXTS)
    enc = tokenizer(TEXTS, padding="max_length", max_length=oc_ids.shape[1], return_tensors="pt")
    for row_hf, row_oc in zip(enc["input_ids"], oc_ids, strict=True):
        n = int(row_oc.ne(0).sum())  # open_clip pads with 0, HF with end-of-text: compare the text part
        assert row_hf[:n].tolist() == row_oc[:n].tolist()
    images = _images()
    with torch.no_grad():
        hf_img = _features(hf.get_image_features(**processor(images=images, return_tensors="pt")))
        oc_img = oc.encode_image(torch.stack([preprocess(im) for im in images]))
        hf_txt = _features(hf.get_text_features(**enc))
        oc_txt = oc.encode_text(oc_ids)
    torch.testing.assert_close(hf_img, oc_img, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(hf_txt, oc_txt, atol=1e-5, rtol=1e-5)


def test_vision_only_conversion_matches_tokens_llava_reads(hf_clip, tmp_path):
    """A CLIPVisionModelWithProjection converts alone; layer -2 tokens (what LLaVA reads) agree."""
    model, processor, tokenizer = hf_clip
    vision = CLIPVisionModelWithProjection(model.config.vision_config).eval()
    vision.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    )
    out = hf_clip_to_openclip_dir(model, processor, tokenizer, tmp_path / "oc")
    oc_enc = load_vision_encoder(out)
    visual_sd = hf_to_openclip_state_dict(vision.state_dict(), text=False)
    assert all(k.startswith("visual.") for k in visual_sd)
    oc_enc.visual.load_state_dict({k[len("visual.") :]: v for k, v in visual_sd.items()})
    pixels = processor(images=_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hf_tokens = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(oc_enc(pixels, layer=-2), hf_tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            oc_enc.pooled(pixels, "projected"), vision(pixel_values=pixels).image_embeds, atol=1e-5, rtol=1e-5
        )


def test_unsupported_inputs_fail_clearly(openclip_tiny):
    oc = openclip_tiny[0]
    sd = dict(oc.state_dict())
    sd["visual.attn_pool.query"] = torch.zeros(4)
    with pytest.raises(UnsupportedModelError, match="attn_pool.query"):
        openclip_to_hf_state_dict(sd)
    with pytest.raises(UnsupportedModelError, match="vision_model"):
        hf_to_openclip_state_dict({"foo.weight": torch.zeros(1)})
    layer_scaled = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg={
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
            "ls_init_value": 0.1,
        },
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    )
    with pytest.raises(UnsupportedModelError, match="layer scale"):
        openclip_config_from_model(layer_scaled)
