"""``mllm-swap merge``: fold a LoRA stage's peft adapter into a plain checkpoint."""

from __future__ import annotations

import argparse

from mllm_swap.commands.options import add_overwrite

HELP = "merge a tuning stage's LoRA adapter into a full checkpoint"
DESCRIPTION = (
    "Load the base model named in --adapter's adapter_config.json (a relative path is "
    "resolved against the adapter directory; or --base), apply the adapter (LoRA and modules_to_save, "
    "after a non_lora_trainables.safetensors of older outputs if present), merge the LoRA weights "
    "(merge_and_unload) and write model and processor to --out, loadable with the family's plain "
    "from_pretrained."
)


def run(args: argparse.Namespace) -> int:
    from mllm_swap.tune.merge import merge_adapter

    out = merge_adapter(args.adapter, args.out, base_model=args.base, dtype=args.dtype, overwrite=args.overwrite)
    print(f"{out}: merged checkpoint; load it with AutoModelForImageTextToText.from_pretrained('{out}')")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``merge``."""
    parser.add_argument("--adapter", required=True, help="output directory of `mllm-swap tune`")
    parser.add_argument("--out", required=True, help="directory for the merged checkpoint")
    parser.add_argument("--base", help="base model (default: the one recorded with the adapter)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    add_overwrite(parser)
