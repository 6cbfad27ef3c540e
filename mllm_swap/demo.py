"""``mllm-swap demo``: the whole mission on the embedded default, as the same commands a user would type.

shapes world -> encoder-pair scores -> SAIL, freeze-align and KUEA alignment -> zero-shot table ->
a tuned tiny LLaVA as the "existing MLLM" -> drop-in of the KUEA CLIP and rebuild with the SAIL tower ->
connector + LoRA tuning -> lmms-eval scoring -> ``report.md``. Every stage is a list of ``mllm-swap``
command lines (recorded in the report); finished stages are skipped on rerun once their outputs check out.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from align.paths import shipped
from mllm_swap.stages import Stage, StageResult, run_stages


@dataclass(frozen=True)
class DemoSize:
    """How big the demo runs: ``full`` is the README's demo, ``quick`` the test suite's."""

    shapes: int
    score_n: int
    align_steps: int
    tune_steps: int
    eval_limit: int
    clip: str  # the CLIP the existing MLLM uses and KUEA starts from
    batch: int | None = None  # overrides the recipes' batch sizes (the quick run's world is tiny)


FULL = DemoSize(
    shapes=2000, score_n=500, align_steps=300, tune_steps=300, eval_limit=200, clip="tiny-clip-shapes"
)
QUICK = DemoSize(
    shapes=120, score_n=64, align_steps=6, tune_steps=4, eval_limit=8, clip="tiny-clip", batch=16
)


def mllm_swap(*argv: str) -> str:
    """Run one ``mllm-swap`` command in-process; return its command line. Fails on a non-zero exit."""
    from mllm_swap.cli import main

    line = "mllm-swap " + shlex.join(argv)
    code = main(list(argv))
    if code != 0:
        raise RuntimeError(f"demo step failed (exit {code}): {line}")
    return line


def build_stages(root: Path, size: DemoSize) -> list[Stage]:
    """The demo's stages, in order, writing under ``root``."""
    shapes, score, aligned, mllm, tuned, zs, ev = (
        root / d for d in ("shapes", "score", "align", "mllm", "tune", "zeroshot", "eval")
    )
    recipes = shipped("recipes")
    steps = str(size.align_steps)
    batch = ["--set", f"train.batch_size={size.batch}"] if size.batch else []

    def stage(name: str, title: str, commands: list[list[str]], outputs: list[Path]) -> Stage:
        def run() -> StageResult:
            lines = [mllm_swap(*argv) for argv in commands]
            return StageResult(summary={}, outputs=outputs, command="\n".join(lines))

        return Stage(name, title, run)

    recipe_of = {  # method -> (recipe, its extra settings)
        "sail": ("tiny_sail.yaml", []),
        "projector": ("tiny_projector.yaml", []),
        "kernel": ("tiny_kuea.yaml", [f"student={size.clip}"]),  # KUEA tunes the CLIP the LLaVA uses
    }
    align_cmd = {
        method: ["align", method, "--config", str(recipes / recipe),
                 *[arg for kv in (f"data.train={shapes}", f"train.steps={steps}", *sets) for arg in ("--set", kv)],
                 *batch, "--out", str(aligned / method)]
        for method, (recipe, sets) in recipe_of.items()
    }  # fmt: skip
    zeroshot_models = {
        "clip": size.clip,
        "kuea": str(aligned / "kernel" / "artifact"),
        "sail": str(aligned / "sail" / "artifact"),
        "projector": str(aligned / "projector" / "artifact"),
    }
    # the demo's own shapes world, already on disk; its scoring is the eval stage's (lmms-eval)
    tune_data = [
        "--set",
        f"data={shapes / 'instruct.json'}",
        "--set",
        f"image_folder={shapes}",
        "--set",
        "shapes=null",
        "--set",
        "eval_vqa=null",
        "--set",
        f"train.steps={size.tune_steps}",
    ]
    lora = str(recipes / "tiny_llava_lora.yaml")
    models = {
        "base": mllm / "base",
        "kuea-dropin": mllm / "kuea-dropin",
        "sail-rebuild": mllm / "sail-rebuild",
        "sail-connector": tuned / "sail-connector",
        "sail-lora": mllm / "sail-lora",
    }
    return [
        stage(
            "data",
            "Shapes world",
            [["data", "shapes", "--out", str(shapes), "--n", str(size.shapes)]],
            [shapes / "meta.json", shapes / "pairs.jsonl"],
        ),
        stage(
            "score",
            "Rank encoder pairs (CKA, mutual kNN)",
            [
                [
                    "score",
                    "--vision",
                    f"{size.clip},tiny-dinov2,tiny-dinov2-reg,tiny-siglip",
                    "--text",
                    "tiny-text,minilm",
                    "--data",
                    str(shapes),
                    "--n",
                    str(size.score_n),
                    "--metrics",
                    "cka,mknn",
                    "--out",
                    str(score),
                ]
            ],
            [score / "scores.json"],
        ),
        *[
            stage(f"align-{m}", f"Align: {m}", [cmd], [aligned / m / "artifact"])
            for m, cmd in align_cmd.items()
        ],
        stage(
            "zeroshot",
            "Zero-shot colour and shape classification",
            [
                [
                    "zeroshot",
                    "--model",
                    path,
                    "--task",
                    "classify",
                    "--data",
                    str(shapes),
                    "--label",
                    label,
                    "--out",
                    str(zs / f"{name}-{label}"),
                ]
                for name, path in zeroshot_models.items()
                for label in ("color", "shape")
            ],
            [zs],
        ),
        stage(
            "base",
            "The existing MLLM: tiny LLaVA with the shapes CLIP, instruction-tuned",
            [
                [
                    "swap",
                    "--mllm",
                    "tiny-llava",
                    "--encoder",
                    size.clip,
                    "--mode",
                    "dropin",
                    "--out",
                    str(mllm / "base-untuned"),
                    "--overwrite",
                ],
                [
                    "tune",
                    "--config",
                    lora,
                    "--set",
                    f"model={mllm / 'base-untuned'}",
                    *tune_data,
                    "--out",
                    str(tuned / "base"),
                    "--overwrite",
                ],
                ["merge", "--adapter", str(tuned / "base"), "--out", str(models["base"])],
            ],
            [models["base"]],
        ),
        stage(
            "swap",
            "Swap: KUEA CLIP drop-in, SAIL tower rebuild",
            [
                [
                    "swap",
                    "--mllm",
                    str(models["base"]),
                    "--encoder",
                    str(aligned / "kernel" / "artifact"),
                    "--mode",
                    "dropin",
                    "--out",
                    str(models["kuea-dropin"]),
                    "--overwrite",
                ],
                [
                    "swap",
                    "--mllm",
                    str(models["base"]),
                    "--encoder",
                    str(aligned / "sail" / "artifact"),
                    "--mode",
                    "rebuild",
                    "--out",
                    str(models["sail-rebuild"]),
                    "--overwrite",
                ],
            ],
            [models["kuea-dropin"] / "swap_report.json", models["sail-rebuild"] / "swap_report.json"],
        ),
        stage(
            "tune",
            "Tune the rebuilt model: connector, then LoRA",
            [
                [
                    "tune",
                    "--config",
                    str(recipes / "tiny_llava_connector.yaml"),
                    "--set",
                    f"model={models['sail-rebuild']}",
                    *tune_data,
                    "--out",
                    str(models["sail-connector"]),
                    "--overwrite",
                ],
                [
                    "tune",
                    "--config",
                    lora,
                    "--set",
                    f"model={models['sail-connector']}",
                    *tune_data,
                    "--out",
                    str(tuned / "sail-lora"),
                    "--overwrite",
                ],
                ["merge", "--adapter", str(tuned / "sail-lora"), "--out", str(models["sail-lora"])],
            ],
            [models["sail-lora"]],
        ),
        stage(
            "eval",
            "Score every model with lmms-eval (shapes_vqa, shapes_mc)",
            [
                [
                    "eval",
                    "--model",
                    ",".join(f"{k}={v}" for k, v in models.items()),
                    "--tasks",
                    "shapes_vqa,shapes_mc",
                    "--shapes",
                    str(shapes),
                    "--limit",
                    str(size.eval_limit),
                    "--batch-size",
                    "8",
                    "--out",
                    str(ev),
                ]
            ],
            [ev / "comparison.md", ev / "comparison.csv"],
        ),
    ]


def run_demo(out: str | Path, quick: bool = False) -> Path:
    """Run (or resume) the demo under ``out``; returns the path of ``report.md``."""
    from mllm_swap.demo_report import write_report

    root = Path(out)
    records = run_stages(build_stages(root, QUICK if quick else FULL), root)
    return write_report(root, records)
