"""Artifacts and exports travel: copied to another directory after the models they were made from are gone
(or moved along with them), they load and give the same outputs; the open_clip export loads with open_clip
alone in a process that never imports this project; nothing in them names the machine's paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel

from align.artifact import AlignedEncoder, load_aligned, save_aligned
from align.fixtures import ensure_tiny
from align.heads import build_text_head, build_token_head
from align.load import load_text_encoder, load_vision_encoder
from align.methods import run_method

TEXTS = ["a red circle", "two blue squares"]

OPEN_CLIP_CHECK = """
import json, sys
import open_clip, torch
from safetensors.torch import load_file
folder = sys.argv[1]
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
inputs = load_file(sys.argv[2])
with torch.no_grad():
    image = model.eval().encode_image(inputs["pixels"])
    text = model.encode_text(tokenizer(json.loads(sys.argv[3])))
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("align", "mllm_swap"))
print(json.dumps({"image": image.tolist(), "text": text.tolist(), "leaked": leaked,
                  "tokenizer": type(tokenizer).__name__}))
"""


def text_files_naming(folder: Path, *needles: Path) -> list[str]:
    """Files under ``folder`` whose bytes contain any of ``needles`` (as given and resolved)."""
    words = {str(n).encode() for n in needles} | {str(Path(n).resolve()).encode() for n in needles}
    return [str(p) for p in folder.rglob("*") if p.is_file() and any(w in p.read_bytes() for w in words)]


@pytest.fixture(scope="module")
def kuea_run(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A KUEA run from a student in its own folder; the folder is deleted and the outputs copied away."""
    root = tmp_path_factory.mktemp("kuea")
    student = root / "student-clip"
    shutil.copytree(ensure_tiny("tiny-clip"), student)
    sets = [f"student={student}", "target=tiny-dinov2-random", f"data.train={shapes_dir}", "train.steps=2",
            "train.batch_size=8", "eval.limit=16"]  # fmt: skip
    run_method("kuea", None, sets, root / "run", resume=False)
    before = load_aligned(root / "run" / "artifact")
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = {"tokens": before(pixels), "image": before.encode_image(pixels), "text": before.encode_text(TEXTS)}
    shutil.rmtree(student)
    moved = root / "elsewhere"
    for part in ("artifact", "hf_clip", "open_clip"):
        shutil.copytree(root / "run" / part, moved / part)
    shutil.rmtree(root / "run")
    return {"root": root, "moved": moved, "pixels": pixels, "want": want}


def test_kuea_artifact_loads_from_a_copy_without_its_student(kuea_run: dict) -> None:
    moved, want = kuea_run["moved"], kuea_run["want"]
    again = load_aligned(moved / "artifact")  # the original student folder and run are gone
    with torch.no_grad():
        torch.testing.assert_close(again(kuea_run["pixels"]), want["tokens"], rtol=0, atol=0)
        torch.testing.assert_close(again.encode_image(kuea_run["pixels"]), want["image"], rtol=0, atol=0)
        torch.testing.assert_close(again.encode_text(TEXTS), want["text"], rtol=0, atol=0)
    config = json.loads((moved / "artifact" / "aligned_encoder.json").read_text())
    assert config["backbone"]["source"] == config["text"]["source"] == "./backbone"
    assert text_files_naming(moved, kuea_run["root"]) == []


