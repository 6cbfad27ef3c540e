"""``mllm-swap calibrate``: build the swap-success predictor's calibration table on the shapes world."""

from __future__ import annotations

import argparse

from mllm_swap.commands.options import at_least

HELP = "build the swap predictor's calibration table: swaps into the tiny LLaVA, tuned like their controls, scored"
DESCRIPTION = (
    "On a shapes world: a base LLaVA made as the demo makes it (tiny-llava with tiny-clip-shapes: language LoRA, "
    "merged, the tower rebuilt, connector, LoRA, merged), then every --swaps ENCODER:MODE into it (each "
    "swap_report.json carries the measurements), then per tuning seed each swap and its control tuned with the same "
    "budget (rebuild/fuse: connector then LoRA, control = tiny-clip-shapes rebuilt; dropin/bridge: LoRA, control = "
    "the base) and scored on the world's VQA. Writes OUT/calibration.csv (measurements, encoder, mode, seed, "
    "measured_change: overall VQA accuracy, measured_se, change_<kind>) and OUT/calibration.json (the ridge fit and its "
    "leave-one-encoder-out Spearman and MAE). Every step is an mllm-swap command; rerunning skips finished ones."
)


def run(args: argparse.Namespace) -> int:
    from mllm_swap.commands import run_argv
    from mllm_swap.predict.calibrate import Budget, build_table, parse_swaps

    budget = Budget(shapes=args.shapes, base_steps=args.base_steps, base_lora_steps=args.base_lora_steps,
                    connector_steps=args.connector_steps,
                    lora_steps=args.lora_steps, bridge_steps=args.bridge_steps, eval_limit=args.eval_limit,
                    measure_images=args.measure_images, seeds=tuple(range(args.seeds)),
                    swaps=parse_swaps(args.swaps))  # fmt: skip
    record = build_table(args.out, run_argv, budget)
    cal = record["calibration"]
    loeo = cal["leave_one_encoder_out"]
    rho = "n/a" if loeo["spearman"] is None else f"{loeo['spearman']:+.3f}"
    print(f"{args.out}/calibration.csv: {cal['rows']} rows, {len(cal['encoders'])} encoders; leave-one-encoder-out "
          f"Spearman {rho} (permutation p {loeo['spearman_permutation_p']}), MAE {loeo['mae']:.4f} (predicting the mean: {loeo['mae_predicting_the_mean']:.4f}); "
          f"{record['elapsed_s']:.0f} s")  # fmt: skip
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``calibrate``."""
    from mllm_swap.predict.calibrate import Budget

    d = Budget()
    p.add_argument("--out", required=True, help="output directory (rerun to resume)")
    p.add_argument("--swaps", default=None, help="ENCODER:MODE,... (default: the shipped table's swaps)")
    p.add_argument("--seeds", type=at_least(1), default=len(d.seeds), help=f"tuning seeds (default {len(d.seeds)})")
    p.add_argument("--shapes", type=at_least(20), default=d.shapes, help=f"shapes world size (default {d.shapes})")
    p.add_argument("--base-steps", type=at_least(1), default=d.base_steps,
                   help=f"the base's language LoRA steps (default {d.base_steps})")  # fmt: skip
    p.add_argument("--base-lora-steps", type=at_least(1), default=d.base_lora_steps,
                   help=f"the base's LoRA steps after its fresh connector (default {d.base_lora_steps})")  # fmt: skip
    p.add_argument("--connector-steps", type=at_least(1), default=d.connector_steps,
                   help=f"connector steps of a rebuild/fuse arm and of the base (default {d.connector_steps})")  # fmt: skip
    p.add_argument("--lora-steps", type=at_least(1), default=d.lora_steps, help="LoRA steps of every arm")
    p.add_argument("--bridge-steps", type=at_least(1), default=d.bridge_steps, help="bridge adapter steps")
    p.add_argument("--eval-limit", type=at_least(1), default=d.eval_limit, help="VQA questions scored per arm")
    p.add_argument("--measure-images", type=at_least(4), default=d.measure_images,
                   help="held-out images of each swap's measurements")  # fmt: skip
