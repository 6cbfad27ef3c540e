"""Bad input across every sub-command: a non-zero exit, one paragraph naming the culprit, no traceback.

Each case runs in-process through ``mllm_swap.cli.main`` (argparse's own usage errors included); a few
run through the installed console script in a subprocess. ``{shapes}``, ``{tmp}``, ``{artifact}`` and
``{adapter}`` in a case are filled in per test.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from mllm_swap.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
TUNE_DATA = ["--set", "data={shapes}/instruct.json", "--set", "image_folder={shapes}", "--set", "shapes=null",
             "--set", "eval_vqa=null", "--set", "train.steps=1", "--set", "train.batch_size=2"]  # fmt: skip
# the recipes name the pretrained tiny-dinov2 (a build of minutes); tests take the random tower
SAIL = ["align", "sail", "--config", str(RECIPES / "tiny_sail.yaml"), "--set", "vision=tiny-dinov2-random",
        "--set", "data.train={shapes}"]  # fmt: skip


class Evil:
    """A pickle that would run a shell command when unpickled without ``weights_only``."""

    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['EVIL_MARKER'])}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Broken inputs: an empty file, wrong columns, non-UTF-8 text, a file where a directory belongs."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.jsonl").write_text("")
    (root / "header.csv").write_text("image,caption\n")
    (root / "wrong.jsonl").write_text('{"x": 1}\n')
    (root / "latin.jsonl").write_bytes(b'{"image": "a.png", "caption": "caf\xe9"}\n')
    (root / "latin.csv").write_bytes(b"image,caption\n\xe9t\xe9.png,x\n")
    (root / "latin.yaml").write_bytes(b"vision: tiny-dinov2-random\n# caf\xe9\n")
    (root / "afile").write_text("not a directory\n")
    from PIL import Image  # a pairs file whose 'color' attribute has one class in its train split

    Image.new("RGB", (8, 8), "red").save(root / "red.png")
    (root / "onecolor.jsonl").write_text("".join(
        f'{{"image": "red.png", "split": "{split}", "attributes": {{"color": "red", "shape": "{shape}"}}}}\n'
        for split in ("train", "test") for shape in ("circle", "square")
    ))  # fmt: skip
    (root / "nosplit.jsonl").write_text('{"image": "red.png", "attributes": {"color": "red"}}\n')
    (root / "adapter").mkdir()  # an adapter whose base model was moved away
    (root / "adapter" / "adapter_config.json").write_text(
        f'{{"base_model_name_or_path": "{root}/gone-base"}}'
    )
    os.environ["EVIL_MARKER"] = str(root / "pwned")
    torch.save({"w": torch.zeros(2), "evil": Evil()}, root / "evil.bin")
    return root


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved aligned artifact whose weights file is then cut in half (a truncated download/copy)."""
    from align.artifact import AlignedEncoder, save_aligned
    from align.heads import build_text_head, build_token_head
    from align.load import load_text_encoder, load_vision_encoder

    vision, text = load_vision_encoder("tiny-dinov2-random"), load_text_encoder("tiny-text")
    kind = "sail_linear"
    image_head = build_token_head(
        {"kind": kind, "in_dim": vision.embed_dim, "out_dim": 16, "num_prefix_tokens": 1}
    )
    text_head = build_text_head({"kind": kind, "in_dim": text.embed_dim, "out_dim": 16})
    enc = AlignedEncoder(vision, text, image_head, text_head, method=kind, logit_scale=10.0, logit_bias=-5.0)
    out = save_aligned(tmp_path_factory.mktemp("art") / "artifact", enc.eval())
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return out


