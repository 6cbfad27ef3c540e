"""Build the calibration table on the shapes world: swaps into the tiny LLaVA, each tuned exactly like its control.

Every step is an ``mllm-swap`` command line run by the function the command hands in
(:func:`mllm_swap.commands.run_argv`, as the demo runs its stages), from inside the output directory, and is
skipped on a rerun when its output is complete (a swap's ``swap_report.json``, a tuning's ``result.json``,
a merge's ``config.json``). The steps:

1. ``world``: a shapes world (``data shapes``); its test split gives every measurement and the VQA.
2. ``mllm/base``: the existing MLLM, made the way the demo makes it (:func:`mllm_swap.base_llava.base_llava`:
   ``tiny-llava`` with ``tiny-clip-shapes`` dropped in, language LoRA, merged, the tower rebuilt with a fresh
   connector, connector stage, LoRA, merged), so that it reads the image; its last LoRA stage is scored.
3. ``swaps/<encoder>-<mode>``: every swap of :data:`SWAPS` into the base (measurements in its report), and, when
   a swap is rebuild-like, the control of those modes: the original tower rebuilt the same way.
4. ``tune/s<seed>/<name>``: per tuning seed, each swap and both controls tuned with the same budget from the
   same seed, as the demo tunes its arms: rebuild and fuse (new connector input) train the connector, then LoRA;
   drop-in and bridge (connector kept) get the LoRA alone, and their control is the base given that LoRA. The
   final LoRA stage scores the world's VQA (:mod:`mllm_swap.tune.quick_vqa`, ``eval_limit`` questions).

``measured_change`` is the swap's overall VQA accuracy minus its control's (same seed), the number the demo's
swaps are measured by; ``measured_se`` its standard error from the two binomial errors (treated as
independent: conservative for the paired questions). ``change_<kind>`` (colour, shape, count, position) are
the same difference per question kind, for the record.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from align.data.shapes_text import KINDS  # the world's question kinds: change_<kind> columns
from align.errors import UserError
from align.io import read_json, write_json
from align.paths import shipped
from mllm_swap.base_llava import BaseSize, base_llava, tune_argv

RunCommand = Callable[[list[str]], int]
ORIGINAL = "tiny-clip-shapes"  # the base's tower: a CLIP pretrained on the shapes world's captions
MLLM = "tiny-llava"
KEEPS = ("dropin", "bridge")  # modes that keep the connector
SWAPS = (("tiny-clip", "dropin"), ("tiny-clip", "rebuild"), ("tiny-dinov2", "bridge"), ("tiny-dinov2", "rebuild"),
         ("tiny-dinov2-random", "bridge"), ("tiny-dinov2-random", "rebuild"), ("tiny-siglip", "bridge"),
         ("tiny-siglip", "rebuild"), ("tiny-clip-shapes+tiny-dinov2", "fuse"))  # fmt: skip
RECIPES = {"connector": "tiny_llava_connector.yaml", "lora": "tiny_llava_lora.yaml"}


@dataclass(frozen=True)
class Budget:
    """How big the build runs: the world, the base's tuning, every arm's tuning, the bridge adapters, the VQA
    questions per scored arm."""

    shapes: int = 2000
    world_seed: int = 0
    base_steps: int = 200  # the base's language LoRA (the demo's full size throughout)
    base_lora_steps: int = 200  # the base's LoRA after its fresh connector
    connector_steps: int = 40  # an arm's (and the base's) connector stage
    lora_steps: int = 100
    bridge_steps: int = 200
    eval_limit: int = 600
    measure_images: int = 64
    seeds: tuple[int, ...] = (0, 1)
    swaps: tuple[tuple[str, str], ...] = SWAPS


@dataclass
class Build:
    """The build's state: where it runs, how it runs commands, and what it ran (for the record)."""

    out: Path
    run_command: RunCommand
    budget: Budget
    located: dict[str, str] = field(default_factory=dict)  # encoder as given -> as the swap command is given it
    ran: list[str] = field(default_factory=list)
    skipped: int = 0

    def step(self, argv: list[str], done: str) -> None:
        """Run ``argv`` (in ``out``, the working directory) unless ``done`` exists; fail on a non-zero exit."""
        import shlex

        if (self.out / done).exists():
            self.skipped += 1
            return
        line = "mllm-swap " + shlex.join(argv)
        code = self.run_command(list(argv))
        if code != 0:
            raise UserError(f"calibrate step failed (exit {code}): {line}")
        self.ran.append(line)


