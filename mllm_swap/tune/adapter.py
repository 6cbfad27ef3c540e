"""A tune output that travels: how it names its base model and data, and its model card (``README.md``).

Rule for every path a tune or merge output records (``adapter_config.json``'s ``base_model_name_or_path``,
``tune_info.json``, ``merge_info.json``): a hub id or a tiny-model id (``tiny-llava``, built under
``$MLLM_SWAP_HOME/models``) is recorded as given; an existing local path is recorded relative to the
output directory (``../llava-swap``), so an output and its base move together and no absolute path of
the machine is written. Our loaders (``mllm-swap merge``) resolve a relative record against the output
directory; transformers (``AutoPeftModel*``) resolves it against the current directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.embedded import is_tiny_model

if TYPE_CHECKING:
    from align.train.method import TrainResult
    from mllm_swap.tune.config import TuneConfig

CARD_FILE = "README.md"


def reference(name: str | Path, relative_to: str | Path) -> str:
    """How an output records ``name``: an id as given, an existing local path relative to ``relative_to``."""
    if is_tiny_model(str(name)) or not Path(name).exists():
        return str(name)
    return Path(os.path.relpath(os.path.abspath(name), os.path.abspath(relative_to))).as_posix()


def locate(recorded: str, relative_to: str | Path) -> str:
    """The name to load a :func:`reference` by: a relative record found under ``relative_to``, else as recorded.

    Records made before this rule (relative to the training's working directory) resolve as before.
    """
    local = Path(relative_to) / recorded
    if not Path(recorded).is_absolute() and local.exists():
        return str(local)
    return recorded


def _base_kind(base: str, out_dir: Path) -> str:
    if is_tiny_model(base):
        return "tiny"
    return "local" if (out_dir / base).exists() else "hub"


def _how_to_find(base: str, kind: str) -> str:
    if kind == "tiny":
        return (
            f"`{base}` is a tiny model mllm-swap builds into `$MLLM_SWAP_HOME/models/{base}` (default "
            f"`~/.cache/mllm-swap/models/{base}`); `mllm-swap merge` finds it by that id. For plain peft, use "
            f"that directory as BASE, or run `AutoPeftModelForCausalLM` from `$MLLM_SWAP_HOME/models`."
        )
    if kind == "local":
        return (
            f"`{base}` is a local directory recorded relative to this adapter directory (they move together). "
            "`mllm-swap merge` resolves it against this directory; transformers resolves it against the "
            "current directory, so run `AutoPeftModelForCausalLM` from this directory."
        )
    return f"`{base}` is a hub id."


def _lora_section(config: dict[str, Any]) -> list[str]:
    targets = config["target_modules"]
    kinds = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
    saved = ", ".join(f"`{m}`" for m in config.get("modules_to_save") or []) or "none"
    return [
        f"- LoRA r={config['r']}, alpha={config['lora_alpha']}, dropout={config['lora_dropout']} on "
        f"{len(targets)} linear layers of the language model ({kinds}): `adapter_model.safetensors`.",
        f"- Modules saved in full (peft `modules_to_save`, restored by peft on load): {saved}.",
        "- The trained model's processor (tokenizer, chat template, image processor).",
    ]


def _load_section(base: str, kind: str, stage: str) -> list[str]:
    if stage != "lora":
        return [
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            'model = AutoModelForImageTextToText.from_pretrained("path/to/this/dir")',
            'processor = AutoProcessor.from_pretrained("path/to/this/dir")',
            "```",
        ]
    return [
        "With peft and transformers only:",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM, PeftModel",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        'base = AutoModelForImageTextToText.from_pretrained("BASE")',
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter")',
        "# or, loading the base named in adapter_config.json:",
        'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/adapter")',
        'processor = AutoProcessor.from_pretrained("path/to/this/adapter")',
        "```",
        "",
        f"Base model (`base_model_name_or_path`): {_how_to_find(base, kind)} If the base moved, pass it as BASE "
        "to `PeftModel.from_pretrained`, or set `base_model_name_or_path` in `adapter_config.json` to its hub "
        "id or path. The adapter has no `task_type`: transformers has no `AutoModelForCausalLM` class for a "
        "Llava config, so peft records the base's own class (`auto_mapping`) and `AutoPeftModel` / "
        "`AutoPeftModelForCausalLM` load the base with it.",
        "",
        "Or fold everything into a plain checkpoint (no peft needed afterwards):",
        "",
        "```bash",
        "mllm-swap merge --adapter path/to/this/adapter --out merged   # --base BASE if the base moved",
        "```",
    ]


def write_card(out_dir: str | Path, cfg: TuneConfig, info: dict[str, Any], result: TrainResult) -> Path:
    """Write ``README.md`` for a finished tune output: what it holds, how it was made, how to load it.

    ``cfg`` is the stage's ``TuneConfig``, ``info`` its ``tune_info.json``, ``result`` the loop's ``TrainResult``.
    """
    out_dir = Path(out_dir)
    stage, base = info["stage"], info["base_model"]
    kind = _base_kind(base, out_dir)
    meta = {"library_name": "peft" if stage == "lora" else "transformers"}
    if kind == "hub":
        meta["base_model"] = base
    meta["pipeline_tag"] = "image-text-to-text"
    front = ["---", *(f"{key}: {json.dumps(value)}" for key, value in meta.items())]
    front += ["tags: [llava, mllm-swap" + (", lora, peft" if stage == "lora" else "") + "]", "---", ""]
    if stage == "lora":
        holds = _lora_section(json.loads((out_dir / "adapter_config.json").read_text()))
        title = f"# LoRA adapter for `{base}` (mllm-swap tune, stage `lora`)"
    else:
        trained = ", ".join(part for part in info["trainable"] if part != "total")
        holds = [
            f"- A full checkpoint (trained parts: {trained}) and its processor.",
            "- `non_lora_trainables.safetensors`: the trained parts outside the language model alone "
            "(`init_trainables` of a later stage).",
        ]
        title = f"# `{base}` after mllm-swap tune, stage `{stage}`"
    train = cfg.train
    rates = f"{train.lr:g} (connector {cfg.connector_lr or train.lr:g}"
    rates += f", tower {cfg.tower_lr or train.lr:g})" if cfg.unfreeze_tower or cfg.unfreeze_head else ")"
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    made = [
        f"| base model | `{base}` |",
        f"| data | {info['data']['source']}: {info['data']['summary']} |",
        f"| steps | {result.steps} (batch {train.batch_size} per process, grad_accum {train.grad_accum}) |",
        f"| learning rate | {rates} |",
        f"| final training loss | {loss} |",
        *(
            f"| {key} | {value:.4g} |"
            for key, value in sorted(result.eval.items())
            if isinstance(value, float)
        ),
    ]
    lines = [
        *front,
        title,
        "",
        "## What it holds",
        "",
        *holds,
        "",
        "## How it was made",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [*made, "", "Paths are relative to this directory. Settings: `config.yaml`; per-step metrics:"]
    lines += ["`metrics.jsonl`; trainable counts: `tune_info.json`.", "", "## How to load it", ""]
    lines += [*_load_section(base, kind, stage), ""]
    path = out_dir / CARD_FILE
    path.write_text("\n".join(lines))
    return path
