"""Nothing lost, nothing silently wrong: verified checkpoints, safe output directories, the exploding-loss
guard and honest resumes of the shared training loop."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
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
from align.io import read_json, read_jsonl
from align.recipes import load_config
from align.rundir import FORMAT, LOCK_FILE, MARKER, OutDir
from align.train.checkpoints import list_checkpoints
from align.train.config import TrainConfig
from align.train.guard import NonFiniteLossError
from align.train.loop import train
from mllm_swap.cli import main


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


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _commands(out: Path, shapes_dir: Path) -> dict[str, list[str]]:
    return {
        "data shapes": ["data", "shapes", "--out", str(out), "--n", "3"],
        "encode": ["encode", "--encoder", "tiny-clip", "--data", str(shapes_dir), "--out", str(out)],
        "align sail": ["align", "sail", "--config", str(RECIPES / "tiny_sail.yaml"), "--out", str(out)],
        "align kernel": ["align", "kernel", "--config", str(RECIPES / "tiny_kuea.yaml"), "--out", str(out)],
        "tune": ["tune", "--config", str(RECIPES / "tiny_llava_connector.yaml"), "--out", str(out)],
        "swap": ["swap", "--mllm", "tiny-llava", "--encoder", "tiny-siglip", "--out", str(out)],
        "merge": ["merge", "--adapter", str(out.parent / "adapter"), "--out", str(out)],
    }


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_foreign_file_in_out_survives_every_command(tmp_path, shapes_dir, capsys, overwrite) -> None:
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "epoch=3.ckpt").write_text("a user's checkpoint")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    for name, argv in _commands(out, shapes_dir).items():
        assert main([*argv, *overwrite]) == 2, name
        err = capsys.readouterr().err
        assert f"{out}: not an output directory of mllm-swap (no run.json)" in err, (name, err)
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before, name
    assert (out / "checkpoints" / "epoch=3.ckpt").read_text() == "a user's checkpoint"


def test_overwrite_clears_only_what_the_run_owns(tmp_path) -> None:
    out = tmp_path / "run"
    train(Regression(), tcfg(steps=4), out)
    assert read_json(out / MARKER)["command"] == "train" and read_json(out / MARKER)["finished"]
    (out / "notes.txt").write_text("keep me")  # a user's file beside our outputs
    with pytest.raises(FileExistsError, match="holds a finished run.*--overwrite"):
        train(Regression(), tcfg(steps=6), out)
    train(Regression(), tcfg(steps=6), out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [2, 4, 6]
    with pytest.raises(
        FileExistsError, match="holds the output of `mllm-swap train`, not of `mllm-swap swap`"
    ):
        OutDir(out, "swap", overwrite=True).check()



def test_a_nested_claim_on_another_rank_joins_the_outer_one(tmp_path, monkeypatch) -> None:
    """Rank 1 of a launch: the loop's "train" claim inside `tune` joins it, whatever rank 0 wrote already."""
    out = tmp_path / "run"
    out.mkdir()
    marker = {"format": FORMAT, "command": "tune", "owns": [], "finished": False}  # rank 0's, written first
    (out / MARKER).write_text(json.dumps(marker))
    monkeypatch.setenv("RANK", "1")
    with OutDir(out, "tune", collective=True), OutDir(out, "train", collective=True) as inner:
        inner.finish()  # the main process records the output, not this one
    assert read_json(out / MARKER) == marker
    assert not (out / LOCK_FILE).exists()


BLOCKING_RUN = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_train import Regression, tcfg
from align.train.loop import train

class Blocking(Regression):
    def loss(self, model, batch):
        if self.calls == 0:
            Path({started!r}).write_text("x")
            while not Path({go!r}).exists():
                time.sleep(0.05)
        return super().loss(model, batch)

