"""Trackers of the training loop: wandb (offline) records the same numbers as ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from align.io import read_jsonl
from align.train.config import TrainConfig
from align.train.loop import train


class Line:
    """A toy method: fit y = 3x with one linear unit."""

    def __init__(self) -> None:
        self.x = torch.linspace(-1, 1, 32).unsqueeze(1)
        self.y = 3 * self.x

    def build_model(self, cfg):
        return nn.Linear(1, 1)

    def train_dataset(self):
        return TensorDataset(self.x, self.y)

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean(), {}

    def save(self, model, out_dir, state_dict):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out_dir / "model.safetensors"))


def wandb_history(run_dir: Path) -> tuple[list[dict], dict, Any]:
    """History rows, config and run record of an offline wandb run, read back from its ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    (record_file,) = run_dir.glob("offline-run-*/run-*.wandb")
    store = DataStore()
    store.open_for_scan(str(record_file))
    rows, config, run = [], {}, None
    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "run":
            run = record.run
        elif kind == "config":
            config.update(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.config.update}
            )
    return rows, config, run


def test_wandb_tracker_writes_the_logged_metrics_offline(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "mllm-swap-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    out = tmp_path / "run"
    cfg = TrainConfig(steps=6, batch_size=8, lr=0.1, log_every=2, save_every=0, report_to=["jsonl", "wandb"])
    train(Line(), cfg, out)
    logged = read_jsonl(out / "metrics.jsonl")
    rows, config, run = wandb_history(out / "wandb")
    assert run.project == "mllm-swap-test" and run.display_name == "run"
    assert [r["_step"] for r in rows] == [r["step"] for r in logged] == [2, 4, 6]
    for row, jsonl in zip(rows, logged, strict=True):
        assert row["loss"] == pytest.approx(jsonl["loss"], rel=1e-6) and row["lr"] == pytest.approx(
            jsonl["lr"]
        )
    assert config["lr"] == 0.1 and config["steps"] == 6
    (run,) = (out / "wandb").glob("offline-run-*")
    assert (run / "files" / "requirements.txt").is_file()
