"""LoRA tuning in bf16 under the shipped DeepSpeed ZeRO-3 accelerate config, as shipped, on CPU;
the adapter reloads with plain peft in a process that never imports this project."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_distributed import RECIPES, deepspeed_run_checks, launch, sets

from align.io import read_json

pytestmark = pytest.mark.slow

# argv: base directory, adapter directory. Loads the adapter onto the base with peft alone and prints what it
# holds (as peft's own state dict) and whether it changes the base's logits.
PEFT_CLIENT = """
import json, sys
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForImageTextToText

base_dir, adapter = sys.argv[1:]
base = AutoModelForImageTextToText.from_pretrained(base_dir).eval()
ids = torch.arange(3, 19).reshape(2, 8)
with torch.no_grad():
    before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, adapter).eval()
    after = model(input_ids=ids).logits
state = get_peft_model_state_dict(model)
print(json.dumps({
    "sums": {k: float(v.double().sum()) for k, v in state.items()},
    "finite": bool(torch.isfinite(after).all()),
    "changed": float((after - before).abs().max()),
    "project": sorted(m for m in ("mllm_swap", "align") if m in sys.modules),
}))
"""


def test_lora_bf16_under_shipped_zero3(shapes_dir: Path, tmp_path: Path, without_project: str) -> None:
    """ZeRO-3 partitions the base at load (zero3_init_flag) in bf16; the LoRA weights, created afterwards in
    fp32, train in bf16 beside it. The adapter is bf16, trained, and peft restores it exactly."""
    pytest.importorskip("deepspeed")
    from mllm_swap.fixtures import ensure_tiny_mllm

    base = ensure_tiny_mllm("tiny-llava")  # built here, outside the launch
    out = tmp_path / "tune"
    args = ["tune", "--config", str(RECIPES / "tiny_llava_lora.yaml"), "--out", str(out)]
    args += sets(
        f"data={shapes_dir / 'instruct.json'}",
        f"image_folder={shapes_dir}",
        "eval_vqa=null",
        "lora_r=4",
        "train.mixed_precision=bf16",
        "train.steps=2",
        "train.batch_size=4",
        "train.save_every=0",
        "train.report_to=[jsonl]",
    )
    stdout = launch(args, processes=1, config_file=RECIPES / "accelerate" / "deepspeed_zero3.yaml")
    deepspeed_run_checks(out, stdout, stage=3)
    assert read_json(out / "result.json")["launch"]["mixed_precision"] == "bf16"
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [k for k in adapter if "lora_B" in k]
    assert len(lora_b) == 14 and {str(t.dtype) for t in adapter.values()} == {"torch.bfloat16"}
    assert all(adapter[k].abs().max() > 0 for k in lora_b)  # B starts at zero: the adapter trained
    proc = subprocess.run(
        [sys.executable, "-c", without_project + PEFT_CLIENT, str(base), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["project"] == []
    assert seen["sums"] == pytest.approx({k: float(v.double().sum()) for k, v in adapter.items()}, rel=1e-6)
    assert seen["finite"] and seen["changed"] > 0