train(Blocking(), tcfg(steps=6), {out!r})
"""


def test_two_writers_the_second_is_refused_and_stale_locks_are_taken_over(tmp_path, caplog) -> None:
    out, started, go = tmp_path / "run", tmp_path / "started", tmp_path / "go"
    script = BLOCKING_RUN.format(
        tests=str(Path(__file__).parent), started=str(started), go=str(go), out=str(out)
    )
    first = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        for _ in range(1200):
            if started.exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert started.exists(), "the first run never started"
        with pytest.raises(
            FileExistsError, match=rf"another run is writing here \(`mllm-swap train`, pid {first.pid}"
        ):
            train(Regression(), tcfg(steps=6), out)
        go.write_text("x")
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [2, 4, 6]  # one writer's rows only
    assert not (out / LOCK_FILE).exists()
    # A lock left by a killed run (its process gone) is stale: the next run takes it over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "command": "train"})
    )
    (out / ".tmp-train-killed").mkdir()  # a killed run's temporary directory
    with caplog.at_level(logging.WARNING):
        train(Regression(), tcfg(steps=6), out, overwrite=True)
    assert f"taking over the stale lock of pid {dead.pid}" in caplog.text
    assert not (out / ".tmp-train-killed").exists() and not (out / LOCK_FILE).exists()


def _finite(ckpt: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())


def test_lr_1e30_for_one_step_stops_before_saving(tmp_path) -> None:
    out = tmp_path / "run"
    with pytest.raises(
        NonFiniteLossError, match="after the last step 1; stopped .* Last good checkpoint: none"
    ):
        train(Regression(), tcfg(steps=1, lr=1e30, warmup=0, save_every=0), out)
    assert not (out / "result.json").exists() and not (out / "model.safetensors").exists()


def test_lr_1e30_for_many_steps_keeps_the_last_good_checkpoint(tmp_path) -> None:
    # Linear warmup from 0: step 1 updates with lr 0 (its checkpoint holds sane weights), step 2 with
    # lr 2.5e29, whose checkpoint holds finite weights of ~1e29 that give an infinite loss at step 3.
    out = tmp_path / "run"
    cfg = tcfg(steps=12, lr=1e30, warmup=4, save_every=1, keep_checkpoints=10)
    with pytest.raises(NonFiniteLossError) as err:
        train(Regression(), cfg, out)
    good = out / "checkpoints" / "step-1"
    assert "non-finite loss" in str(err.value) and "at step 3 " in str(err.value)
    assert f"Last good checkpoint: {good}" in str(err.value)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [1] and _finite(good)
    rejected = load_file(str(out / "checkpoints" / "rejected-step-2" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in rejected.values())  # finite, yet not good
    assert max(float(t.abs().max()) for t in rejected.values()) > 1e20
    assert not (out / "result.json").exists()


class Exploding(Regression):
    """The toy whose loss jumps a million-fold (finite) from micro-batch ``at`` on."""

    def __init__(self, at: int, **kw) -> None:
        super().__init__(**kw)
        self.at = at

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        return (loss * 1e6 if self.calls >= self.at else loss), metrics


def test_an_exploding_finite_loss_stops_the_run(tmp_path) -> None:
    out = tmp_path / "run"
    with pytest.raises(
        NonFiniteLossError, match=r"exploding loss .* at step 7 .*Last good checkpoint: .*step-3"
    ):
        train(Exploding(at=7), tcfg(steps=12, save_every=3, keep_checkpoints=1), out)
    # step-6 gave the exploding loss at step 7: set aside; step-3 was kept (keep_checkpoints=1) as known good
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3]
    assert (out / "checkpoints" / "rejected-step-6").is_dir()


def test_a_resume_records_what_it_really_used(tmp_path, reference, caplog) -> None:  # noqa: F811
    out = tmp_path / "run"
    killed_run(out)
    asked = tcfg(**{**RESUME_CFG, "lr": 0.5, "log_every": 1})
    with caplog.at_level(logging.WARNING):
        train(Regression(**MLP), asked, out)
    assert "ignoring the requested changes" in caplog.text and "lr" in caplog.text
    assert_same_weights(reference, out)  # the restored schedule (lr 0.05) was used
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.05 and saved["log_every"] == 1  # bookkeeping settings may change
    assert saved["resumed"] == [
        {"from": "checkpoints/step-6", "step": 6, "ignored": {"lr": {"requested": 0.5, "used": 0.05}}}
    ]
    assert load_config(TrainConfig, out / "config.yaml") == tcfg(**{**RESUME_CFG, "log_every": 1})


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, reference, caplog) -> None:  # noqa: F811
    out = tmp_path / "run"
    killed_run(out)
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 8, "loss": 0.1')  # killed while appending
    with caplog.at_level(logging.WARNING):
        train(Regression(**MLP), tcfg(**RESUME_CFG), out)
    assert "dropping a torn last line" in caplog.text
    rows, ref_rows = read_jsonl(out / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]


@pytest.mark.parametrize(
    "command", [["align", "sail"], ["align", "projector"], ["align", "kernel"], ["tune"]]
)
def test_one_resume_vocabulary_for_every_training_command(command) -> None:
    from mllm_swap.commands import build_parser
    from mllm_swap.commands.options import resume_of

    parse = build_parser().parse_args
    base = [*command, "--config", "r.yaml", "--out", "o"]
    assert (resume_of(parse(base)), parse(base).overwrite) == ("auto", False)
    assert resume_of(parse([*base, "--resume"])) == "auto"
    assert resume_of(parse([*base, "--resume", "o/checkpoints/step-4"])) == "o/checkpoints/step-4"
    assert resume_of(parse([*base, "--no-resume", "--overwrite"])) is False
    assert parse([*base, "--overwrite"]).overwrite
    with pytest.raises(SystemExit):
        parse([*base, "--resume", "--no-resume"])


def test_cli_align_at_lr_1e30_exits_non_zero_without_an_artifact(tmp_path, shapes_dir, capsys) -> None:
    out = tmp_path / "run"
    sets = [f"data.train={shapes_dir}", "vision=tiny-dinov2-random", "text=tiny-text", "train.batch_size=32",
            "train.report_to=[jsonl]"]  # fmt: skip
    sets += ["train.steps=1", "train.lr=1e30", "train.warmup=0"]
    argv = ["align", "projector", "--config", str(RECIPES / "tiny_freeze_align.yaml"), "--out", str(out)]
    assert main([*argv, *(x for s in sets for x in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert "after the last step 1; stopped without saving the final weights" in err
    assert not (out / "artifact").exists() and not (out / "result.json").exists()
