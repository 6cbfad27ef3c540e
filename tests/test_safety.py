"""Nothing lost, nothing silently wrong: verified checkpoints, safe output directories, the exploding-loss
guard and honest resumes of the shared training loop."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_train import (
    MLP,
    RESUME_CFG,
    Regression,
    assert_same_weights,
    killed_run,
    reference,  # noqa: F401  (the uninterrupted run, a fixture)
    tcfg,
)

from align.integrity import CHECKSUMS_FILE, CorruptFileError, record_checksums, verify_dir
from align.train import train


def flip(path: Path, where: float = 0.5) -> None:
    """Flip one byte in the middle of ``path`` (size unchanged)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin"])
def test_corrupt_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, reference, name, caplog) -> None:  # noqa: F811
    out = tmp_path / "run"
    killed_run(out)
    ckpts = out / "checkpoints"
    assert (ckpts / "step-6" / CHECKSUMS_FILE).is_file()
    flip(ckpts / "step-6" / name)
    with caplog.at_level(logging.WARNING):
        resumed = train(Regression(**MLP), tcfg(**RESUME_CFG), out)
    assert resumed.resumed_from == ckpts / "step-3"
    assert f"step-6/{name}: checkpoint file is corrupt: expected sha256" in caplog.text
    assert_same_weights(reference, out)  # an exact resume from the older checkpoint


def test_no_intact_checkpoint_stops_naming_the_files(tmp_path) -> None:
    out = tmp_path / "run"
    killed_run(out)
    ckpts = out / "checkpoints"
    flip(ckpts / "step-6" / "model.safetensors")
    (ckpts / "step-3" / "optimizer.bin").write_bytes(b"")  # truncated
    with pytest.raises(CorruptFileError) as err:
        train(Regression(**MLP), tcfg(**RESUME_CFG), out)
    assert "step-6/model.safetensors" in str(err.value) and "step-3/optimizer.bin" in str(err.value)
    with pytest.raises(CorruptFileError, match="step-6/model.safetensors: checkpoint file is corrupt"):
        train(Regression(**MLP), tcfg(**RESUME_CFG), out, resume=str(ckpts / "step-6"))


def test_verify_dir_names_missing_and_changed_files(tmp_path) -> None:
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"abcdef")
    (root / "sub" / "b.txt").write_text("hello")
    record_checksums(root)
    assert verify_dir(root)
    (root / "a.bin").write_bytes(b"abcdeX")
    with pytest.raises(CorruptFileError, match=r"a\.bin: .*expected sha256 [0-9a-f]{64}, found [0-9a-f]{64}"):
        verify_dir(root)
    (root / "a.bin").write_bytes(b"abcdef")
    (root / "sub" / "b.txt").unlink()
    with pytest.raises(CorruptFileError, match="b.txt: directory file is missing"):
        verify_dir(root)
    assert verify_dir(tmp_path / "elsewhere", required=False) is False