def slug(encoder: str, mode: str) -> str:
    """A swap's folder name: each part's last path component (ids stay whole), ``+`` as ``_``, then the mode."""
    return "_".join(Path(p).name for p in encoder.split("+")) + f"-{mode}"


def runnable(encoder: str) -> str:
    """``encoder`` with each part that is a local path from here made absolute (the build runs inside ``out``)."""
    return "+".join(str(Path(p).resolve()) if Path(p).expanduser().exists() else p for p in encoder.split("+"))


def swap_argv(mllm: str, encoder: str, mode: str, data: str, out: str, measure_images: int, bridge_steps: int,
              seed: int = 0) -> list[str]:  # fmt: skip
    """The ``swap`` command line of one candidate (what ``calibrate`` and ``predict`` both run)."""
    argv = ["swap", "--mllm", mllm, "--encoder", encoder, "--mode", mode, "--data", data,
            "--measure-images", str(measure_images), "--out", out, "--overwrite"]  # fmt: skip
    if mode == "bridge":
        argv += ["--steps", str(bridge_steps), "--seed", str(seed), "--no-compare", "--vqa-limit", "0"]
    return argv


def tune_arm(build: Build, name: str, start: str, rebuilt: bool, seed: int) -> str:
    """Tune one arm (connector first when ``rebuilt``); returns the folder of its scored LoRA stage."""
    folder, b = f"tune/s{seed}", build.budget
    if rebuilt:
        build.step(tune_argv(RECIPES["connector"], start, f"{folder}/{name}-connector", b.connector_steps, seed,
                             "world"), f"{folder}/{name}-connector/result.json")  # fmt: skip
        start = f"{folder}/{name}-connector"
    build.step(tune_argv(RECIPES["lora"], start, f"{folder}/{name}-lora", b.lora_steps, seed, "world",
                         score=b.eval_limit), f"{folder}/{name}-lora/result.json")  # fmt: skip
    return f"{folder}/{name}-lora"


def scores(build: Build, folder: str) -> dict[str, Any]:
    """The VQA of a scored tuning output: ``vqa_accuracy``, ``vqa_n`` and ``vqa_<kind>`` (``result.json``'s eval)."""
    return read_json(build.out / folder / "result.json")["eval"]


def difference(swapped: tuple[float, int], control: tuple[float, int]) -> tuple[float, float]:
    """(accuracy difference, its standard error from two independent binomial errors)."""
    (p, n), (q, m) = swapped, control
    return p - q, math.sqrt(p * (1 - p) / n + q * (1 - q) / m)


