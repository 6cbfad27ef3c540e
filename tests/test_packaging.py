"""A wheel install carries the recipes, lmms-eval task/suite configs, DeepSpeed configs and model configs the code uses."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("recipes", "eval_configs", "deepspeed_configs", "model_configs")


def test_wheel_ships_every_config_file(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("mllm_swap-*.whl")
    prefix = "share/mllm-swap/"
    names = {n.split(prefix, 1)[1] for n in zipfile.ZipFile(wheel).namelist() if prefix in n}
    expected = {
        str(p.relative_to(REPO))
        for folder in SHIPPED
        for p in (REPO / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert names == expected
    # package data: the predictor's shipped calibration table
    packaged = set(zipfile.ZipFile(wheel).namelist())
    assert {"mllm_swap/predict/calibration.csv", "mllm_swap/predict/calibration.json"} <= packaged
