"""``mllm-swap pretrain``: a tower pretrained on a shapes world (:mod:`align.pretrain`), written as an HF directory."""

from __future__ import annotations

import argparse
import dataclasses

from align.errors import UserError
from mllm_swap.commands.options import add_overwrite, at_least

HELP = "pretrain a tiny tower on a shapes world: DINOv2 self-supervised (dino) or CLIP on captions (clip)"
DESCRIPTION = (
    "Train a tower from seed --seed on the train split of the shapes world --data and write it to --out as an "
    "HF model directory that every command loads by its path (--encoder OUT, vision=OUT). dino: a tiny "
    "Dinov2Model (Dinov2WithRegistersModel with --registers R) self-distilled the way DINOv2 was (EMA teacher, "
    "multi-crop DINO loss, iBOT masked patches, KoLeo), no labels or captions; clip: tiny-clip trained "
    "contrastively on the world's captions. Also writes OUT/pretrain.json (settings, loss curve, seconds)."
)


def settings_of(args: argparse.Namespace):
    """The pretraining settings of ``args`` (defaults of the tiny builds, with --seed and --steps)."""
    from align.pretrain.clip import PretrainSettings
    from align.pretrain.dino import DinoSettings

    settings = DinoSettings() if args.method == "dino" else PretrainSettings()
    changes = {"seed": args.seed, **({"steps": args.steps} if args.steps is not None else {})}
    return dataclasses.replace(settings, **changes)


def run(args: argparse.Namespace) -> int:
    """Check --data and the flags, then pretrain into a temporary entry of --out and publish it."""
    from align.pretrain.clip import pretrain_clip_on_shapes
    from align.pretrain.dino import pretrain_dinov2
    from align.pretrain.world import check_world
    from align.rundir import OutDir

    world = check_world(args.data)
    if args.registers and args.method != "dino":
        raise UserError(f"--registers: only `pretrain dino` has register tokens, found --registers {args.registers} "
                        f"with `pretrain {args.method}`")  # fmt: skip
    settings = settings_of(args)
    print(f"pretraining {args.method} on {world} (seed {args.seed}, {settings.steps} steps)", flush=True)
    with OutDir(args.out, f"pretrain {args.method}", args.overwrite) as out:
        out.clear()
        tmp = out.temp_dir()
        if args.method == "dino":
            record = pretrain_dinov2(tmp, settings, shapes_dir=world, registers=args.registers)
        else:
            record = pretrain_clip_on_shapes(tmp, settings, shapes_dir=world)
        out.publish(tmp)
    print(
        f"wrote {args.out} (final loss {record['final_loss']:.4g}); load it by its path, e.g. --encoder {args.out}"
    )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``pretrain``."""
    parser.add_argument(
        "method", choices=["dino", "clip"], help="dino (self-supervised DINOv2) or clip (captions)"
    )
    parser.add_argument(
        "--data", required=True, help="a shapes world (`mllm-swap data shapes`); its train split"
    )
    parser.add_argument(
        "--seed", type=int, required=True, help="seed of the initial weights, views and order"
    )
    parser.add_argument("--out", required=True, help="output model directory (new or empty)")
    parser.add_argument("--steps", type=at_least(1), help="optimizer steps (default: the tiny build's)")
    parser.add_argument("--registers", type=at_least(0), default=0, help="dino: register tokens (default 0)")
    add_overwrite(parser)