def row(encoder: str, mode: str, seed: int, scored: dict[str, Any], control: dict[str, Any],
        measurements: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """One table row: the overall change and its SE, each kind's change, both accuracies, the measurements."""
    change, se = difference((scored["vqa_accuracy"], scored["vqa_n"]), (control["vqa_accuracy"], control["vqa_n"]))
    kinds = {f"change_{k}": scored[f"vqa_{k}"] - control[f"vqa_{k}"] for k in KINDS
             if f"vqa_{k}" in scored and f"vqa_{k}" in control}  # fmt: skip
    return {"encoder": encoder, "mode": mode, "seed": seed, "measured_change": change, "measured_se": se,
            "vqa": scored["vqa_accuracy"], "control_vqa": control["vqa_accuracy"], **kinds, **measurements}  # fmt: skip


def build_table(out: str | Path, run_command: RunCommand, budget: Budget) -> dict[str, Any]:
    """Run (or resume) the whole build in ``out``; write ``calibration.csv`` and ``calibration.json``."""
    out = Path(out).resolve()
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    for name in RECIPES.values():  # the exact recipes the commands use, next to them
        shutil.copyfile(shipped("recipes") / name, out / "recipes" / name)
    located = {encoder: runnable(encoder) for encoder, _ in budget.swaps}  # resolved before moving into out
    with contextlib.chdir(out):
        return run_build(Build(out, run_command, budget, located))


def run_build(build: Build) -> dict[str, Any]:
    """The steps of the module doc, from inside ``build.out``."""
    from mllm_swap.predict.model import fit, read_table, write_table

    start, out, b = time.monotonic(), build.out, build.budget
    build.step(["data", "shapes", "--out", "world", "--n", str(b.shapes), "--seed", str(b.world_seed)],
               "world/meta.json")  # fmt: skip
    size = BaseSize(b.base_steps, b.connector_steps, b.base_lora_steps)
    for argv, done in base_llava(ORIGINAL, "world", "mllm", "tune", "mllm/base", size, b.world_seed, start=MLLM,
                                 score=b.eval_limit):  # fmt: skip
        build.step(argv, str(done))
    rebuilt = any(mode not in KEEPS for _, mode in b.swaps)  # the rebuild control is made when a swap needs it
    for encoder, mode in [*([(ORIGINAL, "rebuild")] if rebuilt else []), *b.swaps]:
        folder = f"swaps/{slug(encoder, mode)}"
        build.step(swap_argv("mllm/base", build.located.get(encoder, encoder), mode, "world", folder,
                             b.measure_images, b.bridge_steps),
                   f"{folder}/swap_report.json")  # fmt: skip
    starts = {False: ("control-keep", "mllm/base"), True: ("control-rebuild", f"swaps/{slug(ORIGINAL, 'rebuild')}")}
    rows = []
    for seed in b.seeds:
        controls: dict[bool, dict[str, Any]] = {}  # rebuilt? -> the control's scores, tuned when first needed
        for encoder, mode in b.swaps:
            name, rebuilt = slug(encoder, mode), mode not in KEEPS
            if rebuilt not in controls:
                controls[rebuilt] = scores(build, tune_arm(build, *starts[rebuilt], rebuilt, seed))
            scored = scores(build, tune_arm(build, name, f"swaps/{name}", rebuilt, seed))
            report = read_json(out / "swaps" / name / "swap_report.json")
            rows.append(row(encoder, mode, seed, scored, controls[rebuilt], report["measurements"]))
    table_path = write_table(rows, out / "calibration.csv")
    fitted = fit(read_table(table_path))
    record = {
        "calibration": {**fitted.record, "source": "calibration.csv"},
        "budget": asdict(b),
        "mllm": f"{MLLM} with {ORIGINAL} made the way LLaVA is (language LoRA {b.base_steps} steps, merged, the tower "
        f"rebuilt, connector {b.connector_steps}, LoRA {b.base_lora_steps}, merged): mllm/base",
        "base_vqa": {k: v for k, v in scores(build, "tune/base-lora").items() if k.startswith("vqa_")},
        "controls": {"dropin, bridge": "the base given the same LoRA",
                     "rebuild, fuse": f"{ORIGINAL} rebuilt into the base, tuned the same way"},  # fmt: skip
        "rows": rows,
        "commands_run": len(build.ran),
        "commands_skipped": build.skipped,
        "elapsed_s": time.monotonic() - start,
    }
    write_json(out / "calibration.json", record)
    return record


def parse_swaps(value: str | None) -> tuple[tuple[str, str], ...]:
    """``--swaps ENC:MODE,...`` (default :data:`SWAPS`)."""
    if not value:
        return SWAPS
    pairs = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        encoder, _, mode = item.rpartition(":")
        if not encoder or mode not in ("dropin", "bridge", "rebuild", "fuse"):
            raise UserError(f"--swaps {item!r}: expected ENCODER:MODE with MODE one of dropin, bridge, rebuild, fuse")
        pairs.append((encoder, mode))
    return tuple(pairs)
