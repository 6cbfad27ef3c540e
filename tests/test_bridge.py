"""Bridge swaps: the token adapter trains on images only and resumes exactly; the bridged HF Llava reloads in a
process without this project, generates, and feeds its LLM inputs closer to the old model's than the untrained
rebuild does; a different token grid is resampled; `tune` accepts the bridged model and trains its adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.heads import build_token_head
from align.io import read_json
from align.train.config import TrainConfig
from mllm_swap.bridge import HEAD_FILE, TRAIN_DIR, BridgeMethod, BridgeSettings, bridge_swap
from mllm_swap.checkpoints import resolve_checkpoint
from mllm_swap.cli import main
from mllm_swap.swap import read_report, swap

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bridged(tmp_path_factory, shapes_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("bridge")
    settings = BridgeSettings(steps=40, batch_size=16, save_every=20)
    report = bridge_swap(
        "tiny-llava", "tiny-dinov2-random", root / "bridge", data=shapes_dir, settings=settings, vqa_limit=8,
        verbose=False,
    )  # fmt: skip
    swap("tiny-llava", "tiny-dinov2-random", root / "rebuild", mode="rebuild", num_images=1, verbose=False)
    return {"root": root, "report": report}


def test_bridged_model_reloads_without_the_project_and_beats_the_rebuild(
    bridged: dict, shapes_dir: Path, without_project: str
) -> None:
    root, report = bridged["root"], bridged["report"]
    drift = report.drift
    assert drift["cosine_after_adapter_training"] > drift["cosine_before_adapter_training"] + 0.3
    assert report.untrained == [] and report.bridge["train"]["steps"] == 40
    held = [
        str(shapes_dir / r["image"])
        for r in map(json.loads, (shapes_dir / "pairs.jsonl").read_text().splitlines())
        if r["split"] == "test"
    ]
    code = (
        without_project
        + f"""
