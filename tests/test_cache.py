"""Embedding cache: round trip against direct encoding, resume after a kill, corrupt shards redone."""

from __future__ import annotations

import json

import pytest
import torch

from align.data import cache as cache_mod
from align.data.cache import write_cache
from align.data.cache_read import EmbeddingCache
from align.data.images import open_image
from align.data.readers import open_data
from align.integrity import CorruptFileError
from align.load import load_text_encoder, load_vision_encoder
from mllm_swap.cli import main


def test_round_trip_equals_direct_encoding(shapes_dir, tmp_path) -> None:
    enc = load_vision_encoder("tiny-dinov2-random")
    out = write_cache(
        enc, shapes_dir, tmp_path / "c", pool="concat", dtype="fp32", shard_size=40, batch_size=16
    )
    cache = EmbeddingCache(out, verify=True)
    data = open_data(shapes_dir)
    assert len(cache) == len(data) and cache.ids == [s.id for s in data]
    rows = [95, 0, 41, 40, 7]
    direct = enc.encode_images([open_image(data[r].image) for r in rows], pool="concat")
    torch.testing.assert_close(cache.get(rows), direct, rtol=1e-5, atol=1e-5)
    assert cache.manifest["encoder"]["source"] == "tiny-dinov2-random" and len(cache.manifest["shards"]) == 3


def test_text_caches_pair_with_image_caches(shapes_dir, tmp_path) -> None:
    txt = load_text_encoder("tiny-text")
    out = write_cache(txt, shapes_dir, tmp_path / "t", modality="text", pool="sentence", dtype="fp32")
    cache = EmbeddingCache(out)
    data = open_data(shapes_dir)
    torch.testing.assert_close(cache.get([3]), txt.encode([data[3].texts[0]]), rtol=1e-5, atol=1e-5)
    tokens = EmbeddingCache(
        write_cache(
            txt, shapes_dir, tmp_path / "tt", modality="text", pool="tokens", max_tokens=12, dtype="bf16"
        )
    )
    emb, mask = tokens.get([0, 1])
    assert emb.shape == (2, 12, 64) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert (emb[~mask] == 0).all()


def _digest(cache: EmbeddingCache) -> torch.Tensor:
    return cache.get(list(range(len(cache))))


def test_kill_and_resume_equals_uninterrupted(shapes_dir, tmp_path, monkeypatch) -> None:
    enc = load_vision_encoder("tiny-clip")
    full = EmbeddingCache(write_cache(enc, shapes_dir, tmp_path / "full", pool="cls", shard_size=32))

    real = cache_mod._write_shard
    calls = []

    def dies_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # the process is killed while encoding the second shard
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_write_shard", dies_after_first)
    with pytest.raises(KeyboardInterrupt):
        write_cache(enc, shapes_dir, tmp_path / "resumed", pool="cls", shard_size=32)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        EmbeddingCache(tmp_path / "resumed")

    monkeypatch.setattr(cache_mod, "_write_shard", real)
    redone = []
    monkeypatch.setattr(cache_mod, "_write_shard", lambda *a, **k: (redone.append(a[3]), real(*a, **k)))
    resumed = EmbeddingCache(write_cache(enc, shapes_dir, tmp_path / "resumed", pool="cls", shard_size=32))
    assert redone == [1, 2]  # the finished shard 0 was kept
    torch.testing.assert_close(_digest(resumed), _digest(full))


def test_corrupt_shard_is_detected_and_redone(shapes_dir, tmp_path, monkeypatch) -> None:
    enc = load_vision_encoder("tiny-clip")
    out = write_cache(enc, shapes_dir, tmp_path / "c", pool="mean", shard_size=32)
    before = _digest(EmbeddingCache(out))
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])  # inside the tensor data
    shard.write_bytes(bytes(data))  # same size, readable, wrong values
    with pytest.raises(CorruptFileError, match="shard-00001.safetensors: cache shard is corrupt: expected sha256"):
        EmbeddingCache(out)  # verified by default (once per file, remembered while unchanged)
    assert not torch.equal(_digest(EmbeddingCache(out, verify=False)), before)  # unverified: garbage
    redone = []
    real = cache_mod._write_shard
    monkeypatch.setattr(cache_mod, "_write_shard", lambda *a, **k: (redone.append(a[3]), real(*a, **k)))
    write_cache(enc, shapes_dir, out, pool="mean", shard_size=32)  # resume checks sha256, not only size
    assert redone == [1]
    torch.testing.assert_close(_digest(EmbeddingCache(out)), before)

    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match="truncated"):
        EmbeddingCache(out)
    redone.clear()
    write_cache(enc, shapes_dir, out, pool="mean", shard_size=32)
    assert redone == [1]
    torch.testing.assert_close(_digest(EmbeddingCache(out, verify=True)), before)


