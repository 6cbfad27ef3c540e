"""``mllm-swap plan RECIPE``: what a recipe's run costs before it is launched (:mod:`align.cost`).

The recipe is read by the loader its command uses (an alignment method's ``load_recipe``, or ``TuneConfig``
for ``tune``), every model is built at its real config on the meta device, and each stage is printed:
parameters, image tokens, FLOPs per sample, memory per GPU under the ZeRO stage, and time at the MFU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from align.cost import GIB, ZERO_STAGES, estimate, parse_hardware
from align.errors import UserError
from mllm_swap.commands.options import at_least

HELP = "estimate a recipe's parameters, FLOPs, memory per GPU and time on given hardware"
DESCRIPTION = (
    "Build every model of RECIPE at its real config on the meta device (no weights, no network) and print "
    "per stage: trainable/frozen parameters, image tokens, FLOPs per sample (forward, training), memory per "
    "GPU (weights, gradients, AdamW/Lion states, activations with and without gradient checkpointing) under "
    "--zero, and the time of the recipe's data at --mfu of the hardware's peak bf16 FLOP/s, beside the "
    "time the paper or reference repository reports. Warns when a stage does not fit and says what would."
)

# recipe file stem -> (hardware, hours, source): the times the papers and reference repositories report
REFERENCES: dict[str, tuple[str, float, str]] = {
    "kuea_vitl14": ("2x4090-24GB", 30.0, "KUEA paper, ViT-L/14"),
    "sail_dinov2l_nv2": ("1xA100-80GB", 5.0, "SAIL paper, 23M pairs"),
    "llava15_pretrain": ("8xA100-80GB", 3.5, "LLaVA-1.5 README, stage 1"),
    "llava15_lora": ("8xA100-80GB", 10.0, "LLaVA-1.5 README, stage 2"),
}


def _recipe_zero(path: Path) -> str:
    """The ZeRO stage of the DeepSpeed config a tune recipe names ("0" without one)."""
    from align.io import read_json

    config = read_json(path)
    zero = config.get("zero_optimization", {})
    offload = "offload_optimizer" in zero or "offload_param" in zero
    return f"{zero.get('stage', 0)}{'-offload' if offload else ''}"


def read_stages(args: argparse.Namespace) -> tuple[list[Any], str]:
    """The recipe's cost stages and its own ZeRO stage."""
    import yaml

    from align.methods.plan import align_stages, read_align_recipe
    from align.paths import shipped
    from align.recipes import load_config
    from mllm_swap.tune.config import TuneConfig
    from mllm_swap.tune.plan import tune_stage

    path = Path(args.recipe)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    overrides = list(args.set or []) + ([f"model={args.mllm}"] if args.mllm else [])
    if "model" in (yaml.safe_load(path.read_text()) or {}):
        cfg = load_config(TuneConfig, path, overrides)
        zero = "0"
        if cfg.deepspeed is not None:
            ds = cfg.deepspeed if cfg.deepspeed.is_file() else shipped("deepspeed_configs") / cfg.deepspeed.name
            zero = _recipe_zero(ds)
        return [tune_stage(cfg, args.text_tokens, args.samples, args.encoder)], zero
    if args.mllm or args.encoder:
        raise UserError(f"{path}: --mllm and --encoder apply to tune recipes (the ones with a 'model' key)")
    found = read_align_recipe(path, overrides)
    if found is None:
        raise UserError(f"{path}: not a recipe of tune nor of exactly one alignment method (kuea, sail, freeze_align)")
    return align_stages(*found, dataset_size=args.samples), "0"


def _fmt(n: float | None, unit: str = "") -> str:
    if n is None:
        return "n/a"
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def format_plan(result: dict[str, Any]) -> str:
    """The printed table of :func:`run`'s JSON record."""
    lines = [f"{result['recipe']} on {result['hardware']}, ZeRO {result['zero']}, MFU {result['mfu']}"]
    for s in result["stages"]:
        mem = s["memory"]
        other = s.get("activations_checkpointing", s.get("activations_no_checkpointing"))
        lines += [
            f"\n[{s['stage']}]  "
            + (f"micro-batch {s['micro_batch']}/GPU" if s["trains"] else "forward only")
            + f", image tokens {s['image_tokens']}",
            f"  {'part':<44}{'trainable':>16}{'frozen':>16}{'tokens':>8}{'fwd FLOPs':>14}",
        ]
        for name, p in s["parts"].items():
            lines.append(f"  {name:<44}{p['trainable']:>16,}{p['frozen']:>16,}{p['tokens']:>8}{_fmt(p['forward_flops']):>14}")
        lines += [
            f"  {'total':<44}{s['trainable']:>16,}{s['frozen']:>16,}",
            f"  FLOPs per sample: forward {_fmt(s['forward_flops'])}"
            + (f", training {_fmt(s['train_flops'])}" if s["trains"] else ""),
            "  memory per GPU (GiB): " + ", ".join(f"{k} {mem[k] / GIB:.1f}" for k in
                ("weights", "gradients", "optimizer", "activations", "total"))  # fmt: skip
            + f"; activations {'without' if s['checkpointing'] else 'with'} checkpointing {other / GIB:.1f}"
            + (f"; CPU {mem['cpu'] / GIB:.1f}" if mem["cpu"] else ""),
            f"  time: {_fmt(s['samples'])} samples -> "
            + (f"{s['hours']:.1f} h" if s["hours"] is not None else "n/a (pass --samples N)"),
        ]
        lines += [f"  WARNING: does not fit in {result['usable_gib']:.0f} GiB: {a}" for a in s["advice"]]
        lines += [f"  note: {n}" for n in s["notes"]]
    ref = result.get("reference")
    if ref:
        lines.append(f"\nreference: {ref['hours']} h on {ref['hardware']} ({ref['source']})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from align.cost import USABLE

    hardware = parse_hardware(args.hardware)
    if args.zero is not None and args.zero not in ZERO_STAGES:
        raise UserError(f"--zero {args.zero!r}: expected one of {', '.join(ZERO_STAGES)}")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu {args.mfu}: expected a fraction in (0, 1]")
    stages, recipe_zero = read_stages(args)
    zero = args.zero or recipe_zero
    stem = Path(args.recipe).stem
    result = {
        "recipe": str(args.recipe),
        "hardware": hardware.name,
        "zero": zero,
        "mfu": args.mfu,
        "usable_gib": USABLE * hardware.memory / GIB,
        "stages": [estimate(stage, hardware, zero, args.mfu) for stage in stages],
    }
    if stem in REFERENCES:
        hw, hours, source = REFERENCES[stem]
        result["reference"] = {"hardware": hw, "hours": hours, "source": source}
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``plan``."""
    parser.add_argument("recipe", help="recipe YAML of `align` or `tune` (see recipes/)")
    parser.add_argument("--hardware", default="8xA100-80GB", help="COUNTxDEVICE, DEVICE one of "
                        "A100-80GB, A100-40GB, H100-80GB, 4090-24GB (default 8xA100-80GB)")  # fmt: skip
    parser.add_argument("--zero", help=f"ZeRO stage, one of {', '.join(ZERO_STAGES)} (default: the recipe's)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    parser.add_argument("--samples", type=at_least(1), help="samples per epoch, where the recipe's data does not say")
    parser.add_argument("--text-tokens", type=at_least(1), help="text tokens per sample (tune recipes)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    parser.add_argument("--mllm", help="tune recipes: plan this MLLM (hub id or checkpoint dir) instead of the recipe's model")
    parser.add_argument("--encoder", help="tune recipes: plan the MLLM swapped with this vision encoder (a hub id)")
    parser.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
