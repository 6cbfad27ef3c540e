"""Fused towers (``swap --mode fuse --encoder A+B``): the sum rule for tokens and width against each encoder's
own tokens, one processor deriving both towers' inputs from one image, reload and generate in a process
without this project, and bad specs refused naming the part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from align.load import load_vision_encoder
from mllm_swap.cli import main
from mllm_swap.fuse import fused_tower
from mllm_swap.swap import read_report, sample_images, swap

pytestmark = pytest.mark.usefixtures("one_thread")
SIG32 = dict(width=48, layers=3, size=32)  # a second tower at half the resolution: a 4x4 grid


@pytest.fixture(scope="module")
def sig32(tmp_path_factory) -> Path:
    """A random SigLIP tower at 32 px (patch 8, width 48, 3 layers) with its own processor."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    out = tmp_path_factory.mktemp("sig32") / "sig32"
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=SIG32["width"], intermediate_size=96, num_hidden_layers=SIG32["layers"],
        num_attention_heads=4, image_size=SIG32["size"], patch_size=8,
    )  # fmt: skip
    SiglipVisionModel(config).save_pretrained(out)
    size = {"height": SIG32["size"], "width": SIG32["size"]}
    SiglipImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def fused(tmp_path_factory, sig32: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fuse") / "clip+sig32"
    report = swap("tiny-llava", f"tiny-clip+{sig32}", out, mode="fuse", num_images=2, verbose=False)
    return out, report.to_dict()


def own_tokens(spec: str | Path, images: list, layer: int = -2) -> torch.Tensor:
    """An encoder's patch tokens at ``layer`` from its own processor (prefix tokens dropped)."""
    from transformers import AutoImageProcessor

    enc = load_vision_encoder(spec).eval()
    pixels = AutoImageProcessor.from_pretrained(enc.model.name_or_path)(images=images, return_tensors="pt")
    with torch.no_grad():
        return enc(pixels["pixel_values"], layer=layer)[:, enc.num_prefix_tokens :]


def upsample(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """``[B, g*g, D]`` tokens bilinearly on a ``side x side`` grid (written out here, independently)."""
    g = int(round(tokens.shape[1] ** 0.5))
    grid = tokens.reshape(tokens.shape[0], g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(tokens.shape[0], side * side, -1)


@torch.no_grad()
def test_same_grid_towers_fuse_to_each_encoders_own_tokens(tmp_path) -> None:
    """DINOv2-with-registers (5 prefix tokens) + SigLIP (none), both 64 px: the fused tower's layer -2 tokens are
    exactly [its own patch tokens ; SigLIP's], each from its own processor: 64 tokens of width 96 + 64."""
    images = sample_images(3, size=64)
    specs = ("tiny-dinov2-reg-random", "tiny-siglip")
    tower = fused_tower([load_vision_encoder(s) for s in specs], tmp_path)
    assert (tower.num_tokens, tower.width) == (64, 96 + 64)
    assert [p["prefix_tokens_dropped"] for p in tower.parts] == [5, 0]
    module = tower.module()
    pixels = tower.image_processor(images=images, return_tensors="pt")["pixel_values"]
    got = module(pixels, output_hidden_states=-2).hidden_states[-2]
    want = torch.cat([own_tokens(s, images) for s in specs], dim=-1)
    assert got.shape == want.shape == (3, 64, 160)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


@torch.no_grad()
def test_fused_llava_feeds_the_sum_rule_and_resamples_the_coarser_grid(fused, sig32: Path) -> None:
    """CLIP (64 px, 8x8, width 64) + SigLIP (32 px, 4x4, width 48): the Llava consumes 64 tokens of width 112;
    CLIP's channels are its own tokens, SigLIP's are its own tokens upsampled to 8x8 (its input derived from
    the 64 px image, so close but not bit-equal to its own 32 px processor's)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, report = fused
    new = report["new_tower"]
    assert (report["mode"], new["width"], new["image_tokens"]) == ("fuse", 64 + 48, 8 * 8)
    assert [(p["grid"], p["resampled_to"]) for p in new["parts"]] == [(8, None), (4, 8)]
    assert report["untrained"] == ["model.multi_modal_projector.linear_1"]
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    proc = AutoProcessor.from_pretrained(out)
    assert model.model.multi_modal_projector.linear_1.in_features == 112
    images = sample_images(3, size=64)
    pixels = proc.image_processor(images=images, return_tensors="pt")["pixel_values"]
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    got = tower(pixels, output_hidden_states=layer).hidden_states[layer]
    assert got.shape == (3, 64, 112)
    assert torch.allclose(got[..., :64], own_tokens("tiny-clip", images), atol=1e-5)
    sig = upsample(own_tokens(sig32, images), 8)
    cos = F.cosine_similarity(got[..., 64:], sig, dim=-1)
    assert cos.min() > 0.99, float(cos.min())
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}],
        add_generation_prompt=True,
    )
    inputs = proc(images=images[0], text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64


@torch.no_grad()
def test_one_processor_gives_each_tower_its_own_input(fused, sig32: Path) -> None:
    """The checkpoint's processor emits [0, 1] pixels at 64 px; the tower derives each tower's input: CLIP's
    equals CLIP's own processor's output, SigLIP's (resized to 32 px inside) is within interpolation error of
    SigLIP's own processor's, far below the gap between the two towers' normalisations."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

    out, _ = fused
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    images = sample_images(3, size=64)
    pixels = AutoProcessor.from_pretrained(out).image_processor(images=images, return_tensors="pt")[
        "pixel_values"
    ]
    assert float(pixels.min()) >= 0 and float(pixels.max()) <= 1
    clip_in, sig_in = model.model.vision_tower.part_pixels(pixels)
    own = [AutoImageProcessor.from_pretrained(p)(images=images, return_tensors="pt")["pixel_values"]
           for p in (load_vision_encoder("tiny-clip").model.name_or_path, sig32)]  # fmt: skip
    assert clip_in.shape == own[0].shape and torch.allclose(clip_in, own[0], atol=1e-5)
    assert sig_in.shape == own[1].shape == (3, 3, 32, 32)
    err = float((sig_in - own[1]).abs().mean())
    other_norm = float((sig_in - (own[1] * 0.5 + 0.5 - 0.48) / 0.27).abs().mean())  # CLIP's mean/std instead
    assert err < 0.05 < other_norm, (err, other_norm)


MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}
]


def reload_without_project(out: Path, tmp_path: Path, without_project: str) -> dict:
    """Load ``out`` with plain transformers (trust_remote_code=True) in a fresh process that cannot import
    align/mllm_swap, generate 4 tokens; its logits must equal this process's. Returns what it saw."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    image = tmp_path / "probe.png"
    sample_images(1)[0].save(image)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    proc = AutoProcessor.from_pretrained(out)
    inputs = proc(images=sample_images(1)[0], text=proc.apply_chat_template(MESSAGES, add_generation_prompt=True),
                  return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        want = model(**inputs).logits
    code = (
        without_project
        + f"""
import json, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
proc = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
inputs = proc(images=Image.open({str(image)!r}).convert("RGB"),
              text=proc.apply_chat_template({MESSAGES!r}, add_generation_prompt=True), return_tensors="pt")
with torch.no_grad():
    torch.save(model(**inputs).logits, {str(tmp_path / "logits.pt")!r})
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
print(json.dumps({{"tower": type(model.model.vision_tower).__name__, "new": gen.shape[1] - inputs["input_ids"].shape[1],
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("align", "mllm_swap"))}}))
"""
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc_ = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**__import__("os").environ, **env})  # fmt: skip
    assert proc_.returncode == 0, proc_.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.allclose(logits, want, atol=1e-5)
    return json.loads(proc_.stdout.strip().splitlines()[-1])


def test_fused_llava_loads_and_generates_without_the_project(fused, sig32, tmp_path, without_project) -> None:
    """A fresh process that cannot import align/mllm_swap loads the checkpoint with plain transformers
    (trust_remote_code=True), gets the same logits, and generates."""
    out, _ = fused
    got = reload_without_project(out, tmp_path, without_project)
    assert got == {"tower": "FusedTower", "new": 4, "modules": []}
    text = (out / "swap_report.json").read_text() + (out / "config.json").read_text()
    assert str(out.parent) not in text  # the checkpoint travels
    source = read_report(out)["new_tower"]["parts"][1]["source"]  # relative to the checkpoint
    assert not Path(source).is_absolute() and (out / source).resolve() == Path(sig32).resolve()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--mode", "fuse", "--encoder", "tiny-clip"], "two encoders joined by '+'"),
        (["--mode", "fuse", "--encoder", "tiny-clip+"], "found 2 part(s) with an empty one"),
        (["--mode", "fuse", "--encoder", "tiny-clip+tiny-siglip+tiny-clip"], "found 3 part(s)"),
        (["--mode", "fuse", "--encoder", "tiny-clip+no-such-encoder"], "part 2 ('no-such-encoder') does not load"),
        (["--mode", "bridge", "--encoder", "tiny-clip+no-such-encoder"], "part 2 ('no-such-encoder') does not load"),
        (["--mode", "rebuild", "--encoder", "tiny-clip+tiny-siglip"], "are fused by --mode fuse"),
        (["--mode", "fuse", "--prefix", "keep", "--encoder", "tiny-clip+tiny-siglip"], "every prefix token is dropped"),
        (["--mode", "fuse", "--mllm", "tiny-llava-original", "--encoder", "tiny-clip+tiny-siglip"],
         "supported for HF Llava checkpoints"),
    ],
)  # fmt: skip
def test_bad_fuse_specs_fail_naming_the_part(args, expected, tmp_path, capsys) -> None:
    mllm = [] if "--mllm" in args else ["--mllm", "tiny-llava"]
    code = main(["swap", *mllm, *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert not (tmp_path / "out" / "config.json").exists()


def test_connector_tuning_trains_the_new_input_layer_of_the_fused_model(
    fused, shapes_dir: Path, tmp_path
) -> None:
    """`tune --stage connector` runs on the fused checkpoint: linear_1 (112 -> LLM width) moves, the towers stay."""
    from safetensors.torch import load_file

    from align.train.config import TrainConfig
    from mllm_swap.checkpoints import load_mllm
    from mllm_swap.tune.config import TuneConfig
    from mllm_swap.tune.model import NON_LORA_FILE
    from mllm_swap.tune.stage import run_tune

    out, _ = fused
    cfg = TuneConfig(
        model=str(out), data=shapes_dir / "instruct.json", image_folder=shapes_dir, stage="connector",
        max_length=256, train=TrainConfig(steps=2, batch_size=4, lr=1e-3, report_to=["jsonl"], save_every=0),
    )  # fmt: skip
    run_tune(cfg, tmp_path / "tuned")
    trained = load_file(tmp_path / "tuned" / NON_LORA_FILE)
    before = load_mllm(out).model.state_dict()
    (key,) = [k for k in trained if k.endswith("multi_modal_projector.linear_1.weight")]
    assert trained[key].shape[1] == 112 and not torch.equal(trained[key], before[key])
    assert not [k for k in trained if ".vision_tower." in k]


def test_a_fused_tower_with_a_bridge_keeps_the_connector_and_reloads(
    sig32: Path, shapes_dir: Path, tmp_path: Path, without_project: str
) -> None:
    """``swap --mode bridge --encoder A+B``: the adapter is trained on the fused tokens (width 64 + 48, 8x8) onto
    tiny-llava's CLIP tokens (width 64); the old connector is kept; the tower's tokens are the trained head
    applied to the plain fused tower's tokens (built here apart); it reloads without this project and generates."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from align.heads import build_token_head
    from mllm_swap.bridge import HEAD_FILE, TRAIN_DIR
    from mllm_swap.checkpoints import load_mllm

    out = tmp_path / "bridged"
    args = ["swap", "--mllm", "tiny-llava", "--encoder", f"tiny-clip+{sig32}", "--mode", "bridge", "--data",
            str(shapes_dir), "--steps", "20", "--batch-size", "8", "--lr", "1e-2", "--vqa-limit", "0", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = read_report(out)
    new, head = report["new_tower"], report["bridge"]["head"]
    assert (report["mode"], new["kind"], new["width"], new["image_tokens"]) == ("bridge", "fused", 64, 64)
    assert [p["grid"] for p in new["parts"]] == [8, 4] and (head["in_dim"], head["out_dim"]) == (64 + 48, 64)
    assert report["untrained"] == []
    drift = report["drift"]
    assert drift["cosine_after_adapter_training"] > drift["cosine_before_adapter_training"] + 0.2, drift
    # what the adapter trained on (its held-out cosine) is what the installed tower feeds at the consumed layer
    trained = report["bridge"]["train"]["eval"]["held_out_cosine"]
    assert drift["cosine_after_adapter_training"] == pytest.approx(trained, abs=1e-4)
    compare = report["bridge"]["compare"]
    assert compare["rebuild"]["available"] and not compare["dropin"]["available"]  # the fuse rebuild beside it
    original, bridged = load_mllm("tiny-llava").model.state_dict(), load_mllm(out).model.state_dict()
    connector = [k for k in original if ".multi_modal_projector." in k]
    assert connector and all(torch.equal(original[k], bridged[k]) for k in connector)  # kept unchanged

    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    pixels = AutoProcessor.from_pretrained(out).image_processor(images=sample_images(3), return_tensors="pt")
    layer = model.config.vision_feature_layer
    with torch.no_grad():
        got = model.model.vision_tower(pixels["pixel_values"], output_hidden_states=layer).hidden_states[layer]
        plain = fused_tower([load_vision_encoder("tiny-clip"), load_vision_encoder(sig32)], tmp_path).module()
        fused_tokens = plain(pixels["pixel_values"], output_hidden_states=layer).hidden_states[layer]
        adapter = build_token_head(head)
        adapter.load_state_dict(load_file(out / TRAIN_DIR / HEAD_FILE))
        want = adapter(fused_tokens, num_prefix_tokens=0)
    assert got.shape == (3, 64, 64) and torch.allclose(got, want, atol=1e-5)
    assert reload_without_project(out, tmp_path, without_project) == {"tower": "FusedTower", "new": 4, "modules": []}
