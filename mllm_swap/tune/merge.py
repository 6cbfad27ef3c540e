"""Merge a tuning stage's output into a full checkpoint that the family's plain ``from_pretrained`` loads.

A ``lora`` stage leaves a standard peft adapter: LoRA weights plus the connector (and any other
trainable) as peft ``modules_to_save``. Merging loads the base model named in the adapter config (a
relative record resolves against the adapter directory, :func:`mllm_swap.tune.adapter.locate`; or
``base_model``), lets peft restore the adapter and folds the LoRA deltas into the linear weights
(``merge_and_unload``), then writes model + processor. A ``non_lora_trainables.safetensors`` next to
the adapter (outputs of earlier versions, which kept the connector there) or alone with
``tune_info.json`` naming its base (a ``connector``/``full`` stage) is copied into the base first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.integrity import record_checksums, verify_dir
from align.io import read_json, write_json
from align.rundir import OutDir, claims_out_dir
from mllm_swap.checkpoints import DTYPES, load_mllm
from mllm_swap.families.base import save_checkpoint
from mllm_swap.tune.adapter import locate, reference
from mllm_swap.tune.model import INFO_FILE, NON_LORA_FILE, load_non_lora

MERGE_INFO = "merge_info.json"


def _base_of(adapter_dir: Path, base_model: str | None) -> str:
    if base_model:
        return base_model
    for name, key in (("adapter_config.json", "base_model_name_or_path"), (INFO_FILE, "base_model")):
        path = adapter_dir / name
        if path.is_file() and read_json(path).get(key):
            return locate(str(read_json(path)[key]), adapter_dir)
    raise ValueError(
        f"{adapter_dir}: cannot tell the base model (no 'base_model_name_or_path' in adapter_config.json and "
        f"no 'base_model' in {INFO_FILE}); pass base_model / --base"
    )


def _load_processor(adapter_dir: Path, base_processor: Any) -> Any:
    """The adapter's own processor (saved by the tuning stage), else the base model's."""
    from transformers import AutoProcessor

    has_own = (adapter_dir / "processor_config.json").is_file() or (
        adapter_dir / "preprocessor_config.json"
    ).is_file()
    return AutoProcessor.from_pretrained(str(adapter_dir)) if has_own else base_processor


@claims_out_dir("merge")
def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base_model: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write the merged checkpoint of ``adapter_dir`` to ``out_dir`` (atomically) and return it."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: adapter directory not found")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, found {dtype!r}")
    has_adapter = (adapter_dir / "adapter_config.json").is_file()
    non_lora = adapter_dir / NON_LORA_FILE
    if not has_adapter and not non_lora.is_file():
        hint = (
            " (it is already a full checkpoint: load it directly)"
            if (adapter_dir / "config.json").is_file()
            else ""
        )
        raise FileNotFoundError(
            f"{adapter_dir}: expected adapter_config.json (a LoRA stage) or {NON_LORA_FILE}; found neither{hint}"
        )
    if out_dir.resolve() == adapter_dir.resolve():
        raise ValueError(f"--out {out_dir} must differ from --adapter")
    claim = OutDir.current(out_dir)
    verify_dir(adapter_dir, "adapter", required=(adapter_dir / INFO_FILE).is_file())  # ours: recorded
    named = _base_of(adapter_dir, base_model)
    base = load_mllm(named, dtype=dtype)
    model = base.model
    copied = load_non_lora(model, non_lora) if non_lora.is_file() else []
    if has_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    processor = _load_processor(adapter_dir, base.processor)
    tmp = claim.temp_dir()
    save_checkpoint(model, processor, tmp)
    write_json(
        tmp / MERGE_INFO,
        {
            "adapter": reference(adapter_dir, out_dir),
            "base_model": reference(named, out_dir),
            "lora_merged": has_adapter,
            "non_lora": copied,
        },
    )
    record_checksums(tmp)
    claim.clear()
    claim.publish(tmp)
    return out_dir
