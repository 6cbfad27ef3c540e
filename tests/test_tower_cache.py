"""Cached connector pretraining: with the frozen tower's tokens read from an embedding cache, a tuning stage
computes the same loss per step as with the live tower (up to the cache's storage precision) and saves the
same checkpoint; a cache that is not what the model consumes is refused, naming what differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.data.cache import write_cache
from align.errors import UserError
from align.io import read_jsonl
from align.load import load_vision_encoder
from align.train.config import TrainConfig
from mllm_swap.checkpoints import load_mllm
from mllm_swap.tune.config import TuneConfig
from mllm_swap.tune.stage import run_tune

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(shapes_dir: Path, **kw) -> TuneConfig:
    return TuneConfig(
        model="tiny-llava", data=shapes_dir / "instruct.json", image_folder=shapes_dir, stage="connector",
        max_length=256, train=TrainConfig(steps=4, batch_size=4, lr=1e-2, log_every=1, report_to=["jsonl"],
                                          save_every=0), **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def live(tmp_path_factory, shapes_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("live") / "run"
    run_tune(_cfg(shapes_dir), out)
    return out


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(run / "metrics.jsonl")]


@pytest.mark.parametrize(("dtype", "rtol"), [("fp32", 1e-6), ("fp16", 1e-4)])
def test_cached_stage_losses_equal_the_live_towers(
    live: Path, shapes_dir: Path, tmp_path: Path, dtype, rtol
) -> None:
    cache = write_cache(
        "tiny-clip", shapes_dir, tmp_path / "cache", pool="tokens", layer=-2, prefix="drop", dtype=dtype
    )
    run_tune(_cfg(shapes_dir, tower_cache=cache), tmp_path / "cached")
    expected, got = _losses(live), _losses(tmp_path / "cached")
    assert len(got) == len(expected) == 4 and len(set(expected)) == 4  # four different steps
    assert got == pytest.approx(expected, rel=rtol)
    if dtype == "fp16":  # storage precision shows: not bit-equal
        assert got != expected
    a, b = (load_mllm(run).model.state_dict() for run in (live, tmp_path / "cached"))
    assert a.keys() == b.keys()  # the tower is saved back in place
    for key in a:  # fp32 tokens: the same weights; fp16: the connector within what its gradients saw
        same = torch.equal(a[key], b[key])
        near = torch.allclose(a[key], b[key], rtol=0, atol=1e-3)
        assert same or (dtype == "fp16" and ".multi_modal_projector." in key and near), key


def _perturbed_clip():
    enc = load_vision_encoder("tiny-clip")
    with torch.no_grad():
        enc.model.vision_model.encoder.layers[0].mlp.fc1.weight.mul_(1.5)
    return enc


def _mirroring_clip():
    """tiny-clip whose preprocessing mirrors the images: the same model, other preprocessing."""
    from PIL import Image

    enc = load_vision_encoder("tiny-clip")
    transform = enc.preprocess.transform
    enc.preprocess.transform = lambda images: transform(
        [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]
    )
    return enc


@pytest.mark.parametrize(
    ("encoder", "layer", "prefix", "message"),
    [
        ("tiny-clip", -1, "drop", "layer -1 in the cache, the model consumes layer -2"),
        ("tiny-clip", -2, "keep", "65 tokens of width 64 per image in the cache, the model consumes 64 of width 64"),
        ("tiny-dinov2-random", -2, "drop", "64 tokens of width 96 per image in the cache, the model consumes 64 of width 64"),
        (_perturbed_clip, -2, "drop", "model fingerprint differs"),
        (_mirroring_clip, -2, "drop", "written with other preprocessing or other images"),
    ],
)  # fmt: skip
def test_a_cache_of_something_else_is_refused(
    shapes_dir: Path, tmp_path: Path, encoder, layer, prefix, message
) -> None:
    enc = encoder() if callable(encoder) else encoder
    cache = write_cache(
        enc, shapes_dir, tmp_path / "cache", pool="tokens", layer=layer, prefix=prefix, dtype="fp16"
    )
    with pytest.raises(UserError, match="does not match the model") as err:
        run_tune(_cfg(shapes_dir, tower_cache=cache), tmp_path / "run")
    assert message in str(err.value)


def test_tower_cache_needs_a_frozen_tower(shapes_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="frozen tower"):
        _cfg(shapes_dir, tower_cache=tmp_path, unfreeze_tower=True)