def test_settings_mismatch_and_bad_requests(shapes_dir, tmp_path) -> None:
    enc = load_vision_encoder("tiny-siglip")
    write_cache(enc, shapes_dir, tmp_path / "c", pool="mean", shard_size=64)
    with pytest.raises(ValueError, match="different settings"):
        write_cache(enc, shapes_dir, tmp_path / "c", pool="mean", shard_size=32)
    with pytest.raises(ValueError, match="pooling 'cls' not available"):
        write_cache(enc, shapes_dir, tmp_path / "d", pool="cls")
    with pytest.raises(ValueError, match="not valid for text caches"):
        write_cache(
            load_text_encoder("tiny-text"), shapes_dir, tmp_path / "e", modality="text", pool="concat"
        )
    with pytest.raises(ValueError, match="no caption #5"):
        write_cache(
            load_text_encoder("tiny-text"),
            shapes_dir,
            tmp_path / "f",
            modality="text",
            pool="sentence",
            caption_index=5,
        )


def test_skip_mode_counts_corrupt_images(shapes_dir, tmp_path) -> None:
    rows = [json.loads(line) for line in (shapes_dir / "pairs.jsonl").read_text().splitlines()[:10]]
    for row in rows:
        row["image"] = str(shapes_dir / row["image"])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows[4]["image"] = str(tmp_path / "bad.png")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="bad.png"):
        cache = EmbeddingCache(write_cache("tiny-clip", pairs, tmp_path / "c", pool="cls", on_error="skip"))
    assert len(cache) == 9 and cache.manifest["skipped"] == 1 and rows[4]["id"] not in cache.ids
    assert list(cache.source_rows) == [0, 1, 2, 3, 5, 6, 7, 8, 9]


def test_cli_encode_and_errors(shapes_dir, tmp_path, capsys) -> None:
    assert (
        main(
            [
                "encode",
                "--encoder",
                "tiny-dinov2-reg-random",
                "--data",
                str(shapes_dir),
                "--pool",
                "cls",
                "--out",
                str(tmp_path / "c"),
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    assert "96 rows x 96" in capsys.readouterr().out
    assert (
        main(
            [
                "encode",
                "--encoder",
                "tiny-dinov2-random",
                "--data",
                str(tmp_path / "missing.jsonl"),
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 2
    )
    assert "missing.jsonl" in capsys.readouterr().err
    assert (
        main(
            ["encode", "--encoder", "no-such-model", "--data", str(shapes_dir), "--out", str(tmp_path / "e")]
        )
        == 2
    )
    assert "no-such-model" in capsys.readouterr().err


def test_manifest_edits_disagreeing_with_shards_are_refused(shapes_dir, tmp_path) -> None:
    """The manifest is cross-checked with its shards: rows, ids and the shard's own record."""
    out = write_cache(load_vision_encoder("tiny-clip"), shapes_dir, tmp_path / "c", pool="mean", shard_size=40)
    manifest_file = out / "manifest.json"
    clean = json.loads(manifest_file.read_text())
    edits = {
        "rows": lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] - 5),
        "total rows": lambda m: m.update(rows=m["rows"] - 5),
        "ids": lambda m: m["shards"][1]["ids"].reverse(),
    }
    for name, edit in edits.items():
        manifest = json.loads(json.dumps(clean))
        edit(manifest)
        manifest_file.write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="manifest") as err:
            EmbeddingCache(out)
        assert str(manifest_file) in str(err.value), name
    manifest_file.write_text(json.dumps(clean))
    assert len(EmbeddingCache(out)) == 96


def test_verification_is_remembered_until_the_file_changes(shapes_dir, tmp_path, monkeypatch) -> None:
    from align import integrity

    out = write_cache(load_vision_encoder("tiny-clip"), shapes_dir, tmp_path / "c", pool="mean", shard_size=40)
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: (hashed.append(p), real(p))[1])
    EmbeddingCache(out)
    first = len(hashed)
    EmbeddingCache(out)
    assert first == 3 and len(hashed) == first  # three shards hashed once, then remembered
    shard = out / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes())  # same bytes, rewritten: checked again
    EmbeddingCache(out)
    assert hashed[first:] == [shard]
