"""freeze_align: paper defaults, ~11.5M parameters, weight-decay groups, masking, InfoNCE, a short run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from align.heads import FreezeAlignTextHead, FreezeAlignTokenHead
from align.losses import Temperature
from align.methods.freeze_align import FreezeAlignMethod, FreezeAlignModel, load_recipe
from align.train.optim import default_param_groups


def heads(d_img: int, d_txt: int, out: int = 1024, prefix: int = 1) -> FreezeAlignModel:
    image = FreezeAlignTokenHead(
        {"kind": "freeze_align", "in_dim": d_img, "out_dim": out, "num_prefix_tokens": prefix}
    )
    text = FreezeAlignTextHead({"kind": "freeze_align", "in_dim": d_txt, "out_dim": out})
    return FreezeAlignModel(image, text, Temperature())


def test_paper_defaults():
    r = load_recipe(None, ["train.steps=1"])
    assert (r.train.optimizer, r.train.lr, r.train.weight_decay, r.train.schedule) == (
        "adamw",
        1e-3,
        0.02,
        "cosine",
    )
    assert r.train.warmup > 0
    assert (r.loss.init_temperature, r.loss.min_temperature, r.loss.max_temperature) == (0.07, 0.001, 0.5)
    assert r.text == "sentence-transformers/all-roberta-large-v1" and r.head.out_dim == 1024


def test_parameter_count_dinov2_large_roberta_large_without_allocating():
    with torch.device("meta"):
        model = heads(1024, 1024)
    n = sum(p.numel() for name, p in model.named_parameters() if "temperature" not in name)

    def projector(d, o):  # LayerNorm + linear path + (Linear -> GELU -> Linear) path
        return 2 * d + (d * o + o) + (d * o + o) + (o * o + o)

    global_head = 2 * (1024 * 1024 + 1024) + 2 * 1024
    assert n == 2 * projector(1024, 1024) + projector(1024, 1024) + global_head == 11_553_792
    assert abs(n - 11.5e6) / 11.5e6 < 0.01


def test_no_weight_decay_on_temperature_norms_biases():
    model = heads(8, 6, out=4)
    groups = default_param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and all(n.endswith("weight") and ".norm." not in n for n in decayed)
    assert "temperature.temperature" not in decayed
    assert all(p.ndim == 2 for g in groups if g["weight_decay"] > 0 for p in g["params"])


def test_text_head_ignores_padding_and_vision_pools_patches():
    torch.manual_seed(0)
    model = heads(8, 6, out=4).eval()
    tokens, mask = torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    garbage = tokens.clone()
    garbage[0, 3:] = 100.0
    with torch.no_grad():
        assert torch.allclose(model.text_head(tokens, mask), model.text_head(garbage, mask))
        short = model.text_head(tokens[:1, :3], mask[:1, :3])
        assert torch.allclose(model.text_head(tokens, mask)[0], short[0], atol=1e-6)
        img = torch.randn(3, 1 + 9, 8)
        h = model.image_head
        assert torch.allclose(
            h.pool(img), h.patch_proj(img[:, 1:]).mean(1) + h.cls_proj(img[:, 0]), atol=1e-6
        )


def test_method_loss_is_symmetric_infonce_and_clamps():
    torch.manual_seed(0)
    method = FreezeAlignMethod.__new__(FreezeAlignMethod)
    model = heads(8, 6, out=4).eval()
    batch = {"image": (torch.randn(5, 4, 8), torch.ones(5, 4, dtype=torch.bool)),
             "texts": [(torch.randn(5, 3, 6), torch.ones(5, 3, dtype=torch.long))]}  # fmt: skip
    loss, metrics = method.loss(model, batch)
    u = F.normalize(model.image_head.pool(batch["image"][0]), dim=-1)
    v = F.normalize(model.text_head(*batch["texts"][0]), dim=-1)
    logits = u @ v.T / 0.07
    want = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5)))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert metrics["temperature"].item() == pytest.approx(0.07)
    with torch.no_grad():
        model.temperature.temperature.fill_(1e-5)
    method.after_step(model)
    assert model.temperature.temperature.item() == pytest.approx(0.001)


@pytest.mark.slow
def test_short_run_learns_and_writes_a_loadable_artifact(tmp_path, capsys):
    from align.artifact import load_aligned
    from align.data.shapes import generate_shapes
    from mllm_swap.cli import main

    shapes = tmp_path / "shapes"
    generate_shapes(shapes, 100, seed=4, progress=False)
    out = tmp_path / "run"
    args = ["align", "freeze_align", "--config", "recipes/tiny_freeze_align.yaml", "--out", str(out),
            "--set", f"data.train={shapes}", "--set", "vision=tiny-dinov2-random", "--set", "text=tiny-text", "--set", "eval.drift_images=16",
            "--set", "train.steps=30", "--set", "train.batch_size=32",
            "--set", "train.log_every=5", "--set", "train.save_every=15", "--set", "train.report_to=[jsonl]"]  # fmt: skip
    assert main(args) == 0
    assert "zero-shot shape: acc1" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    manifest = json.loads((out / "cache" / "text-tokens-0" / "manifest.json").read_text())
    assert manifest["pool"] == "tokens"
    config = json.loads((out / "artifact" / "aligned_encoder.json").read_text())
    assert config["method"] == "freeze_align" and config["image_head"]["kind"] == "freeze_align"
    assert config["metrics"]["patch_drift"]["mean_patch_cosine"] == pytest.approx(1.0, abs=1e-4)
    enc = load_aligned(out / "artifact")
    x = torch.rand(2, 3, 64, 64)
    assert enc(x).shape == (2, 64, 128) and torch.equal(enc(x), load_aligned(out / "artifact")(x))
