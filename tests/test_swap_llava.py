"""Swaps into HF Llava: drop-in keeps a plain-transformers checkpoint (identical logits for the identical
tower), rebuild installs the new tower and an untrained connector input layer, and image-token accounting
matches what the tower really feeds for CLIP (CLS), DINOv2-with-registers (CLS + 4), SigLIP (none) and
aligned towers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from align.load import load_vision_encoder
from mllm_swap.cli import main
from mllm_swap.fixtures import ensure_tiny_mllm
from mllm_swap.swap import read_report, sample_images, swap

PROMPT = "What colour is the shape?"


def run_python(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (``env`` added to the environment); its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def perturbed_clip(scale: float = 0.02):
    """tiny-clip with every vision weight moved by ``scale`` of its own std (a slightly re-aligned CLIP)."""
    enc = load_vision_encoder("tiny-clip")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in enc.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1.0))
    enc.source = "tiny-clip-perturbed"
    return enc


def sail_artifact(root):
    from align.artifact import AlignedEncoder, save_aligned
    from align.heads import build_token_head

    backbone = load_vision_encoder("tiny-dinov2-random")
    torch.manual_seed(0)
    head = build_token_head({"kind": "sail_glu", "in_dim": 96, "out_dim": 48, "num_prefix_tokens": 1})
    return save_aligned(
        root / "sail-artifact", AlignedEncoder(backbone, "tiny-text", head, None, method="sail")
    )


@pytest.fixture(scope="module")
def swapped(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("llava-swaps")
    jobs = {
        "clip": ("tiny-clip", {}),
        "near": (perturbed_clip(), {"mode": "dropin"}),
        "dinov2": ("tiny-dinov2-random", {}),
        "siglip": ("tiny-siglip", {}),
        "reg": ("tiny-dinov2-reg-random", {}),
        "reg_keep": ("tiny-dinov2-reg-random", {"prefix": "keep"}),
        "sail": (str(sail_artifact(root)), {}),
    }
    return {
        name: (root / name, swap("tiny-llava", enc, root / name, num_images=2, verbose=False, **kw))
        for name, (enc, kw) in jobs.items()
    }


EXPECTED_TOKENS = {"clip": 64, "near": 64, "dinov2": 64, "siglip": 64, "reg": 64, "reg_keep": 69, "sail": 64}
EXPECTED_STRATEGY = {
    "clip": "default",
    "dinov2": "default",
    "siglip": "full",
    "reg": "full",
    "reg_keep": "full",
    "sail": "full",
}


@pytest.mark.slow
def test_dropin_identity_reloads_with_plain_transformers(swapped) -> None:
    """No mllm_swap import: drop-in (and plain-HF rebuilds) load with transformers alone and generate."""
    base = ensure_tiny_mllm("tiny-llava")
    image = swapped["clip"][0] / "probe.png"
    sample_images(1)[0].save(image)
    dirs = {k: str(swapped[k][0]) for k in ("clip", "dinov2", "siglip", "reg_keep")}
    code = f"""
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
image = Image.open({str(image)!r}).convert("RGB")
msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {PROMPT!r}}}]}}]
def run(path):
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    inputs = proc(images=image, text=proc.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return logits, out.shape[1] - inputs["input_ids"].shape[1], type(model.model.vision_tower).__name__
base, _, _ = run({str(base)!r})
res = {{}}
for name, path in {dirs!r}.items():
    logits, new, tower = run(path)
    res[name] = {{"new_tokens": new, "tower": tower, "max_diff": float((logits - base).abs().max()) if logits.shape == base.shape else None}}
res["imported"] = sorted(m for m in ("mllm_swap", "align") if m in sys.modules)
print(json.dumps(res))
"""
    res = run_python(code)
    assert res["imported"] == []
    assert res["clip"]["max_diff"] == 0.0  # identical tower -> identical logits, exactly
    assert {res[k]["tower"] for k in dirs} == {
        "CLIPVisionModel",
        "Dinov2Model",
        "SiglipVisionModel",
        "Dinov2WithRegistersModel",
    }
    assert all(res[k]["new_tokens"] == 4 for k in dirs)


@pytest.mark.slow
def test_aligned_towers_reload_after_import_and_generate(swapped) -> None:
    """With ``import mllm_swap`` the package's classes load aligned rebuilds: no remote code runs."""
    dirs = {k: str(swapped[k][0]) for k in ("reg", "sail")}
    code = f"""
import json, sys, torch
import mllm_swap  # registers the aligned tower with the Auto classes
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
res = {{}}
for name, path in {dirs!r}.items():
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What shape?"}}]}}]
    inputs = proc(images=Image.new("RGB", (64, 64), "red"), text=proc.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    tower = type(model.model.vision_tower)
    res[name] = [f"{{tower.__module__}}.{{tower.__name__}}", out.shape[1] - inputs["input_ids"].shape[1]]
res["remote_code"] = sorted(m for m in sys.modules if m.startswith("transformers_modules"))
print(json.dumps(res))
"""
    tower = "align.modeling_aligned_tower.AlignedTower"
    assert run_python(code) == {"reg": [tower, 3], "sail": [tower, 3], "remote_code": []}


@pytest.mark.slow
@torch.no_grad()
def test_aligned_rebuilds_load_without_the_package(swapped, tmp_path, without_project) -> None:
    """Remote code: SAIL and register-dropping rebuilds (and a tower saved alone, as the original-LLaVA family
    writes it) load and generate where align/mllm_swap cannot be imported, with trust_remote_code=True, and
    give the logits of the package's own classes; without trust_remote_code they are refused."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mllm_swap.towers import add_remote_code

    image = tmp_path / "probe.png"
    sample_images(1)[0].save(image)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    dirs, expected = {}, {}
    for name in ("sail", "reg"):
        path = swapped[name][0]
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        assert type(model.model.vision_tower).__module__ == "align.modeling_aligned_tower"
        proc = AutoProcessor.from_pretrained(path)
        text = proc.apply_chat_template(messages, add_generation_prompt=True)
        inputs = proc(images=sample_images(1)[0], text=text, return_tensors="pt")
        dirs[name], expected[name] = str(path), model(**inputs).logits
        if name == "sail":
            tower_dir = tmp_path / "tower"
            model.model.vision_tower.save_pretrained(tower_dir)
            assert add_remote_code(tower_dir) == ["modeling_aligned_tower.py", "heads.py"]
            expected["tower"] = model.model.vision_tower(inputs["pixel_values"]).last_hidden_state
    code = (
        without_project
        + f"""
import json, torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
image = Image.open({str(image)!r}).convert("RGB")
msgs = {messages!r}
res = {{}}
with torch.no_grad():
    for name, path in {dirs!r}.items():
        try:
            AutoConfig.from_pretrained(path)
            refused = None
        except ValueError as err:
            refused = str(err)
        proc = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        inputs = proc(images=image, text=proc.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
        torch.save(model(**inputs).logits, {str(tmp_path)!r} + f"/{{name}}.pt")
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        res[name] = {{"new_tokens": out.shape[1] - inputs["input_ids"].shape[1], "refused": refused,
                     "tower": type(model.model.vision_tower).__module__.split(".")[0]}}
        if name == "sail":
            tower = AutoModel.from_pretrained({str(tower_dir)!r}, trust_remote_code=True).eval()
            torch.save(tower(inputs["pixel_values"]).last_hidden_state, {str(tmp_path)!r} + "/tower.pt")
res["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("align", "mllm_swap"))
print(json.dumps(res))
"""
    )
    res = run_python(code, HF_HOME=str(tmp_path / "hf"))
    assert res.pop("project_modules") == []  # 'mllm_swap' not in sys.modules there
    for name in ("sail", "reg"):
        assert res[name]["tower"] == "transformers_modules" and res[name]["new_tokens"] == 4
        assert "mllm_swap_aligned_tower" in res[name]["refused"]
    for name, want in expected.items():
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert torch.allclose(got, want, rtol=0, atol=1e-5), (name, float((got - want).abs().max()))


def test_swapping_an_aligned_tower_out_drops_its_remote_code(swapped, tmp_path) -> None:
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    out = tmp_path / "back-to-clip"
    swap(swapped["sail"][0], "tiny-clip", out, num_images=1, verbose=False)
    assert "auto_map" in json.loads((swapped["sail"][0] / "config.json").read_text())
    assert "auto_map" not in json.loads((out / "config.json").read_text()) and not list(out.glob("*.py"))
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert type(model) is LlavaForConditionalGeneration


@pytest.mark.parametrize("name", sorted(EXPECTED_TOKENS))
@torch.no_grad()
def test_image_token_accounting(swapped, name) -> None:
    """Processor expansion == report == tokens the tower actually feeds; the model runs without mismatch."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import mllm_swap.towers  # noqa: F401

    path, report = swapped[name]
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True,
    )
    inputs = proc(images=sample_images(1)[0], text=text, return_tensors="pt")
    expanded = int((inputs["input_ids"] == model.config.image_token_id).sum())
    feats = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    assert expanded == feats.shape[0] == report.new_tower["image_tokens"] == EXPECTED_TOKENS[name]
    assert model.config.image_seq_length == EXPECTED_TOKENS[name]
    if name in EXPECTED_STRATEGY:
        assert model.config.vision_feature_select_strategy == EXPECTED_STRATEGY[name]
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


@torch.no_grad()
def test_image_size_not_a_multiple_of_the_patch_size(tmp_path) -> None:
    """SigLIP-so400m's case (384 px, patch 14: its conv floors to 27x27 = 729 tokens) at tiny size: 68 px,
    patch 8 -> 8x8 = 64 patches; the processor's expansion, the report and the tower's features agree."""
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    import mllm_swap.towers  # noqa: F401
    from align.embedded import tiny_model_dir

    config = SiglipVisionConfig.from_pretrained(tiny_model_dir("tiny-siglip"))
    config.image_size = 68
    encoder_dir = tmp_path / "siglip-68"
    torch.manual_seed(0)
    SiglipVisionModel(config).save_pretrained(encoder_dir)
    SiglipImageProcessor(size={"height": 68, "width": 68}).save_pretrained(encoder_dir)
    report = swap("tiny-llava", str(encoder_dir), tmp_path / "out", mode="rebuild", num_images=1, verbose=False)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    proc = AutoProcessor.from_pretrained(tmp_path / "out")
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True,
    )
    inputs = proc(images=sample_images(1, size=68)[0], text=text, return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == 68
    expanded = int((inputs["input_ids"] == model.config.image_token_id).sum())
    feats = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    assert expanded == feats.shape[0] == report.new_tower["image_tokens"] == (68 // 8) ** 2
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_rebuild_reports_untrained_connector(swapped) -> None:
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(ensure_tiny_mllm("tiny-llava"))
    for name, width in (("dinov2", 96), ("siglip", 64), ("sail", 48)):
        path, report = swapped[name]
        assert report.mode == "rebuild" and report.untrained == ["model.multi_modal_projector.linear_1"]
        saved = read_report(path)
        assert saved["untrained"] == report.untrained and saved["new_tower"]["width"] == width
        model = AutoModelForImageTextToText.from_pretrained(path)
        assert model.model.multi_modal_projector.linear_1.in_features == width
        assert torch.equal(
            model.model.multi_modal_projector.linear_2.weight,
            base.model.multi_modal_projector.linear_2.weight,
        )
        assert torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert swapped["sail"][1].new_tower["select_layer"] == -1  # the layer the head was trained on
    assert swapped["dinov2"][1].new_tower["select_layer"] == -2


def test_dropin_reports_drift(swapped) -> None:
    same, near = swapped["clip"][1].drift, swapped["near"][1].drift
    assert same["cosine_mean"] == pytest.approx(1.0, abs=1e-6) and same["next_token_kl"] == pytest.approx(
        0.0, abs=1e-9
    )
    assert 0.9 < near["cosine_mean"] < 0.99999
    assert 0.0 < near["next_token_kl"] < 0.5 and 0.0 < near["next_token_max_abs"] < 0.5
    assert swapped["near"][1].untrained == [] and swapped["near"][1].mode == "dropin"
    assert swapped["dinov2"][1].drift["cosine_mean"] is None and "linear_cka" in swapped["dinov2"][1].drift


def test_reported_next_token_kl_is_torchs_kl_div(swapped) -> None:
    """KL(old || new) of the next-token distribution, recomputed from the two checkpoints on disk with
    plain transformers and ``F.kl_div``; the reverse KL (nearly equal for a small change) must not pass."""
    import torch.nn.functional as F
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, report = swapped["near"]
    image = sample_images(2, size=report.old_tower["image_size"])[0]
    logprobs = []
    for path in (ensure_tiny_mllm("tiny-llava"), out):
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        proc = AutoProcessor.from_pretrained(path)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": report.drift["prompt"]}]}
        ]
        text = proc.apply_chat_template(messages, add_generation_prompt=True)
        with torch.no_grad():
            logits = model(**proc(images=image, text=text, return_tensors="pt")).logits[0, -1]
        logprobs.append(torch.log_softmax(logits.double(), dim=-1))
    old, new = logprobs
    kl = F.kl_div(new, old, reduction="sum", log_target=True).item()
    reverse = F.kl_div(old, new, reduction="sum", log_target=True).item()
    assert kl > 1e-6 and abs(kl - reverse) > 1e-5 * kl
    assert report.drift["next_token_kl"] == pytest.approx(kl, rel=1e-7, abs=0)  # same weights, same ops
    assert report.drift["next_token_max_abs"] == pytest.approx(
        float((old.exp() - new.exp()).abs().max()), rel=1e-5
    )


def test_swap_errors(tmp_path, swapped) -> None:
    with pytest.raises(ValueError, match=r"width 64 vs 96"):
        swap("tiny-llava", "tiny-dinov2-random", tmp_path / "a", mode="dropin", verbose=False)
    with pytest.raises(ValueError, match=r"image tokens 64 vs 69"):
        swap("tiny-llava", "tiny-dinov2-reg-random", tmp_path / "a", mode="dropin", prefix="keep", verbose=False)
    with pytest.raises(ValueError, match="holds a finished run of `mllm-swap swap`.*--overwrite"):
        swap("tiny-llava", "tiny-clip", swapped["clip"][0], verbose=False)
    with pytest.raises(ValueError, match="mode 'swap'"):
        swap("tiny-llava", "tiny-clip", tmp_path / "b", mode="swap", verbose=False)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unknown MLLM family"):
        swap(tmp_path / "odd", "tiny-clip", tmp_path / "d", verbose=False)
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        swap(tmp_path / "odd", "tiny-clip", tmp_path / "e", verbose=False)


def test_openclip_encoder_drops_in_as_hf_clip(tmp_path) -> None:
    """tiny-openclip has tiny-clip's architecture: converted to an HF CLIPVisionModel it is a drop-in."""
    report = swap("tiny-llava", "tiny-openclip", tmp_path / "oc", num_images=2, verbose=False)
    assert report.mode == "dropin" and report.new_tower["kind"] == "hf"
    assert any("converted to an HF CLIPVisionModel" in n for n in report.notes)


def test_cli_swap(tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    assert (
        main(["swap", "--mllm", "tiny-llava", "--encoder", "tiny-siglip", "--out", str(out), "--images", "2"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "mode: rebuild" in printed and "untrained" in printed
    assert read_report(out)["new_tower"]["model_type"] == "siglip_vision_model"
    assert (
        main(
            [
                "swap",
                "--mllm",
                "tiny-llava",
                "--encoder",
                "tiny-dinov2-random",
                "--out",
                str(tmp_path / "x"),
                "--mode",
                "dropin",
            ]
        )
        == 2
    )
    assert "needs the same tower" in capsys.readouterr().err


def tiny_llava_next(out) -> None:
    """A LLaVA-NeXT checkpoint built from tiny-llava's parts (anyres grid of 64x64 crops)."""
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    src = ensure_tiny_mllm("tiny-llava")
    base, proc = AutoModelForImageTextToText.from_pretrained(src), AutoProcessor.from_pretrained(src)
    grid = [[64, 64], [64, 128], [128, 64]]
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=base.config.vision_config, text_config=base.config.text_config,
        image_token_index=base.config.image_token_index, image_grid_pinpoints=grid, image_seq_length=64,
    )  # fmt: skip
    model = LlavaNextForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(base.model.vision_tower.state_dict())
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, image_grid_pinpoints=grid,
        image_mean=proc.image_processor.image_mean, image_std=proc.image_processor.image_std,
    )  # fmt: skip
    model.save_pretrained(out)
    LlavaNextProcessor(
        image_processor=image_processor, tokenizer=proc.tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=proc.chat_template,
    ).save_pretrained(out)  # fmt: skip


@torch.no_grad()
def test_llava_next_dropin_only(tmp_path) -> None:
    """Drop-in into LLaVA-NeXT: the reloaded checkpoint is the original NeXT with exactly the new CLIP's
    vision weights put in by hand (every tower weight replaced, everything else untouched), so its logits
    and greedy tokens on an anyres image equal that hand-built model's; a different tower is refused."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    tiny_llava_next(tmp_path / "next")
    new_clip = perturbed_clip()
    report = swap(tmp_path / "next", new_clip, tmp_path / "out", num_images=2, verbose=False)
    assert report.mode == "dropin" and 0.0 < report.drift["next_token_kl"] < 0.5
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    expected = AutoModelForImageTextToText.from_pretrained(tmp_path / "next").eval()
    clip_state = {k.removeprefix("vision_model."): v for k, v in new_clip.model.state_dict().items()}
    tower_state = {k: v.clone() for k, v in expected.model.vision_tower.state_dict().items()}
    assert tower_state.keys() <= clip_state.keys()
    expected.model.vision_tower.load_state_dict({k: clip_state[k] for k in tower_state})
    swapped_state, want = model.state_dict(), expected.state_dict()
    assert swapped_state.keys() == want.keys()
    assert [k for k in want if not torch.equal(swapped_state[k], want[k])] == []
    assert any(not torch.equal(tower_state[k], clip_state[k]) for k in tower_state)  # the tower did change
    proc = AutoProcessor.from_pretrained(tmp_path / "out")
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True,
    )
    image = sample_images(1, size=96)[0].resize((128, 64))  # a wide image: a 64x128 anyres grid
    inputs = proc(images=image, text=text, return_tensors="pt")
    assert inputs["pixel_values"].shape[1] == 3  # base view + two crops
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected(**inputs).logits, rtol=0, atol=0)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(out, expected.generate(**inputs, max_new_tokens=3, do_sample=False))
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    with pytest.raises(ValueError, match="LLaVA-NeXT supports drop-in only"):
        swap(tmp_path / "next", "tiny-siglip", tmp_path / "x", verbose=False)


def test_a_dropin_records_its_tower_for_the_next_swap(swapped, tmp_path) -> None:
    first = swapped["near"][0]
    report = swap(str(first), "tiny-clip", tmp_path / "again", mode="dropin", verbose=False)
    assert report.old_tower["source"] == "tiny-clip-perturbed"


def test_a_corrupt_swapped_checkpoint_is_named_before_tuning(tmp_path, swapped, capsys) -> None:
    import shutil

    copy = tmp_path / "swapped"
    shutil.copytree(swapped["clip"][0], copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size
    weights.write_bytes(bytes(data))
    argv = ["merge", "--adapter", str(tmp_path / "none"), "--base", str(copy), "--out", str(tmp_path / "m")]
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "non_lora_trainables.safetensors").write_bytes(b"")
    from mllm_swap.checkpoints import resolve_checkpoint

    with pytest.raises(ValueError, match=f"{weights}: model checkpoint file is corrupt: expected sha256"):
        resolve_checkpoint(copy)
    assert main(argv) == 2 and "model checkpoint file is corrupt" in capsys.readouterr().err
