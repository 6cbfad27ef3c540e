"""freeze-align toy experiment: runs small, trains, and finds the negative CKA-loss correlation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from align.losses import infonce_loss
from align.metrics.cka import linear_cka
from align.metrics.toy import ToyConfig, _clip_loss, pearson, run_toy, save_toy


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return [run_toy(ToyConfig(instances=80, seed=seed)) for seed in (0, 1, 2)]


def test_correlation_is_robustly_negative(results):
    rs = [r["pearson_r"] for r in results]
    assert all(r < -0.15 for r in rs), rs
    assert np.mean(rs) < -0.25, rs


def test_training_lowers_the_loss(results):
    for res in results:
        final = np.array([p["loss"] for p in res["points"]])
        initial = np.array([p["initial_loss"] for p in res["points"]])
        assert (final < initial).all()
        assert np.median(final) < res["chance_loss"]


def test_points_and_correlation_agree_with_independent_computations(results):
    res = results[0]
    cka = np.array([p["cka"] for p in res["points"]])
    loss = np.array([p["loss"] for p in res["points"]])
    assert res["pearson_r"] == pytest.approx(np.corrcoef(cka, loss)[0, 1], abs=1e-6)
    assert len(res["points"]) == 80 and res["config"]["hidden"] == 16 * 16
    assert ((cka > 0) & (cka < 1)).all()


def test_batched_clip_loss_equals_infonce_per_instance():
    a, b = torch.randn(3, 10, 4), torch.randn(3, 10, 4)
    expected = torch.stack([infonce_loss(x, y, 1 / 0.07) for x, y in zip(a, b, strict=True)])
    torch.testing.assert_close(_clip_loss(a, b, 0.07), expected)


def test_noise_free_shared_map_has_cka_one():
    x = torch.randn(32, 16, dtype=torch.float64)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert pearson(torch.arange(5.0), -2 * torch.arange(5.0)) == pytest.approx(-1.0)


def test_one_sided_map_and_save(tmp_path):
    res = run_toy(ToyConfig(instances=10, n=8, d=4, steps=20, side="a", seed=3))
    json_path, png_path = save_toy(res, tmp_path / "out")
    saved = json.loads(Path(json_path).read_text())
    assert saved["config"]["side"] == "a" and len(saved["points"]) == 10
    assert Path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_config():
    with pytest.raises(ValueError, match="side"):
        run_toy(ToyConfig(side="left"))
    with pytest.raises(ValueError, match="n must be >= 2"):
        run_toy(ToyConfig(n=1))
