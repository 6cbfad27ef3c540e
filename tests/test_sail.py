"""SAIL: paper defaults, head sizes, the loss against a direct formula, and a short end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from align.heads import SailTextHead, SailTokenHead
from align.methods.sail import SailMethod, SailModel, load_recipe
from align.recipes import ConfigError


def test_paper_defaults():
    r = load_recipe(None, ["train.steps=1"])
    t = r.train
    assert (t.optimizer, t.lr, t.weight_decay, tuple(t.betas)) == ("lion", 1e-5, 1e-4, (0.9, 0.99))
    assert (t.warmup, t.schedule, t.batch_size) == (0.1, "cosine", 32768)
    assert (r.head.kind, r.head.out_dim, r.head.width_factor) == ("glu", 1024, 8)
    assert (r.loss.init_scale, r.loss.init_bias, r.loss.min_scale, r.loss.max_scale) == (
        20.0,
        -10.0,
        1.0,
        100.0,
    )
    assert r.vision == "facebook/dinov2-large"


def test_bad_key_is_rejected_with_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'head.width_factor'"):
        load_recipe(None, ["train.steps=1", "head.widht_factor=2"])


def test_glu_head_size_for_dinov2_large():
    with torch.device("meta"):
        image = SailTokenHead({"kind": "sail_glu", "in_dim": 1024, "out_dim": 1024, "num_prefix_tokens": 1})
        text = SailTextHead({"kind": "sail_glu", "in_dim": 4096, "out_dim": 1024})
    d, h = 2048, 8 * 2048  # concat input, width factor 8
    want = 2 * d + 2 * (d * h + h) + (h * 1024 + 1024)
    assert sum(p.numel() for p in image.parameters()) == want
    d, h = 4096, 8 * 4096
    assert sum(p.numel() for p in text.parameters()) == 2 * d + 2 * (d * h + h) + (h * 1024 + 1024)


def direct_sail_loss(img, texts, scale, bias):
    u = F.normalize(img, dim=-1)
    total = 0.0
    for t in texts:
        logits = scale * u @ F.normalize(t, dim=-1).T + bias
        labels = 2 * torch.eye(len(u)) - 1
        total += -torch.log(torch.sigmoid(labels * logits)).mean()
    return total / len(texts)


def test_method_loss_is_sail_sigmoid_over_all_pairs_and_clamps():
    torch.manual_seed(0)
    method = SailMethod.__new__(SailMethod)
    method.recipe = load_recipe(None, ["train.steps=1", "loss.chunk_size=3"])
    model = SailModel(
        SailTokenHead(
            {"kind": "sail_glu", "in_dim": 4, "out_dim": 6, "width_factor": 2, "num_prefix_tokens": 1}
        ),
        SailTextHead({"kind": "sail_glu", "in_dim": 5, "out_dim": 6, "width_factor": 2}),
        __import__("align.losses", fromlist=["LogitScale"]).LogitScale(),
    )
    batch = {"image": torch.randn(7, 8), "texts": [torch.randn(7, 5), torch.randn(7, 5)]}
    loss, metrics = method.loss(model, batch)
    img = model.image_head.head(batch["image"])
    texts = [model.text_head(t) for t in batch["texts"]]
    assert loss.item() == pytest.approx(direct_sail_loss(img, texts, 20.0, -10.0).item(), rel=1e-5)
    assert metrics["logit_scale"].item() == pytest.approx(20.0)
    with torch.no_grad():
        model.logit.log_scale.fill_(9.0)
    method.after_step(model)
    assert model.logit.log_scale.item() == pytest.approx(math.log(100.0))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from align.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("sail") / "shapes"
    generate_shapes(out, 120, seed=2, progress=False)
    return out


@pytest.mark.slow
def test_short_run_learns_and_writes_a_loadable_artifact(shapes, tmp_path, capsys):
    from align.artifact import load_aligned
    from mllm_swap.cli import main

    out = tmp_path / "run"
    args = ["align", "sail", "--config", "recipes/tiny_sail.yaml", "--out", str(out),
            "--set", f"data.train={shapes}", "--set", "vision=tiny-dinov2-random",
            "--set", "data.captions=[caption,long_caption]", "--set", "text=tiny-text",
            "--set", "eval.drift_images=16", "--set", "train.steps=30", "--set", "train.batch_size=32", "--set", "train.lr=1e-3",
            "--set", "train.log_every=5", "--set", "train.save_every=20", "--set", "train.report_to=[jsonl]"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "zero-shot color: acc1" in printed and "per-patch drift" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "cache" / "text-sentence-1" / "manifest.json").is_file()  # extra positive captions
    enc = load_aligned(out / "artifact")
    config = json.loads((out / "artifact" / "aligned_encoder.json").read_text())
    assert config["method"] == "sail" and config["training"]["steps"] == 30
    assert set(config["metrics"]["zeroshot"]) == {"color", "shape"}
    assert 0 < config["metrics"]["patch_drift"]["mean_patch_cosine"] <= 1
    assert enc.token_rule.startswith("sail") and enc.num_tokens == 64 and enc.out_dim == 128
    again = load_aligned(out / "artifact")
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(enc(x), again(x))
    # a finished run is not trained over
    assert main(args) == 2 and "choose a new --out" in capsys.readouterr().err
    # prebuilt caches instead of data
    cached = ["align", "sail", "--config", "recipes/tiny_sail.yaml", "--out", str(tmp_path / "cached"),
              "--set", "vision=tiny-dinov2-random", "--set", f"data.image_cache={out / 'cache' / 'image-concat'}",
              "--set", f"data.text_caches=[{out / 'cache' / 'text-sentence-0'}]",
              "--set", "text=tiny-text", "--set", "train.steps=2", "--set", "train.batch_size=16",
              "--set", "train.report_to=[jsonl]"]  # fmt: skip
    assert main(cached) == 0
    assert (
        json.loads((tmp_path / "cached" / "artifact" / "aligned_encoder.json").read_text())["training"][
            "steps"
        ]
        == 2
    )


def test_non_dinov2_backbone_is_refused(shapes, tmp_path, capsys):
    from mllm_swap.cli import main

    args = ["align", "sail", "--config", "recipes/tiny_sail.yaml", "--out", str(tmp_path / "r"),
            "--set", f"data.train={shapes}", "--set", "vision=tiny-clip", "--set", "train.steps=1"]  # fmt: skip
    assert main(args) == 2
    assert "SAIL takes CLS and patch tokens of a DINOv2 backbone" in capsys.readouterr().err