def test_hf_clip_export_loads_from_a_copy(kuea_run: dict) -> None:
    moved = kuea_run["moved"]
    clip = CLIPModel.from_pretrained(moved / "hf_clip").eval()
    with torch.no_grad():
        image = clip.get_image_features(pixel_values=kuea_run["pixels"])
    image = image if torch.is_tensor(image) else image.pooler_output
    torch.testing.assert_close(torch.nn.functional.normalize(image, dim=-1), kuea_run["want"]["image"],
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_open_clip_export_loads_with_open_clip_alone(kuea_run: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    moved = kuea_run["moved"]
    inputs = tmp_path / "inputs.safetensors"
    save_file({"pixels": kuea_run["pixels"].contiguous()}, str(inputs))
    cfg = json.loads((moved / "open_clip" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == "."
    done = subprocess.run(
        [sys.executable, "-c", OPEN_CLIP_CHECK, str(moved / "open_clip"), str(inputs), json.dumps(TEXTS)],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["leaked"] == [] and got["tokenizer"] == "HFTokenizer"
    image = torch.nn.functional.normalize(torch.tensor(got["image"]), dim=-1)
    text = torch.nn.functional.normalize(torch.tensor(got["text"]), dim=-1)
    torch.testing.assert_close(image, kuea_run["want"]["image"], rtol=1e-5, atol=1e-5)
    # the same tokens as the artifact's text side (HF tokenizer, padded to open_clip's context length)
    torch.testing.assert_close(text, kuea_run["want"]["text"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["sail_glu", "freeze_align"])
def test_headed_artifact_travels_with_its_local_models(kind: str, tmp_path: Path) -> None:
    """SAIL / freeze-align artifacts over local model folders record them relative to the artifact: moved
    together they load; moved alone they fail naming what to provide."""
    models = tmp_path / "a" / "models"
    shutil.copytree(ensure_tiny("tiny-dinov2-random"), models / "dino")
    shutil.copytree(ensure_tiny("tiny-text"), models / "text")
    backbone, text = load_vision_encoder(models / "dino"), load_text_encoder(models / "text")
    torch.manual_seed(0)
    head = {"kind": kind, "in_dim": backbone.embed_dim, "out_dim": 24, "num_prefix_tokens": 1}
    txt = build_text_head({"kind": kind, "in_dim": text.embed_dim, "out_dim": 24})
    enc = AlignedEncoder(backbone, text, build_token_head(head), txt, method=kind).eval()
    save_aligned(tmp_path / "a" / "run" / "artifact", enc, training={"data": str(tmp_path / "a" / "data")})
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want_tokens, want_text = enc(pixels), enc.encode_text(TEXTS)
    assert text_files_naming(tmp_path / "a" / "run", tmp_path) == []
    shutil.move(tmp_path / "a", tmp_path / "b")  # the artifact and its models, moved together
    again = load_aligned(tmp_path / "b" / "run" / "artifact")
    with torch.no_grad():
        torch.testing.assert_close(again(pixels), want_tokens, rtol=0, atol=0)
        torch.testing.assert_close(again.encode_text(TEXTS), want_text, rtol=0, atol=0)
    shutil.copytree(tmp_path / "b" / "run" / "artifact", tmp_path / "alone")
    with pytest.raises(FileNotFoundError, match=r"backbone '\.\./\.\./.*models/dino' \(a dinov2 model"):
        load_aligned(tmp_path / "alone")


def test_portable_and_locate_round_trip(tmp_path: Path) -> None:
    from align.paths import locate, portable, portable_tree

    base = tmp_path / "run" / "artifact"
    data = tmp_path / "data"
    data.mkdir()
    assert portable(data, base) == "../../data" and locate("../../data", base) == base / "../../data"
    assert (locate(portable(data, base), base)).resolve() == data.resolve()
    assert portable(base / "backbone", base) == "./backbone"
    assert portable(ensure_tiny("tiny-clip"), base) == "tiny-clip"  # a built tiny model: its id
    for ref in ("tiny-clip", "facebook/dinov2-large", "openclip:ViT-B-32/openai"):
        assert portable(ref, base) == ref and locate(ref, base) == ref
    record = {"data": str(data), "n": 3, "runs": [str(data / "x"), "cls"], "url": "https://a/b"}
    assert portable_tree(record, base) == {"data": "../../data", "n": 3, "runs": ["../../data/x", "cls"],
                                           "url": "https://a/b"}  # fmt: skip


def test_open_clip_student_artifact_carries_its_export(tmp_path: Path) -> None:
    """An open_clip KUEA student: the artifact bundles the open_clip export and loads from a copy alone."""
    from align.methods.kuea.export import export_student

    student = load_vision_encoder("tiny-openclip")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    paths = export_student(student, "tiny-openclip", tmp_path / "run", "kuea-tiny-oc")
    enc = AlignedEncoder(student, "tiny-openclip", method="kuea", image_pool="projected", token_rule="patch")
    save_aligned(tmp_path / "run" / "artifact", enc, backbone_dir=paths["open_clip"])
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want_tokens, want_image, want_text = enc(pixels), enc.encode_image(pixels), enc.encode_text(TEXTS)
    shutil.copytree(tmp_path / "run" / "artifact", tmp_path / "copy")
    shutil.rmtree(tmp_path / "run")
    again = load_aligned(tmp_path / "copy")
    assert again.backbone.kind == "openclip" and again.text.source.endswith("backbone")
    with torch.no_grad():
        torch.testing.assert_close(again(pixels), want_tokens, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(again.encode_image(pixels), want_image, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(again.encode_text(TEXTS), want_text, rtol=1e-6, atol=1e-6)
    assert text_files_naming(tmp_path / "copy", tmp_path) == []
