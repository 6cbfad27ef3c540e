"""The AlignedEncoder artifact: token rules computed by hand, round trips, fine-tuned backbones, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from align.artifact import AlignedEncoder, load_aligned, patch_drift, save_aligned
from align.heads import build_text_head, build_token_head
from align.integrity import CorruptFileError, record_checksums
from align.load import load_text_encoder, load_vision_encoder


@pytest.fixture(scope="module")
def dino_reg():
    return load_vision_encoder("tiny-dinov2-reg-random")  # 5 prefix tokens: CLS + 4 registers


@pytest.fixture(scope="module")
def text():
    return load_text_encoder("tiny-text")


def make(kind, backbone, text, out_dim=24):
    torch.manual_seed(0)
    prefix, d = backbone.num_prefix_tokens, backbone.embed_dim
    image = build_token_head({"kind": kind, "in_dim": d, "out_dim": out_dim, "num_prefix_tokens": prefix})
    txt = build_text_head({"kind": kind, "in_dim": text.embed_dim, "out_dim": out_dim})
    return AlignedEncoder(backbone, text, image, txt, method=kind, logit_scale=10.0, logit_bias=-5.0).eval()


def test_sail_token_rule_is_head_on_cls_and_each_patch(dino_reg, text):
    enc = make("sail_glu", dino_reg, text)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        tokens = dino_reg(x)
        cls, patches = tokens[:, 0], tokens[:, 5:]  # registers (1..4) are not patches
        glu = enc.image_head.head
        want = torch.stack([glu(torch.cat([cls, patches[:, i]], -1)) for i in range(patches.shape[1])], 1)
        assert torch.allclose(enc(x), want, atol=1e-5)
        glob = glu(torch.cat([cls, patches.mean(1)], -1))
        assert torch.allclose(enc.encode_image(x), F.normalize(glob, dim=-1), atol=1e-6)
    assert enc.num_prefix_tokens == 0 and enc.num_tokens == 64 and enc.out_dim == enc.embed_dim == 24
    assert enc(x).shape == (2, 64, 24) and enc.preprocess is dino_reg.preprocess


def test_freeze_align_token_rule_and_zero_drift(dino_reg, text):
    enc = make("freeze_align", dino_reg, text)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        tokens = dino_reg(x)
        head = enc.image_head
        want = head.patch_proj(tokens[:, 5:]) + head.cls_proj(tokens[:, 0]).unsqueeze(1)
        assert torch.allclose(enc(x), want, atol=1e-5)
        # vision embedding: shared patch projector averaged, plus the CLS projector, normalized
        glob = head.patch_proj(tokens[:, 5:]).mean(1) + head.cls_proj(tokens[:, 0])
        assert torch.allclose(enc.encode_image(x), F.normalize(glob, dim=-1), atol=1e-5)
        # text: projector per token, masked mean, global head
        batch = text.tokenize(["a red circle", "two shapes: a large blue square at the top"])
        feats = text.token_features(batch["input_ids"], batch["attention_mask"])
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (enc.text_head.token_proj(feats) * mask).sum(1) / mask.sum(1)
        want_text = F.normalize(enc.text_head.global_head(mean), dim=-1)
        assert torch.allclose(
            enc.encode_text(["a red circle", "two shapes: a large blue square at the top"]),
            want_text,
            atol=1e-5,
        )
    # linear in the patch: the mean of per-patch outputs is the global output exactly
    assert patch_drift(enc, x)["mean_patch_cosine"] == pytest.approx(1.0, abs=1e-5)


def test_sail_linear_head_has_no_drift_but_glu_does(dino_reg, text):
    x = torch.rand(3, 3, 64, 64)
    assert patch_drift(make("sail_linear", dino_reg, text), x)["mean_patch_cosine"] == pytest.approx(
        1.0, abs=1e-5
    )
    assert patch_drift(make("sail_glu", dino_reg, text), x)["mean_patch_cosine"] < 0.9999


@pytest.mark.parametrize("kind", ["sail_glu", "freeze_align"])
def test_round_trip_identical_outputs(kind, dino_reg, text, tmp_path):
    enc = make(kind, dino_reg, text)
    out = save_aligned(
        tmp_path / "art",
        enc,
        training={"steps": 7, "data": "shapes"},
        metrics={"zeroshot": {"color": {"acc1": 0.5}}},
    )
    again = load_vision_encoder(out)  # the registry recognizes an artifact directory
    assert isinstance(again, AlignedEncoder)
    x = torch.rand(2, 3, 64, 64)
    texts = ["a red circle", "a green cross"]
    with torch.no_grad():
        assert torch.equal(enc(x), again(x)) and torch.equal(enc(x, layer=-2), again(x, layer=-2))
        assert torch.equal(enc.encode_image(x), again.encode_image(x))
    assert torch.equal(enc.encode_text(texts), again.encode_text(texts))
    assert again.token_rule == enc.token_rule and again.logit_scale == 10.0
    assert again.image_head_config == enc.image_head_config
    card = (out / "README.md").read_text()
    assert f"({kind})" in card and "tiny-dinov2-reg-random" in card and "zeroshot.color.acc1 | 0.5000" in card
    assert json.loads((out / "preprocess.json").read_text())["image_size"] == 64
    assert (out / "preprocessor_config.json").is_file()
    assert not any(p.requires_grad for p in again.parameters())


def test_headless_fine_tuned_backbone_round_trip(text, tmp_path):
    """A KUEA-style artifact: fine-tuned CLIP weights included, no heads, CLIP's own text tower."""
    clip = load_vision_encoder("tiny-clip")
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.01 * torch.randn_like(p))
    enc = AlignedEncoder(clip, load_text_encoder("tiny-clip"), method="kuea", token_rule="patch").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(enc(x), clip(x)[:, 1:]) and enc.num_tokens == 64
        assert torch.allclose(enc.encode_image(x), F.normalize(clip.projected(x), dim=-1))
    save_aligned(tmp_path / "kuea", enc, include_backbone=True)
    again = load_aligned(tmp_path / "kuea")
    with torch.no_grad():
        assert torch.equal(again(x), enc(x)) and torch.equal(again.encode_image(x), enc.encode_image(x))
    assert torch.equal(again.encode_text(["a red circle"]), enc.encode_text(["a red circle"]))
    kept = AlignedEncoder(clip, None, method="kuea", token_rule="all")
    assert kept.num_prefix_tokens == 1 and kept.num_tokens == 65