import json, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
images = [Image.open(p).convert("RGB") for p in {held!r}]
def llm_inputs(path, **kw):
    model = AutoModelForImageTextToText.from_pretrained(path, **kw).eval()
    proc = AutoProcessor.from_pretrained(path, **kw)
    with torch.no_grad():
        feats = model.model.get_image_features(proc.image_processor(images=images, return_tensors="pt")["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    return model, proc, feats.reshape(len(images), -1, feats.shape[-1])
_, _, old = llm_inputs({str(resolve_checkpoint("tiny-llava"))!r})
_, _, rebuild = llm_inputs({str(root / "rebuild")!r})
model, proc, bridge = llm_inputs({str(root / "bridge")!r}, trust_remote_code=True)
cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
prompt = proc.apply_chat_template([{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What colour is the shape?"}}]}}], add_generation_prompt=True)
inputs = proc(text=[prompt], images=images[:1], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
print(json.dumps({{"bridge": cos(bridge, old), "rebuild": cos(rebuild, old), "tower": type(model.model.vision_tower).__name__,
                  "new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1])}}))
"""
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tower"] == "AlignedTower" and got["new_tokens"] >= 1
    assert got["bridge"] == pytest.approx(drift["llm_input_cosine"], abs=1e-4)  # the report measured this
    assert got["rebuild"] == pytest.approx(report.bridge["compare"]["rebuild"]["llm_input_cosine"], abs=1e-4)
    assert got["bridge"] > got["rebuild"] + 0.3
    saved = read_report(root / "bridge")
    assert saved["mode"] == "bridge" and set(saved["bridge"]["vqa_zero_tuning"]) >= {
        "bridge",
        "rebuild",
        "unswapped",
    }
    dropin = saved["bridge"]["compare"]["dropin"]  # DINOv2 into a CLIP tower: no drop-in
    assert dropin["available"] is False and dropin["reason"].startswith("dropin needs the same tower")
    text = (root / "bridge" / "swap_report.json").read_text()
    assert str(root) not in text and str(resolve_checkpoint("tiny-llava")) not in text  # the report travels


class _Interrupt(Exception):
    pass


def test_a_killed_bridge_swap_resumes_to_the_same_weights(
    shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = BridgeSettings(steps=4, batch_size=8, lr=1e-2, save_every=2)
    run = {"data": shapes_dir, "settings": settings, "compare": False, "verbose": False}
    bridge_swap("tiny-llava", "tiny-dinov2-random", tmp_path / "a", **run)
    calls = {"n": 0}
    loss = BridgeMethod.loss

    def interrupted(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3, after the step-2 checkpoint
            raise _Interrupt
        return loss(self, model, batch)

    monkeypatch.setattr(BridgeMethod, "loss", interrupted)
    with pytest.raises(_Interrupt):
        bridge_swap("tiny-llava", "tiny-dinov2-random", tmp_path / "b", **run)
    assert (tmp_path / "b" / TRAIN_DIR / "checkpoints/step-2").is_dir()
    assert not (tmp_path / "b" / "config.json").exists()  # nothing published
    bridge_swap("tiny-llava", "tiny-dinov2-random", tmp_path / "b", **run)  # the same command again
    result = read_json(tmp_path / "b" / TRAIN_DIR / "result.json")
    assert result["resumed_from"] == "./checkpoints/step-2" and result["steps"] == 4
    a, b = (load_file(tmp_path / run / TRAIN_DIR / HEAD_FILE) for run in ("a", "b"))
    assert a.keys() == b.keys() and a
    start = build_token_head(read_report(tmp_path / "a")["bridge"]["head"]).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    for key in a:
        assert torch.equal(a[key], b[key]), key
    tower = load_file(tmp_path / "b" / "model.safetensors")
    assert any(
        k.endswith("vision_tower.head.skip.weight") and torch.equal(v, b["skip.weight"])
        for k, v in tower.items()
    )


def dinov2_48(root: Path) -> Path:
    """A random DINOv2 at 48 px, patch 8: a 6x6 token grid where tiny-llava's CLIP feeds 8x8."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
                          image_size=48, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(root)
    size = {"height": 48, "width": 48}
    BitImageProcessor(size={"shortest_edge": 48}, crop_size=size, do_convert_rgb=True).save_pretrained(root)
    return root


def test_a_different_token_grid_is_resampled(shapes_dir: Path, tmp_path: Path) -> None:
    from mllm_swap.checkpoints import load_mllm

    enc = dinov2_48(tmp_path / "dinov2-48")
    report = bridge_swap("tiny-llava", str(enc), tmp_path / "out", data=shapes_dir, compare=False, verbose=False,
                         settings=BridgeSettings(steps=3, batch_size=8))  # fmt: skip
    assert report.new_tower["image_tokens"] == 64 and report.new_tower["image_size"] == 48
    loaded = load_mllm(tmp_path / "out")
    assert loaded.model.config.vision_config.head_config["out_grid"] == 8
    image = read_json(tmp_path / "out" / "processor_config.json")
    assert image["image_processor"]["crop_size"] == {"height": 48, "width": 48}
    family = loaded.family
    from mllm_swap.swap import sample_images

    tokens = family.consumed_tokens(loaded, sample_images(2, size=48))
    assert tokens.shape == (2, 64, 64)
    assert family.generate(loaded, sample_images(1, size=48)[0], "What colour is the shape?") is not None


def test_tune_accepts_the_bridged_model_and_trains_its_adapter(
    bridged: dict, shapes_dir: Path, tmp_path: Path
) -> None:
    from mllm_swap.checkpoints import load_mllm
    from mllm_swap.tune.config import TuneConfig
    from mllm_swap.tune.model import NON_LORA_FILE
    from mllm_swap.tune.stage import run_tune

    model = bridged["root"] / "bridge"
    cfg = TuneConfig(
        model=str(model), data=shapes_dir / "instruct.json", image_folder=shapes_dir, stage="connector",
        unfreeze_head=True, max_length=256,
        train=TrainConfig(steps=2, batch_size=4, lr=1e-3, report_to=["jsonl"], save_every=0),
    )  # fmt: skip
    run_tune(cfg, tmp_path / "tuned")
    trained = load_file(tmp_path / "tuned" / NON_LORA_FILE)
    before = load_mllm(model).model.state_dict()
    heads = [k for k in trained if ".vision_tower.head." in k]
    assert heads and any(k.endswith("multi_modal_projector.linear_1.weight") for k in trained)
    assert any(not torch.equal(trained[k], before[k]) for k in heads)


def test_token_bridge_resamples_by_bilinear_block_means() -> None:
    head = build_token_head({"kind": "bridge", "in_dim": 3, "out_dim": 5, "hidden_dim": 4, "out_grid": 4})
    tokens = torch.randn(2, 1 + 64, 3)
    grid = tokens[:, 1:].reshape(2, 8, 8, 3)
    blocks = grid.reshape(2, 4, 2, 4, 2, 3).mean(dim=(2, 4)).reshape(2, 16, 3)  # 2x2 means: bilinear at x0.5
    assert torch.allclose(head.resample(tokens[:, 1:]), blocks, atol=1e-6)
    assert head(tokens, num_prefix_tokens=1).shape == (2, 16, 5)


def test_bridge_refuses_other_families(tmp_path: Path, capsys) -> None:
    argv = ["swap", "--mode", "bridge", "--mllm", "tiny-llava-original", "--encoder", "tiny-clip", "--out",
            str(tmp_path / "o"), "--steps", "1"]  # fmt: skip
    assert main(argv) == 2
    assert "supported for HF Llava checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "o" / TRAIN_DIR).exists()


def test_an_image_folder_is_split_into_training_and_held_out_images(shapes_dir: Path) -> None:
    from mllm_swap.bridge import bridge_images

    train, held, vqa = bridge_images(None, shapes_dir / "images", BridgeSettings(held_out=0.25))
    names = sorted(p.name for p in (shapes_dir / "images").iterdir())
    assert [Path(str(r)).name for r in train + held] == names and len(held) == round(len(names) * 0.25)
    assert vqa is None
    with pytest.raises(ValueError, match="not both"):
        bridge_images(shapes_dir, shapes_dir / "images", BridgeSettings())
