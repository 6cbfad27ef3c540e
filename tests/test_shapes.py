"""The shapes world: determinism, split separation, masks vs attributes, instruct/VQA formats, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from align.data import shapes as shapes_mod
from align.data.shapes import COLORS, POSITIONS, SHAPES, generate_shapes, load_shapes, shapes_classes
from align.data.shapes_text import QUESTIONS
from mllm_swap.cli import main

N = 60
COUNT_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "a"
    generate_shapes(out, N, seed=0, progress=False)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]


def test_same_seed_gives_identical_bytes_and_other_seed_differs(world: Path, tmp_path: Path) -> None:
    generate_shapes(tmp_path / "b", N, seed=0, progress=False)
    generate_shapes(tmp_path / "c", N, seed=1, progress=False)
    a, b, c = _files(world), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 2 * N + 7  # images, masks, 6 index files, the run marker
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert a.keys() == c.keys()
    assert a["pairs.jsonl"] != c["pairs.jsonl"]
    images = [k for k in a if k.startswith("images/")]
    assert sum(a[k] != c[k] for k in images) > 0.9 * len(images)


def test_train_and_test_never_overlap(world: Path) -> None:
    rows = _rows(world)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    assert len(rows) == N and len(test) == round(0.2 * N) and len(train) + len(test) == N
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in test})
    digests = {hashlib.sha256(np.asarray(Image.open(world / r["image"])).tobytes()).hexdigest() for r in rows}
    assert len(digests) == N  # every image's pixels are distinct, so no test image is in train
    instruct = json.loads((world / "instruct.json").read_text())
    assert sorted(e["id"] for e in instruct) == sorted(r["id"] for r in train)
    vqa_images = {json.loads(line)["image"] for line in (world / "vqa_test.jsonl").read_text().splitlines()}
    assert vqa_images == {r["image"] for r in test}
    meta = json.loads((world / "meta.json").read_text())
    assert meta["counts"]["train"] == len(train) and meta["counts"]["test"] == len(test)
    assert (world / "images.txt").read_text().split() == [r["image"] for r in rows]


def test_masks_and_pixels_agree_with_attributes(world: Path) -> None:
    palette = np.array(list(COLORS.values()), dtype=float)
    for row in _rows(world):
        attrs = row["attributes"]
        img = np.asarray(Image.open(world / row["image"]), dtype=float)
        mask = np.asarray(Image.open(world / row["mask"]))
        assert img.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert attrs["count"] == len(attrs["objects"]) and 1 <= attrs["count"] <= 3
        main = attrs["objects"][0]
        assert (attrs["color"], attrs["shape"], attrs["position"]) == (
            main["color"],
            main["shape"],
            main["position"],
        )
        cls = SHAPES.index(attrs["shape"]) + 1
        assert set(np.unique(mask)) <= {0} | {SHAPES.index(o["shape"]) + 1 for o in attrs["objects"]}
        x0, y0, x1, y1 = main["bbox"]
        inside = np.zeros_like(mask, dtype=bool)
        inside[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = True
        region = (mask == cls) & inside
        assert region.sum() > 40  # the main object is really drawn, with its class in the mask
        mean = img[region].mean(axis=0)
        nearest = list(COLORS)[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))]
        assert nearest == attrs["color"]
        ys, xs = np.nonzero(region)
        cell = 3 * min(int(ys.mean() * 3 / 64), 2) + min(int(xs.mean() * 3 / 64), 2)
        assert POSITIONS[cell] == attrs["position"]
        spread = img.max(axis=2) - img.min(axis=2)  # grey background ~0, palette colours >= 120
        assert (spread[mask == 0] > 70).mean() < 0.01
        assert (spread[mask > 0] > 70).mean() > 0.95
        for other in attrs["objects"][1:]:
            ox0, oy0, ox1, oy1 = other["bbox"]
            assert (ox1 - ox0) * (oy1 - oy0) < (x1 - x0) * (y1 - y0)  # the main object dominates


def test_instruct_is_llava_format_with_single_word_answers(world: Path) -> None:
    attrs = {r["id"]: r["attributes"] for r in _rows(world)}
    entries = json.loads((world / "instruct.json").read_text())
    kind_of = {q: kind for kind, qs in QUESTIONS.items() for q in qs}
    for entry in entries:
        assert set(entry) == {"id", "image", "conversations"}
        assert (world / entry["image"]).is_file()
        turns = entry["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 4
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        kinds = []
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            question = human["value"].removeprefix("<image>\n").removesuffix(" Answer with one word.")
            kind = kind_of[question]
            kinds.append(kind)
            answer = gpt["value"]
            assert " " not in answer
            a = attrs[entry["id"]]
            assert (COUNT_WORDS[answer] if kind == "count" else answer) == a[kind]
        assert sorted(kinds) == sorted(QUESTIONS)


def test_vqa_rows_have_answer_among_four_options(world: Path) -> None:
    attrs = {r["image"]: r["attributes"] for r in _rows(world)}
    rows = [json.loads(line) for line in (world / "vqa_test.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * round(0.2 * N)
    for row in rows:
        assert set(row) == {"id", "image", "question", "options", "answer", "kind"}
        assert len(row["options"]) == 4 and len(set(row["options"])) == 4
        assert row["answer"] in row["options"]
        a = attrs[row["image"]]
        expected = a[row["kind"]]
        assert (COUNT_WORDS[row["answer"]] if row["kind"] == "count" else row["answer"]) == expected
    assert len({r["id"] for r in rows}) == len(rows)


def test_classes_meta_and_loaders(world: Path) -> None:
    classes = shapes_classes(world)
    assert classes["color"] == list(COLORS) and len(classes["color"]) == 6
    assert classes["shape"] == SHAPES
    for kind in ("color", "shape"):
        assert classes["templates"][kind] and all("{}" in t for t in classes["templates"][kind])
    meta = json.loads((world / "meta.json").read_text())
    assert (meta["seed"], meta["n"], meta["size"], meta["version"]) == (0, N, 64, shapes_mod.VERSION)
    assert meta["mask_classes"] == ["background", *SHAPES]
    test = load_shapes(world, split="test")
    assert len(test) == round(0.2 * N) and all(r["split"] == "test" for r in test)
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in test)
    assert len(load_shapes(world)) == N
    with pytest.raises(ValueError, match="split"):
        load_shapes(world, split="val")


def test_reuse_overwrite_and_refusal(tmp_path: Path) -> None:
    out = tmp_path / "w"
    first = generate_shapes(out, 5, seed=3, size=32, progress=False)
    assert not first["reused"] and Image.open(out / "images" / "shapes-00000.png").size == (32, 32)
    stamp = (out / "pairs.jsonl").stat().st_mtime_ns
    assert generate_shapes(out, 5, seed=3, size=32, progress=False)["reused"]
    assert (out / "pairs.jsonl").stat().st_mtime_ns == stamp
    assert not generate_shapes(out, 5, seed=3, size=32, overwrite=True, progress=False)["reused"]
    (out / "my-notes.txt").write_text("mine")  # a user's file inside the dataset survives a rebuild
    (out / shapes_mod.MMVP_PAIRS).write_text("{}\n")  # pairs mined from this world go stale with it
    with pytest.raises(FileExistsError, match=r"other arguments \(\{'n': 5\}\).*--overwrite"):
        generate_shapes(out, 6, seed=3, size=32, progress=False)
    assert len(load_shapes(out)) == 5
    assert not generate_shapes(out, 6, seed=3, size=32, overwrite=True, progress=False)["reused"]
    assert len(load_shapes(out)) == 6 and (out / "my-notes.txt").read_text() == "mine"
    assert not (out / shapes_mod.MMVP_PAIRS).exists()
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an output directory of mllm-swap"):
        generate_shapes(other, 3, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 4, "size": 8}, {"n": 4, "test_fraction": 1.0}])
def test_bad_arguments_fail_early(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_shapes(tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()


def test_killed_run_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = shapes_mod.render, []

    def failing(rng: np.random.Generator, size: int):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(rng, size)

    monkeypatch.setattr(shapes_mod, "render", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "half", 10, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_shapes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert (
        main(["data", "shapes", "--out", str(out), "--n", "10", "--seed", "2", "--test-fraction", "0.3"]) == 0
    )
    printed = capsys.readouterr().out
    assert "10 images (7 train, 3 test)" in printed
    assert json.loads((out / "meta.json").read_text())["seed"] == 2
    assert main(["data", "shapes", "--out", str(out), "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    assert main(["data", "shapes", "--out", str(tmp_path / "busy"), "--n", "3"]) == 2
    assert "not an output directory of mllm-swap" in capsys.readouterr().err


def test_cli_via_python_m(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mllm_swap", "data", "shapes", "--out", str(tmp_path / "s"), "--n", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "4 images" in done.stdout and (tmp_path / "s" / "vqa_test.jsonl").is_file()


def test_clip_learns_from_alt_text_that_never_counts_or_places(world: Path) -> None:
    """``tiny-clip-shapes``' training captions (decoded from its method's tokens) name the main object's colour
    and shape and no word of the count or position vocabulary, nor any other object."""
    from align.data.shapes_text import _vocab
    from align.encoders.registry import resolve
    from align.pretrain.clip import ClipPretrain, PretrainSettings

    method = ClipPretrain(Path(resolve("tiny-clip")), world, PretrainSettings())
    rows = load_shapes(world, split="train")
    texts = method.tokenizer.batch_decode(method.input_ids, skip_special_tokens=True)
    assert len(texts) == 2 * len(rows) and len(set(texts)) > 2 * len(COLORS) * len(SHAPES)  # varied phrasing
    blind = {w for kind in ("count", "position") for v in _vocab(kind) for w in v.split("-")}
    blind |= set(COUNT_WORDS) | {"zero", "middle", "corner", "shapes", "objects", "and"}
    for k, text in enumerate(texts):
        attrs = rows[k % len(rows)]["attributes"]
        words = set(text.replace(".", " ").split())
        assert not words & blind, text
        assert {attrs["color"], attrs["shape"]} <= words, (text, attrs)
        assert not words & (set(COLORS) - {attrs["color"]}) and not words & (set(SHAPES) - {attrs["shape"]})
