"""``mllm-swap calibrate`` end to end at a tiny budget (its table then ranks ``predict``'s candidates), and the
base-LLaVA recipe the demo and the calibration share."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from mllm_swap.base_llava import BaseSize, base_llava
from mllm_swap.cli import main
from mllm_swap.predict.calibrate import KINDS, row
from mllm_swap.predict.model import FEATURES, fit, read_table

# The demo's base stage (full size, world seed 0) as it ran before the recipe moved out of the demo: a finished
# run skips its stages on rerun only while these lines stay the same.
DEMO_BASE = """\
swap --mllm tiny-llava --encoder models/clip --mode dropin --out 002_sail/mllm/base-untuned --overwrite
tune --config recipes/tiny_llava_lora.yaml --set model=002_sail/mllm/base-untuned \
--set data=000_world/shapes/instruct.json --set image_folder=000_world/shapes --set shapes=null --set eval_vqa=null \
--set train.steps=200 --set train.seed=0 --out 002_sail/tune/base-language --overwrite
merge --adapter 002_sail/tune/base-language --out 002_sail/mllm/base-language --overwrite
swap --mllm 002_sail/mllm/base-language --encoder models/clip --mode rebuild --out 002_sail/mllm/base-rebuild --overwrite
tune --config recipes/tiny_llava_connector.yaml --set model=002_sail/mllm/base-rebuild \
--set data=000_world/shapes/instruct.json --set image_folder=000_world/shapes --set shapes=null --set eval_vqa=null \
--set train.steps=40 --set train.seed=0 --out 002_sail/tune/base-connector --overwrite
tune --config recipes/tiny_llava_lora.yaml --set model=002_sail/tune/base-connector \
--set data=000_world/shapes/instruct.json --set image_folder=000_world/shapes --set shapes=null --set eval_vqa=null \
--set train.steps=200 --set train.seed=0 --out 002_sail/tune/base-lora --overwrite
merge --adapter 002_sail/tune/base-lora --out 002_sail/mllm/base --overwrite"""


def test_the_demo_runs_the_base_recipe_it_ran_before():
    from mllm_swap.demo.pipeline import FULL, Plan, build_stages

    stage = next(s for s in build_stages(Plan(FULL), lambda argv: 0) if s.name == "002_sail-base")
    assert stage.command.splitlines() == [f"mllm-swap {line}" for line in DEMO_BASE.splitlines()]


def test_a_row_is_the_arm_minus_its_control_with_binomial_errors():
    arm = {"vqa_accuracy": 0.5, "vqa_n": 400, "vqa_color": 0.9, "vqa_shape": 0.6, "vqa_count": 0.4, "vqa_position": 0.1}
    control = {"vqa_accuracy": 0.45, "vqa_n": 100, "vqa_color": 0.95, "vqa_shape": 0.5, "vqa_count": 0.25,
               "vqa_position": 0.1}  # fmt: skip
    r = row("enc", "bridge", 3, arm, control, {"token_cka": 0.7})
    assert (r["encoder"], r["mode"], r["seed"], r["token_cka"]) == ("enc", "bridge", 3, 0.7)
    assert (r["vqa"], r["control_vqa"], r["measured_change"]) == pytest.approx((0.5, 0.45, 0.05))
    assert r["measured_se"] == pytest.approx(math.sqrt(0.25 / 400 + 0.45 * 0.55 / 100))  # 0.0541
    changes = {"change_color": -0.05, "change_shape": 0.1, "change_count": 0.15, "change_position": 0.0}
    assert {k: r[k] for k in changes} == pytest.approx(changes)


SWAPS = (("tiny-clip", "dropin"), ("tiny-siglip", "bridge"), ("tiny-dinov2-random", "bridge"))
TINY = ["--seeds", "2", "--shapes", "40", "--base-steps", "2", "--base-lora-steps", "2", "--connector-steps", "1",
        "--lora-steps", "2", "--bridge-steps", "1", "--eval-limit", "16", "--measure-images", "8"]  # fmt: skip


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_calibrate_builds_a_table_that_predict_ranks_candidates_with(tmp_path, one_thread):
    out = tmp_path / "cal"
    argv = ["calibrate", "--out", str(out), "--swaps", ",".join(f"{e}:{m}" for e, m in SWAPS), *TINY]
    assert main(argv) == 0
    rows = read_rows(out / "calibration.csv")
    assert [(r["encoder"], r["mode"], int(r["seed"])) for r in rows] == [(e, m, s) for s in (0, 1) for e, m in SWAPS]
    for r in rows:  # each change recomputed from the arm's and its control's own tuning outputs
        folder = out / "tune" / f"s{r['seed']}"
        arm = json.loads((folder / f"{r['encoder']}-{r['mode']}-lora" / "result.json").read_text())["eval"]
        control = json.loads((folder / "control-keep-lora" / "result.json").read_text())["eval"]
        p, n, q, m = arm["vqa_accuracy"], arm["vqa_n"], control["vqa_accuracy"], control["vqa_n"]
        assert n == m == 16
        assert float(r["measured_change"]) == pytest.approx(p - q)
        assert float(r["measured_se"]) == pytest.approx(math.sqrt(p * (1 - p) / n + q * (1 - q) / m))
        for kind in KINDS:
            assert float(r[f"change_{kind}"]) == pytest.approx(arm[f"vqa_{kind}"] - control[f"vqa_{kind}"])
        report = json.loads((out / "swaps" / f"{r['encoder']}-{r['mode']}" / "swap_report.json").read_text())
        assert {f: float(r[f]) for f in FEATURES} == pytest.approx({f: report["measurements"][f] for f in FEATURES})
    # the base is the shared recipe's (each step's finishing file is there), scored; no rebuild-like swap, no
    # rebuild control
    steps = base_llava("tiny-clip-shapes", "world", "mllm", "tune", "mllm/base", BaseSize(2, 1, 2), 0)
    assert all((out / done).is_file() for _, done in steps)
    assert not (out / "swaps" / "tiny-clip-shapes-rebuild").exists()
    record = json.loads((out / "calibration.json").read_text())
    assert record["base_vqa"]["vqa_n"] == 16 and record["commands_run"] == 1 + len(steps) + 3 + 2 * 4
    refit = fit(read_table(out / "calibration.csv")).record["leave_one_encoder_out"]
    loeo = record["calibration"]["leave_one_encoder_out"]
    assert loeo["predictions"] == pytest.approx(refit["predictions"])
    assert {k: loeo[k] for k in ("mae", "mae_predicting_the_mean", "rows_beyond_2se", "spearman")} == pytest.approx(
        {k: refit[k] for k in ("mae", "mae_predicting_the_mean", "rows_beyond_2se", "spearman")})  # fmt: skip
    assert main(argv) == 0  # a rerun finds every step done
    again = json.loads((out / "calibration.json").read_text())
    assert (again["commands_run"], again["commands_skipped"]) == (0, record["commands_run"])

    pred = tmp_path / "pred"
    assert main(["predict", "--mllm", str(out / "mllm" / "base"), "--encoder", "tiny-dinov2-random,tiny-siglip",
                 "--mode", "bridge", "--data", str(out / "world"), "--calibration", str(out / "calibration.csv"),
                 "--out", str(pred)]) == 0  # fmt: skip
    ranked = json.loads((pred / "predictions.json").read_text())
    assert ranked["calibration"]["rows"] == 6 and ranked["calibration"]["source"].endswith("calibration.csv")
    fitted = fit(read_table(out / "calibration.csv"))
    candidates = ranked["candidates"]
    assert [c["rank"] for c in candidates] == [1, 2] and {c["encoder"] for c in candidates} == {"tiny-siglip",
                                                                                               "tiny-dinov2-random"}
    assert candidates[0]["predicted_change"] >= candidates[1]["predicted_change"]
    for c in candidates:  # measured as the calibration measured (its budget), predicted by the table's model
        report = json.loads((pred / c["swap"] / "swap_report.json").read_text())
        assert report["measured_on"]["images"] == 8
        value, interval = fitted.predict(report["measurements"], c["encoder"])
        assert c["predicted_change"] == pytest.approx(value) and c["interval"] == pytest.approx(interval)
    siglip = next(c for c in candidates if c["encoder"] == "tiny-siglip")  # the same swap as the table's 2nd row
    assert {f: siglip["measurements"][f] for f in FEATURES} == pytest.approx({f: float(rows[1][f]) for f in FEATURES})
