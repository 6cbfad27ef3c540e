"""The swap-success model and ``mllm-swap predict``: LOEO honesty numbers recomputed by hand, the CLI's ranking."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mllm_swap.cli import main
from mllm_swap.measure import NAMES
from mllm_swap.predict.model import ALPHAS, FEATURES, KEYS, LEVEL, conformal_halfwidth, fit, read_table

ENCODERS = ("enc-a", "enc-b", "enc-c", "enc-d", "enc-e")


def write_synthetic(path: Path, rows: int | None = None, drop: str | None = None, bad: str | None = None) -> Path:
    """A calibration table whose change is a noisy linear function of two measurements (5 encoders x 2 modes x
    2 seeds); ``drop`` leaves a column out, ``bad`` puts a non-number in the first row of that column."""
    rng = np.random.default_rng(0)
    out = []
    for e, encoder in enumerate(ENCODERS):
        for mode in ("bridge", "rebuild"):
            m = {name: float(rng.uniform(0, 1)) for name in NAMES}
            m["token_cka"] = 0.15 * e + 0.1 * (mode == "bridge") + 0.05 * rng.uniform()
            for seed in (0, 1):
                change = 0.3 * m["token_cka"] - 0.1 * m["probe_old"] + 0.02 * rng.normal()
                out.append({"encoder": encoder, "mode": mode, "seed": seed, "measured_change": change,
                            "measured_se": 0.03, **m})  # fmt: skip
    out = out[:rows]
    if bad:
        out[0][bad] = "n/a"
    columns = [c for c in (*KEYS, *NAMES) if c != drop]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(out)
    return path


def ridge_by_hand(x: np.ndarray, y: np.ndarray, swaps: np.ndarray, x_new: np.ndarray) -> np.ndarray:
    """scikit-learn's StandardScaler + Ridge, the penalty chosen by its grid search with leave-one-group-out
    folds over the swaps (mean squared error, first best on a tie), refitted on all rows: a second computation."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": list(ALPHAS)},
                          cv=LeaveOneGroupOut(), scoring="neg_mean_squared_error")  # fmt: skip
    return search.fit(x, y, groups=swaps).predict(x_new)


def ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank (a swap's seeds share its measurements)."""
    return np.array([(v < a).sum() + ((v == a).sum() + 1) / 2 for a in v])


def test_leave_one_encoder_out_numbers_match_a_direct_recomputation(tmp_path):
    table = read_table(write_synthetic(tmp_path / "calibration.csv"))
    fitted = fit(table)
    loeo = fitted.record["leave_one_encoder_out"]
    groups, swaps = np.array(table.encoders), np.array(
        [f"{e}:{m}" for e, m in zip(table.encoders, table.modes, strict=True)])
    expected = np.empty(len(table.y))
    for encoder in ENCODERS:
        held = groups == encoder
        expected[held] = ridge_by_hand(table.x[~held], table.y[~held], swaps[~held], table.x[held])
    np.testing.assert_allclose(loeo["predictions"], expected, rtol=1e-6, atol=1e-9)
    rho = np.corrcoef(ranks(expected), ranks(table.y))[0, 1]
    assert loeo["spearman"] == pytest.approx(rho, abs=1e-9)
    assert loeo["mae"] == pytest.approx(np.mean(np.abs(expected - table.y)), abs=1e-12)
    assert loeo["spearman"] > 0.5 and loeo["spearman_permutation_p"] < 0.05  # found without the held-out encoder
    residuals = np.sort(np.abs(table.y - expected))
    assert fitted.halfwidth == pytest.approx(residuals[math.ceil((len(residuals) + 1) * LEVEL) - 1])
    row = {name: float(table.x[3, i]) for i, name in enumerate(FEATURES)}
    value, (lo, hi) = fitted.predict(row, "row 3")
    assert value == pytest.approx(ridge_by_hand(table.x, table.y, swaps, table.x[3:4])[0], rel=1e-6)
    assert (lo, hi) == pytest.approx((value - fitted.halfwidth, value + fitted.halfwidth))


def test_conformal_halfwidth_rank_and_small_samples():
    assert conformal_halfwidth(np.arange(1.0, 21.0), 0.9) == (19.0, "")  # ceil(21 * 0.9) = 19th smallest
    width, note = conformal_halfwidth(np.array([0.1, -0.3, 0.2]), 0.9)
    assert width == 0.3 and "too few" in note


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"drop": "token_cka"}, "missing column(s) ['token_cka']"),
        ({"drop": "measured_change"}, "missing column(s) ['measured_change']"),
        ({"rows": 4}, "4 row(s) over 1 encoder(s)"),
        ({"bad": "llm_input_cka"}, "column 'llm_input_cka': expected a finite number, found 'n/a'"),
    ],
)
def test_predict_refuses_bad_tables(tmp_path, capsys, kwargs, message):
    table = write_synthetic(tmp_path / "bad.csv", **kwargs)
    code = main(["predict", "--mllm", "tiny-llava", "--encoder", "tiny-siglip", "--calibration", str(table),
                 "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "bad.csv" in err


@pytest.mark.parametrize(
    "encoder, mode, message",
    [
        ("tiny-nonexistent", None, "--encoder tiny-nonexistent: cannot load 'tiny-nonexistent'"),
        ("tiny-siglip", "sideways", "--mode: unknown mode(s) ['sideways']"),
        ("tiny-siglip", "fuse", "--encoder tiny-siglip: --mode fuse needs a pair A+B"),
    ],
)
def test_predict_refuses_bad_candidates(tmp_path, capsys, encoder, mode, message):
    table = write_synthetic(tmp_path / "calibration.csv")
    argv = ["predict", "--mllm", "tiny-llava", "--encoder", encoder, "--calibration", str(table),
            "--out", str(tmp_path / "out"), *(["--mode", mode] if mode else [])]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_predict_ranks_candidates_by_the_fitted_model(tmp_path, shapes_dir, one_thread):
    table = write_synthetic(tmp_path / "calibration.csv")
    json.dump({"budget": {"measure_images": 12, "bridge_steps": 2}}, (tmp_path / "calibration.json").open("w"))
    out = tmp_path / "pred"
    argv = ["predict", "--mllm", "tiny-llava", "--encoder", "tiny-clip,tiny-dinov2-random", "--mode", "rebuild",
            "--data", str(shapes_dir), "--calibration", str(table), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "predictions.json").read_text())
    rows = record["candidates"]
    assert sorted((r["encoder"], r["mode"]) for r in rows) == [("tiny-clip", "rebuild"), ("tiny-dinov2-random", "rebuild")]
    assert [r["rank"] for r in rows] == [1, 2]
    assert rows[0]["predicted_change"] >= rows[1]["predicted_change"]
    fitted = fit(read_table(table))
    for r in rows:  # each prediction is the model applied to the measurements its swap report holds
        report = json.loads((out / r["swap"] / "swap_report.json").read_text())
        assert r["measurements"] == report["measurements"] and report["measured_on"]["images"] == 12
        value, interval = fitted.predict(report["measurements"], r["encoder"])
        assert r["predicted_change"] == pytest.approx(value) and r["interval"] == pytest.approx(interval)
    cal = record["calibration"]
    assert cal["rows"] == 20 and cal["leave_one_encoder_out"]["spearman"] is not None
    assert "rank | encoder" in (out / "predictions.md").read_text()


def test_shipped_table_refits_to_its_record():
    from mllm_swap.predict.rank import shipped_table

    record = json.loads(shipped_table().with_suffix(".json").read_text())["calibration"]
    refit = fit(read_table(shipped_table())).record
    assert refit["rows"] == record["rows"] >= 12 and len(refit["encoders"]) >= 5
    for key in ("spearman", "spearman_permutation_p", "mae", "mae_predicting_the_mean", "rows_beyond_2se", "predictions"):
        assert refit["leave_one_encoder_out"][key] == pytest.approx(record["leave_one_encoder_out"][key]), key
    assert refit["fit"]["coefficients"] == pytest.approx(record["fit"]["coefficients"])


def test_calibrate_refuses_a_bad_swap_list(tmp_path, capsys):
    assert main(["calibrate", "--out", str(tmp_path / "cal"), "--swaps", "tiny-siglip:sideways"]) == 2
    assert "--swaps 'tiny-siglip:sideways': expected ENCODER:MODE" in capsys.readouterr().err
    assert not (tmp_path / "cal").exists()  # refused before anything ran
