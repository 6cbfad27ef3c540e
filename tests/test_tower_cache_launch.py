"""Cached connector pretraining on the roads: under ``accelerate launch`` with two CPU processes (DDP over gloo)
and under the shipped DeepSpeed ZeRO-2 and ZeRO-3 accelerate configs as shipped, the tiny connector recipe with
``tower_cache`` feeds every image's tokens from the cache (``cached_images`` per step) and logs the loss per step
of a plain one-process run with the live tower at the same global batch; the saved model holds the real tower.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_distributed import RECIPES, launch, sets, start_line

from align.data.cache import write_cache
from align.io import read_json, read_jsonl
from mllm_swap.checkpoints import load_mllm
from mllm_swap.cli import main

pytestmark = pytest.mark.slow

STEPS = 3


def _args(shapes_dir: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    args = ["tune", "--config", str(RECIPES / "tiny_llava_connector.yaml"), "--out", str(out)]
    return args + sets(
        f"data={shapes_dir / 'instruct.json'}",
        f"image_folder={shapes_dir}",
        "eval_vqa=null",
        f"train.steps={STEPS}",
        f"train.batch_size={batch_size}",
        "train.lr=1e-2",
        "train.save_every=0",
        "train.log_every=1",
        "train.report_to=[jsonl]",
        *extra,
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> Path:
    """The live tower in one plain process at global batch 4."""
    out = tmp_path_factory.mktemp("live") / "run"
    assert main(_args(shapes_dir, out, 4)) == 0
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> Path:
    """tiny-llava's tower (tiny-clip) tokens at layer -2, prefix dropped, fp32: bit-equal storage."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    return write_cache("tiny-clip", shapes_dir, out, pool="tokens", layer=-2, prefix="drop", dtype="fp32")


def _check_against_live(run: Path, live: Path) -> None:
    rows, single = read_jsonl(run / "metrics.jsonl"), read_jsonl(live / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and len({r["loss"] for r in single}) == STEPS
    for row, ref in zip(rows, single, strict=True):
        assert row["cached_images"] == 4  # every image of the global batch came from the cache
        assert "cached_images" not in ref
        assert (row["tokens"], row["label_tokens"]) == (ref["tokens"], ref["label_tokens"])
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    # as loaded (under ZeRO-3 the file names the model's own module paths; the checkpoint's layout loads the same)
    got, expected = (load_mllm(r).model.state_dict() for r in (run, live))
    assert got.keys() == expected.keys()
    tower = [k for k in expected if ".vision_tower." in k]
    assert tower and all(torch.equal(got[k], expected[k]) for k in tower)  # the real tower, whole, in place
    for key in expected:
        same = torch.equal(got[key], expected[key])
        assert same or (".multi_modal_projector." in key and (got[key] - expected[key]).abs().max() <= 1e-5), key


def test_cached_stage_two_processes_equal_the_live_tower(
    live: Path, cache: Path, shapes_dir: Path, tmp_path: Path
) -> None:
    """Two processes at batch 2 each read their own images' tokens from the cache."""
    out = tmp_path / "two"
    stdout = launch(_args(shapes_dir, out, 2, f"tower_cache={cache}"))
    line = start_line(stdout)
    assert "world size 2 (MULTI_CPU), batch 2 per process x 1 accumulation = 4 global" in line, line
    assert read_json(out / "result.json")["launch"]["engine"] == "DistributedDataParallel"
    _check_against_live(out, live)


@pytest.mark.parametrize(("stage", "processes"), [(2, 1), (3, 2)])
def test_cached_stage_under_shipped_zero(
    stage: int, processes: int, live: Path, cache: Path, shapes_dir: Path, tmp_path: Path
) -> None:
    """The shipped ZeRO-2 / ZeRO-3 accelerate configs as shipped (ZeRO-3 over two processes partitions the model
    at load across them: the tower leaves it before DeepSpeed wraps it, gathered whole, and comes back whole for
    saving)."""
    pytest.importorskip("deepspeed")
    out = tmp_path / f"zero{stage}"
    config = RECIPES / "accelerate" / f"deepspeed_zero{stage}.yaml"
    args = _args(shapes_dir, out, 4 // processes, f"tower_cache={cache}")
    line = start_line(launch(args, processes=processes, config_file=config))
    assert f"world size {processes} (DEEPSPEED), batch {4 // processes} per process" in line, line
    assert f"DeepSpeed ZeRO-{stage} (DeepSpeedEngine)" in line, line
    launched = read_json(out / "result.json")["launch"]
    assert (launched["engine"], launched["zero_stage"]) == ("DeepSpeedEngine", stage)
    _check_against_live(out, live)