def test_errors_name_the_problem(dino_reg, text, tmp_path):
    enc = make("sail_glu", dino_reg, text)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an aligned-encoder artifact"):
        save_aligned(busy, enc)
    out = save_aligned(tmp_path / "a", enc)
    weights = out / "model.safetensors"
    clean = weights.read_bytes()
    flipped = bytearray(clean)
    flipped[len(clean) // 2] ^= 0xFF  # same size, one byte of the head weights changed
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CorruptFileError, match="a/model.safetensors: artifact file is corrupt: expected sha256"):
        load_aligned(out)
    weights.write_bytes(clean)
    config = json.loads((out / "aligned_encoder.json").read_text())
    config["backbone"]["source"] = "tiny-dinov2-random"  # 1 prefix token instead of 5
    (out / "aligned_encoder.json").write_text(json.dumps(config))
    with pytest.raises(CorruptFileError, match="aligned_encoder.json: artifact file is (corrupt|truncated)"):
        load_aligned(out)
    record_checksums(out)  # an edit recorded as if made by the writer: the config checks speak
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        load_aligned(out)
    config["format"] = "something else"
    (out / "aligned_encoder.json").write_text(json.dumps(config))
    record_checksums(out)
    with pytest.raises(ValueError, match="expected format"):
        load_aligned(out)
    with pytest.raises(ValueError, match="needs a CLS token"):
        build_token_head({"kind": "sail_glu", "in_dim": 4, "out_dim": 2, "num_prefix_tokens": 0})(
            torch.zeros(1, 3, 4)
        )
    with pytest.raises(ValueError, match="image head kind"):
        build_token_head({"kind": "mlp"})


def test_freeze_align_artifact_of_the_old_text_head_is_refused(dino_reg, text, tmp_path):
    """An artifact saved before head_version 2 (residual on the input, keys mlp.*/norm.*) fails to load
    with a message naming the file and the two formulas."""
    from safetensors.torch import load_file, save_file

    out = save_aligned(tmp_path / "fa", make("freeze_align", dino_reg, text))
    config = json.loads((out / "aligned_encoder.json").read_text())
    assert config["text_head"]["head_version"] == 2
    load_aligned(out)  # the current format loads
    del config["text_head"]["head_version"]
    (out / "aligned_encoder.json").write_text(json.dumps(config))
    old_names = {"projection": "mlp.0", "fc": "mlp.2", "layer_norm": "norm"}
    state = {}
    for key, value in load_file(str(out / "model.safetensors")).items():
        for new, old in old_names.items():
            key = key.replace(f"text_head.global_head.{new}.", f"text_head.global_head.{old}.")
        state[key] = value
    save_file(state, str(out / "model.safetensors"))
    record_checksums(out)  # an intact artifact of the old format, not a corrupt one
    with pytest.raises(
        ValueError, match=r"model\.safetensors: .*LayerNorm\(x \+ fc\(GELU\(P x\)\)\).*retrain"
    ):
        load_aligned(out)
