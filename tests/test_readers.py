"""Readers: pairs JSONL/CSV, image folders, HF datasets, webdataset shards, errors, Dataset, CLI."""

from __future__ import annotations

import csv
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from align.data.images import ImageError, open_image
from align.data.readers import open_data
from align.data.records import ImageTextDataset
from align.data.shapes import generate_shapes
from mllm_swap.cli import main


def _png(path: Path, seed: int, size: int = 8, fmt: str = "PNG") -> np.ndarray:
    """Write a random RGB image and return its pixels (as decoded back, for lossy formats too)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def pairs_dir(tmp_path: Path) -> Path:
    """Three images under img/ and a pairs.jsonl + pairs.csv pointing at them with relative paths."""
    rows = []
    for i in range(3):
        _png(tmp_path / "img" / f"{i}.png", i)
        rows.append(
            {"uid": f"u{i}", "file": f"img/{i}.png", "caps": [f"cap {i}a", f"cap {i}b"], "title": f"t{i}"}
        )
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (tmp_path / "pairs.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["uid", "file", "caps", "title"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "caps": json.dumps(r["caps"])})
    return tmp_path


def test_jsonl_and_csv_pairs_with_configured_columns(
    pairs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(pairs_dir.parent)  # relative paths must resolve from the file, not the cwd
    for name in ("pairs.jsonl", "pairs.csv"):
        data = open_data(pairs_dir / name, image_col="file", text_col=["caps", "title"], id_col="uid")
        assert data.kind == "pairs" and len(data) == 3
        assert data.fields == ["uid", "file", "caps", "title"]
        s = data[1]
        assert (s.id, s.texts, s.label) == ("u1", ["cap 1a", "cap 1b", "t1"], None)
        assert s.image == pairs_dir / "img" / "1.png"
        assert np.array_equal(np.asarray(open_image(s.image)), _png(pairs_dir / "tmp.png", 1))


def test_missing_column_names_file_column_and_columns(pairs_dir: Path) -> None:
    with pytest.raises(ValueError) as err:
        open_data(pairs_dir / "pairs.csv", image_col="file", text_col="caption_text")
    message = str(err.value)
    assert "pairs.csv" in message and "'caption_text'" in message and "uid, file, caps, title" in message
    with pytest.raises(ValueError, match="neither an image column"):
        open_data(pairs_dir / "pairs.jsonl")  # no 'image'/'caption' defaults, nothing named


def test_imagefolder_labels_and_templates(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    expected = {}
    for label, seed in [("golden_retriever", 0), ("golden_retriever", 1), ("tabby", 2)]:
        name = f"{label}/{seed}.{'jpg' if seed == 1 else 'png'}"
        expected[name.rsplit(".", 1)[0]] = (
            label,
            _png(root / name, seed, fmt="JPEG" if seed == 1 else "PNG"),
        )
    (root / "README").write_text("not an image")
    data = open_data(root, text_template="a photo of a {}.")
    assert data.kind == "imagefolder" and len(data) == 3
    for s in data:
        label, pixels = expected[s.id]
        assert s.label == label and s.texts == [f"a photo of a {label.replace('_', ' ')}."]
        assert np.array_equal(np.asarray(open_image(s.image)), pixels)


def _hf_dict(tmp_path: Path) -> tuple[dict, list[np.ndarray]]:
    arrays = [_png(tmp_path / "src" / f"{i}.png", 10 + i) for i in range(4)]
    return {
        "image": [Image.fromarray(a) for a in arrays],
        "text": [[f"t{i}", f"u{i}"] for i in range(4)],
        "label": [0, 1, 1, 0],
        "key": [f"k{i}" for i in range(4)],
    }, arrays


def test_hf_save_to_disk_with_pil_images_and_classlabel(tmp_path: Path) -> None:
    import datasets

    columns, arrays = _hf_dict(tmp_path)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Sequence(datasets.Value("string")),
            "label": datasets.ClassLabel(names=["cat", "dog"]),
            "key": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select([3])}).save_to_disk(tmp_path / "disk")
    data = open_data(tmp_path / "disk", text_col="text", id_col="key")
    assert data.kind == "hf-disk" and len(data) == 4 and data.fields == ["image", "text", "label", "key"]
    assert [s.label for s in data] == ["cat", "dog", "dog", "cat"]
    assert data[2].texts == ["t2", "u2"] and data[2].id == "k2"
    for s, pixels in zip(data, arrays, strict=True):
        assert np.array_equal(np.asarray(open_image(s.image)), pixels)
    test = open_data(tmp_path / "disk", text_col="text", split="test")
    assert [s.id for s in test] == ["0"] and np.array_equal(np.asarray(open_image(test[0].image)), arrays[3])
    with pytest.raises(ValueError, match="no split 'val'; splits found: train, test"):
        open_data(tmp_path / "disk", text_col="text", split="val")


def test_hf_local_files_json_and_imagefolder(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    arrays = [_png(tmp_path / "d" / "pics" / f"{i}.png", 20 + i) for i in range(3)]
    rows = [{"path": f"pics/{i}.png", "caption": f"c{i}"} for i in range(3)]
    (tmp_path / "d" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = open_data(
        f"hf:json:{tmp_path / 'd' / 'data.jsonl'}", image_col="path", cache_dir=str(tmp_path / "c")
    )
    assert data.kind == "hf-files" and [s.texts for s in data] == [["c0"], ["c1"], ["c2"]]
    assert [
        np.array_equal(np.asarray(open_image(s.image)), a) for s, a in zip(data, arrays, strict=True)
    ] == [True] * 3

    root = tmp_path / "folder"
    for label, seed in [("ant", 0), ("bee", 1), ("bee", 2)]:
        _png(root / label / f"{seed}.png", 30 + seed)
    ours = open_data(root)
    theirs = open_data(f"hf:imagefolder:{root}", cache_dir=str(tmp_path / "c"))
    assert theirs.kind == "hf-files"

    def key(s) -> tuple:
        return (s.label, np.asarray(open_image(s.image)).tobytes())

    assert sorted(map(key, ours)) == sorted(map(key, theirs))


def _write_shards(root: Path) -> dict[str, tuple[bytes, str]]:
    import webdataset as wds

    expected = {}
    for shard in range(2):
        with wds.TarWriter(str(root / f"shard-{shard:03d}.tar")) as sink:
            for i in range(3):
                key = f"s{shard}/{i:04d}"
                pixels = np.random.default_rng(40 + 3 * shard + i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                record = {"__key__": key, "png": buf.getvalue()}
                if i == 2:
                    record["json"] = {"caption": f"json caption {key}", "label": "x"}
                else:
                    record["txt"] = f"caption {key}"
                    record["cls"] = str(i)
                sink.write(record)
                expected[key] = (buf.getvalue(), record.get("txt") or record["json"]["caption"])
    return expected


def test_webdataset_shards_match_the_webdataset_client(tmp_path: Path) -> None:
    import webdataset as wds

    expected = _write_shards(tmp_path)
    pattern = str(tmp_path / "shard-{000..001}.tar")
    data = open_data(pattern)
    assert data.kind == "webdataset" and len(data) == 6
    assert {"png", "txt", "cls", "json", "json.caption"} <= set(data.fields)
    reference = {s["__key__"]: s["png"] for s in wds.WebDataset(pattern, shardshuffle=False)}
    assert [s.id for s in data] == list(reference)
    for s in data:
        raw, caption = expected[s.id]
        assert s.image.read() == raw == reference[s.id] and s.texts == [caption]
        assert np.array_equal(np.asarray(open_image(s.image)), np.asarray(Image.open(io.BytesIO(raw))))
    assert [s.label for s in data][:3] == ["0", "1", "x"]
    assert len(open_data(tmp_path)) == 6  # a directory of shards


def test_corrupt_image_skip_and_raise(pairs_dir: Path) -> None:
    (pairs_dir / "img" / "1.png").write_bytes(b"\x89PNG garbage, not an image")
    src = pairs_dir / "pairs.jsonl"
    cols = {"image_col": "file", "text_col": "caps"}
    with pytest.raises(ImageError, match=r"img/1\.png: cannot decode image"):
        open_data(src, verify=True, **cols)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = open_data(src, verify=True, on_error="skip", **cols)
    assert [s.id for s in data] == ["0", "2"] and data.errors.count == 1
    assert len(caught) == 1 and "skipped 1" in str(caught[0].message) and "1.png" in str(caught[0].message)
    # without verify the listing keeps it; the Dataset finds it when loading
    listed = open_data(src, **cols)
    with pytest.raises(ImageError, match=r"1\.png"):
        listed.dataset()[1]
    lenient = ImageTextDataset(
        listed.samples, transform=lambda im: torch.from_numpy(np.asarray(im).copy()), on_error="skip"
    )
    with pytest.warns(UserWarning, match="skipping unreadable"):
        batches = list(lenient.loader(batch_size=3))
    assert batches[0]["index"].tolist() == [0, 2] and batches[0]["images"].shape == (2, 8, 8, 3)
    assert len(batches[0]["skipped"]) == 1 and batches[0]["skipped"][0].where.endswith("1.png")
    assert lenient.errors.count == 1


def test_missing_image_and_truncated_shard(pairs_dir: Path, tmp_path: Path) -> None:
    (pairs_dir / "img" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"img/2\.png: image file not found"):
        open_data(pairs_dir / "pairs.jsonl", image_col="file")
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(open_data(pairs_dir / "pairs.jsonl", image_col="file", on_error="skip")) == 2
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shards(shards)
    whole = (shards / "shard-001.tar").read_bytes()
    with tarfile.open(shards / "shard-001.tar") as tar:
        png = next(m for m in tar if m.name == "s1/0001.png")
    cut = png.offset  # a header boundary: tarfile itself reads this as a shorter, valid archive
    (shards / "shard-001.tar").write_bytes(whole[:cut])
    with pytest.warns(UserWarning, match="skipped 2"):
        data = open_data(shards / "shard-{000..001}.tar", on_error="skip", verify=True)
    assert [s.id for s in data] == ["s0/0000", "s0/0001", "s0/0002", "s1/0000"]
    assert "s1/0001: sample has no image member" in data.errors.messages[0]
    assert "shard-001.tar: truncated tar shard" in data.errors.messages[1]
    (shards / "shard-001.tar").write_bytes(whole[: png.offset_data + 100])  # inside a member's data
    with pytest.raises(ImageError, match="shard-001.tar: cannot read tar shard"):
        open_data(shards / "shard-{000..001}.tar")


def test_dataset_with_batch_transform_and_shapes_dir(tmp_path: Path) -> None:
    generate_shapes(tmp_path / "w", 12, seed=0, progress=False)
    data = open_data(tmp_path / "w", split="train", label_col="attributes.color")
    assert data.kind == "shapes" and len(data) == 10 and all(s.texts for s in data)

    def batch(images: list[Image.Image]) -> torch.Tensor:
        return torch.stack(
            [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images]
        )

    loader = data.dataset(batch_transform=batch).loader(batch_size=4)
    got = torch.cat([b["images"] for b in loader])
    want = torch.stack([batch([Image.open(s.image).convert("RGB")])[0] for s in data])
    assert got.shape == (10, 3, 64, 64) and torch.equal(got, want)
    assert [s.label for s in data] == [
        json.loads(r)["attributes"]["color"]
        for r in (tmp_path / "w" / "pairs.jsonl").read_text().splitlines()
        if json.loads(r)["split"] == "train"
    ]
    assert len(open_data(tmp_path / "w" / "images.txt")) == 12


def test_dispatch_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere: no such file"):
        open_data(tmp_path / "nowhere")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported file type .bin"):
        open_data(tmp_path / "x.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        open_data(tmp_path / "empty")
    with pytest.raises(ValueError, match="on_error"):
        open_data(tmp_path / "empty", on_error="ignore")


def test_cli_inspect(pairs_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (pairs_dir / "img" / "0.png").write_bytes(b"junk")
    args = ["data", "inspect", str(pairs_dir / "pairs.csv"), "--image-col", "file", "--text-col", "caps"]
    assert main([*args, "--verify", "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "kind:   pairs" in out and "count:  2" in out and "fields: uid, file, caps, title" in out
    assert '"texts": ["cap 1a", "cap 1b"]' in out and "errors: 1 missing or corrupt" in out and "0.png" in out
    assert main([*args, "--verify", "--on-error", "raise"]) == 2
    assert "0.png: cannot decode image" in capsys.readouterr().err
    assert main(["data", "inspect", str(pairs_dir / "pairs.csv"), "--text-col", "nope"]) == 2
    assert "no text column 'nope'" in capsys.readouterr().err
