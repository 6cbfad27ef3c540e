"""``mllm-swap tune``: one instruction-tuning stage (connector, LoRA/QLoRA, full) from a YAML recipe."""

from __future__ import annotations

import argparse

from mllm_swap.commands.options import add_resume, resume_of

HELP = "instruction-tune a (swapped) LLaVA model: connector, LoRA/QLoRA or full stage"
DESCRIPTION = (
    "Train one stage of LLaVA-style instruction tuning from a YAML recipe (see recipes/). "
    "Outputs in --out: a standard peft adapter with the connector as modules_to_save (lora) or a full "
    "checkpoint + non_lora_trainables.safetensors (connector/full), the processor, tune_info.json, a model "
    "card (README.md), metrics.jsonl, loss.png and resumable checkpoints. Rerun the same command to resume. "
    "A frozen tower's tokens can come from a cache instead of the tower (recipe key tower_cache, e.g. --set "
    "tower_cache=DIR, DIR written by `mllm-swap encode --encoder E --data D --pool tokens --layer -2 --prefix "
    "drop`; refused unless its layer, token count and model fingerprint match the model). Under `accelerate launch` (DDP or DeepSpeed) the same "
    "command runs on many GPUs: accelerate launch --config_file CONF -m mllm_swap tune ..."
)


def run(args: argparse.Namespace) -> int:
    from align.recipes import load_config
    from mllm_swap.tune.config import TuneConfig
    from mllm_swap.tune.stage import run_tune

    cfg = load_config(TuneConfig, args.config, args.set or [])
    result = run_tune(cfg, args.out, resume=resume_of(args), overwrite=args.overwrite)
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    print(f"{args.out}: stage {cfg.stage}, {result.steps} steps, final loss {loss}, {result.elapsed_s:.0f} s")
    for key, value in sorted(result.eval.items()):
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    if cfg.stage == "lora":
        print(f"merge with: mllm-swap merge --adapter {args.out} --out {args.out}-merged")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``tune``."""
    parser.add_argument("--config", required=True, help="recipe YAML (a TuneConfig)")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. train.steps=50"
    )
    parser.add_argument("--out", required=True, help="output directory")
    add_resume(parser)
