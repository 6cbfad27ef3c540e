"""The DeepSpeed configs are LLaVA's, and DeepSpeed's own parser accepts them once "auto" is resolved."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

deepspeed = pytest.importorskip("deepspeed")

from accelerate.utils.deepspeed import HfDeepSpeedConfig as AccelerateHfDeepSpeedConfig  # noqa: E402
from deepspeed.runtime.config import DeepSpeedConfig  # noqa: E402
from transformers import TrainingArguments  # noqa: E402
from transformers.integrations.deepspeed import (  # noqa: E402
    HfTrainerDeepSpeedConfig,
    unset_hf_deepspeed_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "deepspeed_configs"
NAMES = ["zero2.json", "zero3.json", "zero3_offload.json"]
HIDDEN = 4096  # Vicuna-7B width, as LLaVA-1.5-7B


def _resolve(raw: dict, tmp_path: Path, *, micro: int, accum: int, bf16: bool, steps: int) -> dict:
    """Fill the "auto" values exactly as the HF Trainer does (its own code, not a copy)."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        bf16=bf16,
        learning_rate=2e-4,
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_cpu=True,
        report_to=[],
    )
    hf = HfTrainerDeepSpeedConfig(json.loads(json.dumps(raw)))
    try:
        hf.trainer_config_process(args)
        model = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(hidden_size=HIDDEN)))
        hf.trainer_config_finalize(args, model, steps)
        return hf.config
    finally:
        # The HF object registers itself globally (it would switch on ZeRO-3 loading elsewhere).
        unset_hf_deepspeed_config()


def _autos(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, val in node.items() for k in _autos(val, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


@pytest.mark.parametrize("name", NAMES)
def test_configs_parse_after_resolving_autos(name: str, tmp_path: Path) -> None:
    raw = json.loads((CONFIG_DIR / name).read_text())
    resolved = _resolve(raw, tmp_path, micro=16, accum=2, bf16=True, steps=1000)
    assert _autos(resolved) == []
    ds = DeepSpeedConfig(resolved)
    stage = 2 if name == "zero2.json" else 3
    assert ds.zero_optimization_stage == stage
    assert ds.train_micro_batch_size_per_gpu == 16
    assert ds.gradient_accumulation_steps == 2
    assert ds.train_batch_size == 16 * 2 * 1  # micro x accumulation x world size 1
    assert ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert ds.zero_config.reduce_bucket_size == HIDDEN * HIDDEN
    assert ds.zero_config.overlap_comm and ds.zero_config.contiguous_gradients
    assert ds.zero_config.sub_group_size == 10**9
    if stage == 3:
        assert ds.zero_config.prefetch_bucket_size == int(0.9 * HIDDEN * HIDDEN)
        assert ds.zero_config.param_persistence_threshold == 10 * HIDDEN
        assert ds.zero_config.max_live_parameters == 10**9
        assert ds.zero_config.max_reuse_distance == 10**9
        assert ds.zero_config.gather_16bit_weights_on_model_save
    offload = name == "zero3_offload.json"
    assert (ds.zero_config.offload_param is not None) == offload
    assert (ds.zero_config.offload_optimizer is not None) == offload
    if offload:
        assert ds.zero_config.offload_param.device == "cpu"
        assert ds.zero_config.offload_optimizer.device == "cpu"
        # the training loop builds optimizer and schedule from the recipe (as HF's Trainer fills LLaVA's
        # "auto" sections from its own arguments), so the config carries none and lets a torch optimizer
        # step the offloaded states
        assert ds.optimizer_name is None and ds.scheduler_name is None
        assert raw_config(name)["zero_force_ds_cpu_optimizer"] is False


def raw_config(name: str) -> dict:
    return json.loads((CONFIG_DIR / name).read_text())


@pytest.mark.parametrize("name", NAMES)
def test_unresolved_autos_are_rejected_by_deepspeed(name: str) -> None:
    raw = json.loads((CONFIG_DIR / name).read_text())
    assert "train_micro_batch_size_per_gpu" in _autos(raw)
    with pytest.raises((TypeError, ValueError)):
        DeepSpeedConfig(raw)


@pytest.mark.parametrize("name", NAMES)
def test_accelerate_reads_configs_with_autos(name: str) -> None:
    path = CONFIG_DIR / name
    cfg = AccelerateHfDeepSpeedConfig(str(path))
    assert cfg.is_zero3() == (name != "zero2.json")
    assert cfg.is_zero2() == (name == "zero2.json")
    assert cfg.is_offload() == (name == "zero3_offload.json")
    assert cfg.get_value("bf16.enabled") == "auto" and cfg.get_value("fp16.enabled") == "auto"
    assert cfg.get_value("zero_optimization.reduce_bucket_size") == "auto"
    assert cfg.get_value("zero_optimization.stage") == (2 if name == "zero2.json" else 3)


def test_fp16_resolution_turns_bf16_off(tmp_path: Path) -> None:
    raw = json.loads((CONFIG_DIR / "zero2.json").read_text())
    resolved = _resolve(raw, tmp_path, micro=4, accum=1, bf16=False, steps=10)
    ds = DeepSpeedConfig(resolved)
    assert not ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert ds.train_batch_size == 4


@pytest.mark.parametrize("name", NAMES)
def test_loop_fills_sizes_as_hf_trainer_and_deepspeed(name: str, tmp_path: Path) -> None:
    """The loop's size autos: HF Trainer's values for a Llava-like width, DeepSpeed's defaults without one."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from torch import nn

    from align.distributed import fill_deepspeed_autos

    keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    raw = raw_config(name)
    llava = nn.Linear(2, 2)
    llava.config = SimpleNamespace(text_config=SimpleNamespace(hidden_size=HIDDEN))
    ours = json.loads(json.dumps(raw))
    fill_deepspeed_autos(ours, llava)
    hf = _resolve(raw, tmp_path, micro=4, accum=1, bf16=False, steps=10)
    assert {k: ours["zero_optimization"].get(k) for k in keys} == {k: hf["zero_optimization"].get(k) for k in keys}
    heads = json.loads(json.dumps(raw))  # an alignment head: no HF config, no hidden width
    filled = fill_deepspeed_autos(heads, nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)))
    defaults = DeepSpeedZeroConfig()
    expected = {
        "reduce_bucket_size": defaults.reduce_bucket_size,
        "stage3_prefetch_bucket_size": defaults.prefetch_bucket_size,
        "stage3_param_persistence_threshold": defaults.param_persistence_threshold,
    }
    assert filled == {k: v for k, v in expected.items() if raw["zero_optimization"].get(k) == "auto"}
    assert _autos(heads.get("zero_optimization")) == []