# (name, argv, substrings the message must contain); every one must exit non-zero without a traceback.
CASES = [
    ("encode shard size 0", ["encode", "--encoder", "tiny-clip", "--data", "{shapes}", "--out", "{tmp}/c",
                             "--shard-size", "0"], ["--shard-size", "found 0"]),
    ("encode shard size -5", ["encode", "--encoder", "tiny-clip", "--data", "{shapes}", "--out", "{tmp}/c",
                              "--shard-size", "-5"], ["--shard-size", "found -5"]),
    ("encode batch size 0", ["encode", "--encoder", "tiny-clip", "--data", "{shapes}", "--out", "{tmp}/c",
                             "--batch-size", "0"], ["--batch-size"]),
    ("encode bad device", ["encode", "--encoder", "tiny-clip", "--data", "{shapes}", "--out", "{tmp}/c",
                           "--device", "cuda:99"], ["--device", "cuda:99"]),
    ("encode empty file", ["encode", "--encoder", "tiny-clip", "--data", "{files}/empty.jsonl", "--out", "{tmp}/c"],
     ["empty.jsonl", "no data rows", "empty file"]),
    ("encode header only", ["encode", "--encoder", "tiny-clip", "--data", "{files}/header.csv", "--out", "{tmp}/c"],
     ["header.csv", "only a header (image, caption)"]),
    ("encode wrong columns", ["encode", "--encoder", "tiny-clip", "--data", "{files}/wrong.jsonl", "--out",
                              "{tmp}/c"], ["wrong.jsonl", "columns found: x", "Rename the columns"]),
    ("encode non-UTF-8 jsonl", ["encode", "--encoder", "tiny-clip", "--data", "{files}/latin.jsonl", "--out",
                                "{tmp}/c"], ["latin.jsonl:1", "not UTF-8", "0xe9"]),
    ("encode non-UTF-8 csv", ["encode", "--encoder", "tiny-clip", "--data", "{files}/latin.csv", "--out", "{tmp}/c"],
     ["latin.csv:2", "not UTF-8"]),
    ("encode out under a file", ["encode", "--encoder", "tiny-clip", "--data", "{shapes}", "--out",
                                 "{files}/afile/sub"], ["afile", "is a file"]),
    ("encoders unknown text", ["encoders", "--text", "nope"], ["'nope'", "unknown text encoder"]),
    ("encoders hub id offline", ["encoders", "--vision", "acme/not-cached"],
     ["acme/not-cached", "HF_HUB_OFFLINE", "local copy"]),
    ("data inspect non-UTF-8", ["data", "inspect", "{files}/latin.jsonl"], ["latin.jsonl:1", "UTF-8"]),
    ("data shapes under a file", ["data", "shapes", "--out", "{files}/afile/sub", "--n", "4"], ["afile", "is a file"]),
    ("zeroshot limit -1", ["zeroshot", "--model", "tiny-clip", "--data", "{shapes}", "--out", "{tmp}/z",
                           "--limit", "-1"], ["--limit", "found -1"]),
    ("zeroshot truncated artifact", ["zeroshot", "--model", "{artifact}", "--data", "{shapes}", "--out", "{tmp}/z"],
     ["{artifact}/model.safetensors", "truncated"]),
    ("zeroshot out under a file", ["zeroshot", "--model", "tiny-clip", "--data", "{shapes}", "--out",
                                   "{files}/afile/z"], ["afile", "is a file"]),
    ("align steps 0 from --set", [*SAIL, "--set", "train.steps=0", "--out", "{tmp}/a"],
     ["--set train.steps", "'steps' must be > 0, found 0"]),
    ("align lr overflows float32", [*SAIL, "--set", "train.lr=1e39", "--out", "{tmp}/a"],
     ["--set train.lr", "finite", "1e+39"]),
    ("align lr nan", [*SAIL, "--set", "train.lr=.nan", "--out", "{tmp}/a"], ["--set train.lr", "nan"]),
    ("align recipe not UTF-8", ["align", "sail", "--config", "{files}/latin.yaml", "--out", "{tmp}/a"],
     ["latin.yaml:2", "not UTF-8"]),
    ("align recipe missing", ["align", "kernel", "--config", "{tmp}/none.yaml", "--out", "{tmp}/a"], ["none.yaml"]),
    ("swap select layer 99", ["swap", "--mllm", "tiny-llava", "--encoder", "tiny-clip", "--out", "{tmp}/s",
                              "--select-layer", "99"], ["--select-layer 99", "4 layers", "[-5, 4]"]),
    ("swap images 0", ["swap", "--mllm", "tiny-llava", "--encoder", "tiny-clip", "--out", "{tmp}/s", "--images", "0"],
     ["--images 0"]),
    ("swap hub mllm offline", ["swap", "--mllm", "acme/llava-not-cached", "--encoder", "tiny-clip", "--out",
                               "{tmp}/s"], ["acme/llava-not-cached", "local copy"]),
    ("swap out under a file", ["swap", "--mllm", "tiny-llava", "--encoder", "tiny-clip", "--out", "{files}/afile/s"],
     ["afile", "is a file"]),
    ("tune gone model", ["tune", "--config", str(RECIPES / "tiny_llava_lora.yaml"), "--set", "model={tmp}/gone",
                         "--out", "{tmp}/t"], ["{tmp}/gone", "no such checkpoint"]),
    ("tune steps 0 from --set", ["tune", "--config", str(RECIPES / "tiny_llava_lora.yaml"), "--set", "train.steps=0",
                                 "--out", "{tmp}/t"], ["--set train.steps", "found 0"]),
    ("tune refused pickle", ["tune", "--config", str(RECIPES / "tiny_llava_lora.yaml"), *TUNE_DATA, "--set",
                             "init_trainables={files}/evil.bin", "--out", "{tmp}/t"],
     ["{files}/evil.bin", "refused to load", "never unpickles", "(it asks for posix.system)"]),
    ("merge gone adapter", ["merge", "--adapter", "{tmp}/no-adapter", "--out", "{tmp}/m"], ["no-adapter"]),
    ("merge gone base model", ["merge", "--adapter", "{files}/adapter", "--out", "{tmp}/m"],
     ["{files}/gone-base", "no such checkpoint directory"]),
    ("eval limit 0", ["eval", "--model", "{tmp}", "--tasks", "shapes_vqa", "--out", "{tmp}/e", "--limit", "0"],
     ["--limit"]),
    ("rank knn 0", ["rank", "--vision", "tiny-clip", "--text", "tiny-text", "--data", "{shapes}", "--out",
                     "{tmp}/sc", "--knn", "0"], ["--knn"]),
    ("probe unknown label", ["probe", "--encoder", "tiny-clip", "--data", "{shapes}", "--labels", "color,size",
                             "--out", "{tmp}/p"], ["'size'", "attributes found: color, count, position, shape"]),
    ("probe one class", ["probe", "--encoder", "tiny-clip", "--data", "{files}/onecolor.jsonl", "--labels", "color",
                         "--out", "{tmp}/p"], ["onecolor.jsonl", "'color' has one class ('red')", "'train'"]),
    ("probe missing split", ["probe", "--encoder", "tiny-clip", "--data", "{shapes}", "--test-split", "val",
                             "--out", "{tmp}/p"], ["'val'", "--test-split"]),
    ("probe no split column", ["probe", "--encoder", "tiny-clip", "--data", "{files}/nosplit.jsonl", "--out",
                               "{tmp}/p"], ["nosplit.jsonl", "split 'train' requested", "no 'split' column"]),
    ("curate k 0", ["curate", "--data", "{shapes}", "--shapes-concepts", "color", "--out", "{tmp}/cu", "--k", "0"],
     ["--k"]),
    ("plan-hardware", ["plan", str(RECIPES / "kuea_vitl14.yaml"), "--hardware", "8xV100"], ["--hardware '8xV100'", "A100-80GB"]),
    ("plan-zero", ["plan", str(RECIPES / "kuea_vitl14.yaml"), "--zero", "4"], ["--zero '4'", "3-offload"]),
    ("plan-recipe", ["plan", "{tmp}/nope.yaml"], ["nope.yaml: recipe file not found"]),
]  # fmt: skip


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit code and stderr of one in-process run (argparse's usage errors exit through SystemExit)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_named_paragraph(argv, expected, shapes_dir, files, artifact, tmp_path, capsys):
    fill = {"shapes": str(shapes_dir), "tmp": str(tmp_path), "files": str(files), "artifact": str(artifact)}
    code, err = run_cli([a.format(**fill) for a in argv], capsys)
    message = err.strip().splitlines()[-1] if err.strip() else ""
    assert code not in (0, None), err
    assert "Traceback" not in err and "weights_only=False" not in err
    for part in expected:
        assert part.format(**fill) in message, f"{part!r} not in {message!r}"
    assert not (files / "pwned").exists()  # the malicious pickle never ran


def test_listing_time_missing_images_count_as_skipped(shapes_dir, tmp_path, capsys):
    """Two rows point at missing images: the cache holds the rest and its manifest counts both."""
    from align.io import read_json, read_jsonl

    rows = read_jsonl(shapes_dir / "pairs.jsonl")[:6]
    for row in rows:
        row["image"] = str(shapes_dir / row["image"])
    rows[1]["image"] = rows[4]["image"] = str(tmp_path / "gone.png")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    argv = [
        "encode",
        "--encoder",
        "tiny-clip",
        "--data",
        str(pairs),
        "--out",
        str(tmp_path / "c"),
        "--on-error",
        "skip",
    ]
    assert main(argv) == 0
    manifest = read_json(tmp_path / "c" / "manifest.json")
    assert manifest["skipped"] == 2 and sum(s["rows"] for s in manifest["shards"]) == 4


def test_os_failures_are_named(monkeypatch, tmp_path, capsys):
    """A full disk and a read-only disk met mid-command: the path and the reason, exit 2."""
    import align.data.shapes

    for code, words in ((errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system")):

        def full(*args, code=code, **kwargs):
            raise OSError(code, os.strerror(code), str(tmp_path / "out" / "images" / "0.png"))

        monkeypatch.setattr(align.data.shapes, "generate_shapes", full)
        status, err = run_cli(["data", "shapes", "--out", str(tmp_path / "out"), "--n", "4"], capsys)
        assert status == 2 and "Traceback" not in err
        assert f"{tmp_path / 'out' / 'images' / '0.png'}: {words}" in err


def test_a_bug_is_one_paragraph_and_debug_shows_it(monkeypatch, tmp_path, capsys):
    """An exception that is no user error: exit 1 with its type and a pointer to --debug; --debug raises it."""
    import align.data.shapes

    def bug(*args, **kwargs):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(align.data.shapes, "generate_shapes", bug)
    argv = ["data", "shapes", "--out", str(tmp_path / "o"), "--n", "4"]
    code, err = run_cli(argv, capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "unexpected error (IndexError: tuple index out of range)" in err and "--debug" in err
    with pytest.raises(IndexError):
        main(["--debug", *argv])


def test_refused_pickle_never_runs_and_is_named(files):
    from align.errors import UserError
    from align.io import read_tensors

    with pytest.raises(UserError, match="evil.bin: refused to load") as err:
        read_tensors(files / "evil.bin")
    assert "weights_only=False" not in str(err.value) and "safe_globals" not in str(err.value)
    assert not (files / "pwned").exists()
    with pytest.raises(pickle.UnpicklingError):  # what torch itself says (and would have let through)
        torch.load(files / "evil.bin", weights_only=True)


def test_verbosity_flags_set_the_log_level(tmp_path, shapes_dir, capsys):
    """-q hides INFO, the default shows it, -v shows DEBUG; all through the standard logging module."""
    probe = logging.getLogger("align.probe")
    argv = ["data", "shapes", "--out", str(shapes_dir), "--n", "96"]  # reuses the session's shapes world
    for flags, level in (([], logging.INFO), (["-q"], logging.WARNING), (["-v"], logging.DEBUG)):
        assert main([*flags, *argv]) == 0
        assert logging.getLogger().level == level
        capsys.readouterr()
        probe.info("info-line")
        probe.debug("debug-line")
        err = capsys.readouterr().err
        assert ("info-line" in err) == (level <= logging.INFO)
        assert ("debug-line" in err) == (level <= logging.DEBUG)


def test_align_help_names_each_methods_own_recipe(capsys):
    for method, recipe in (("sail", "tiny_sail.yaml"), ("freeze_align", "tiny_freeze_align.yaml"),
                           ("kuea", "tiny_kuea.yaml")):  # fmt: skip
        with pytest.raises(SystemExit):
            main(["align", method, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"recipes/{recipe}" in text and (RECIPES / recipe).is_file()


# ---------------------------------------------------------------- through the installed console script


def console(*argv: str, env: dict | None = None, drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the ``mllm-swap`` script installed next to this Python on this source tree."""
    exe = Path(sys.executable).with_name("mllm-swap")
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    environ.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([str(exe), *argv], capture_output=True, text=True, env=environ, timeout=300)


def test_console_version():
    done = console("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"mllm-swap {version('mllm-swap')}"


def test_console_debug_shows_the_traceback(tmp_path):
    """The same case without --debug is in the table above (exit 2, no traceback)."""
    args = [
        "swap",
        "--mllm",
        "tiny-llava",
        "--encoder",
        "tiny-clip",
        "--out",
        str(tmp_path / "s"),
        "--images",
        "0",
    ]
    debug = console("--debug", *args)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "UserError: --images 0" in debug.stderr


def test_console_unreachable_hub_fails_fast_without_retries(tmp_path):
    """No HF_HUB_OFFLINE, but the hub endpoint refuses connections: one quick named failure."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = console(
        "encoders", "--vision", "acme/encoder", env=env, drop=("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "acme/encoder" in done.stderr and "http://127.0.0.1:9 is unreachable" in done.stderr
    assert "local copy" in done.stderr and "Retrying" not in done.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None or torch.cuda.is_available(), reason="has a GPU")
def test_device_cuda_without_a_gpu_is_refused_up_front(capsys, shapes_dir, tmp_path):
    code, err = run_cli(["encode", "--encoder", "tiny-clip", "--data", str(shapes_dir), "--out",
                         str(tmp_path / "c"), "--device", "cuda"], capsys)  # fmt: skip
    assert code == 2 and "argument --device: 'cuda': no CUDA GPU is visible" in err


def test_cache_manifest_with_a_wrong_embed_dim_is_named(shapes_dir, tmp_path, capsys):
    """A prebuilt image cache whose manifest claims another width than its shards hold."""
    from align.data.cache import write_cache
    from align.io import read_json, write_json

    image = write_cache("tiny-dinov2-random", shapes_dir, tmp_path / "img", pool="concat", dtype="fp32")
    text = write_cache(
        "tiny-text", shapes_dir, tmp_path / "txt", modality="text", pool="sentence", dtype="fp32"
    )
    manifest = read_json(image / "manifest.json")
    manifest["encoder"]["embed_dim"] = 64  # the shards hold [CLS ; mean] of width 2 x 96
    write_json(image / "manifest.json", manifest)
    code, err = run_cli([*SAIL[:6], "--set", f"data.image_cache={image}", "--set", f"data.text_caches=[{text}]",
                         "--set", "train.steps=1", "--out", str(tmp_path / "run")], capsys)  # fmt: skip
    assert code == 2 and "Traceback" not in err
    assert f"{image / 'manifest.json'}: encoder.embed_dim 64" in err and "width 192" in err


def test_explain_tells_user_errors_from_bugs():
    """Known failures become one paragraph; a bare KeyError or an IndexError stays a bug (None)."""
    from huggingface_hub.errors import HFValidationError
    from safetensors import SafetensorError

    from align.errors import explain

    assert explain(KeyError("embed_dim")) is None and explain(IndexError("x")) is None
    assert (
        explain(KeyError("unknown vision encoder 'x': not a tiny id"))
        == "unknown vision encoder 'x': not a tiny id"
    )
    assert "lower the batch size" in explain(torch.cuda.OutOfMemoryError("CUDA out of memory.\nTried ..."))
    assert "local copy" in explain(HFValidationError("Repo id must be in the form 'repo_name'"))
    assert "truncated or corrupt" in explain(SafetensorError("Error while deserializing header"))
    message = explain(FileNotFoundError(errno.ENOENT, "No such file or directory", "/no/such/dir"))
    assert message == "/no/such/dir: not found"
    assert explain(ValueError("line one\n  line two")) == "line one line two"  # one paragraph
