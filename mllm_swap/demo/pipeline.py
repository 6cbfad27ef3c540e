"""The demo's pipeline: how big it runs and its stages, each a list of ``mllm-swap`` command lines.

shapes world -> encoder-pair ranking -> SAIL, freeze_align and KUEA alignment -> zero-shot table ->
a tuned tiny LLaVA as the "existing MLLM" -> drop-in of the KUEA CLIP and rebuild with the SAIL tower ->
connector + LoRA tuning -> lmms-eval scoring. The command lines use paths relative to the output
directory they run in (see :func:`mllm_swap.demo.run.run_demo`) and are recorded in the report.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align.errors import UserError
from mllm_swap.demo.stages import Stage, StageResult

RunCommand = Callable[[list[str]], int]  # runs one mllm-swap command line (argv without the program)


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


def run_step(run_command: RunCommand, argv: list[str]) -> str:
    """Run one ``mllm-swap`` command line with ``run_command``; return it. Fails on a non-zero exit."""
    line = "mllm-swap " + shlex.join(argv)
    code = run_command(list(argv))
    if code != 0:  # the step printed its own error above
        raise UserError(f"demo step failed (exit {code}): {line}")
    return line


def _sets(*pairs: str) -> list[str]:
    """``--set k=v`` for each ``k=v``."""
    return [arg for kv in pairs for arg in ("--set", kv)]


RECIPES = ("tiny_sail.yaml", "tiny_freeze_align.yaml", "tiny_kuea.yaml", "tiny_llava_connector.yaml",
           "tiny_llava_lora.yaml")  # fmt: skip


def build_stages(size: DemoSize, run_command: RunCommand) -> list[Stage]:
    """The demo's stages, in order, as commands run from inside the output directory by ``run_command``."""
    shapes, score, aligned, mllm, tuned, zs, ev = (
        Path(d) for d in ("shapes", "score", "align", "mllm", "tune", "zeroshot", "eval")
    )
    recipes = Path("recipes")
    batch = _sets(f"train.batch_size={size.batch}") if size.batch else []

    def stage(name: str, title: str, commands: list[list[str]], outputs: list[Path]) -> Stage:
        def run() -> StageResult:
            lines = [run_step(run_command, argv) for argv in commands]
            return StageResult(summary={}, outputs=outputs, command="\n".join(lines))

        return Stage(name, title, run)

    def align(method: str, recipe: str, *extra: str) -> list[str]:
        settings = _sets(f"data.train={shapes}", f"train.steps={size.align_steps}", *extra)
        return ["align", method, "--config", str(recipes / recipe), *settings, *batch,
                "--out", str(aligned / method)]  # fmt: skip

    def tuning(name: str, model: Path, connector: bool = True) -> list[list[str]]:
        """[Connector pretraining into ``tune/<name>-connector``,] LoRA into ``tune/<name>-lora``, merged
        into ``mllm/<name>-lora``."""
        data = _sets(  # the demo's own shapes world; scoring is the eval stage's (lmms-eval)
            f"data={shapes / 'instruct.json'}", f"image_folder={shapes}", "shapes=null", "eval_vqa=null",
            f"train.steps={size.tune_steps}",
        )  # fmt: skip
        commands = []
        if connector:
            start, model = model, tuned / f"{name}-connector"
            commands.append(["tune", "--config", str(recipes / "tiny_llava_connector.yaml"),
                             *_sets(f"model={start}"), *data, "--out", str(model), "--overwrite"])  # fmt: skip
        adapter = tuned / f"{name}-lora"
        return [
            *commands,
            ["tune", "--config", str(recipes / "tiny_llava_lora.yaml"), *_sets(f"model={model}"), *data,
             "--out", str(adapter), "--overwrite"],
            ["merge", "--adapter", str(adapter), "--out", str(mllm / f"{name}-lora")],
        ]  # fmt: skip

    def swap(mllm_in: str | Path, encoder: str | Path, mode: str, out: Path) -> list[str]:
        return ["swap", "--mllm", str(mllm_in), "--encoder", str(encoder), "--mode", mode,
                "--out", str(out), "--overwrite"]  # fmt: skip

    artifact = {m: aligned / m / "artifact" for m in ("sail", "freeze_align", "kuea")}
    zeroshot_models = {"clip": size.clip, "kuea": artifact["kuea"], "sail": artifact["sail"],
                       "freeze_align": artifact["freeze_align"]}  # fmt: skip
    base = mllm / "base-lora"
    models = {  # what the eval stage scores, by the name the report uses
        "base": base,
        "base-tuned": mllm / "control-lora",  # the original given the rebuilt model's extra tuning
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
                    "rank",
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
        stage("align-sail", "Align: SAIL", [align("sail", "tiny_sail.yaml")], [artifact["sail"]]),
        stage(
            "align-freeze_align",
            "Align: freeze_align",
            [align("freeze_align", "tiny_freeze_align.yaml")],
            [artifact["freeze_align"]],
        ),
        # KUEA fine-tunes the very CLIP the LLaVA uses, so that it can drop in
        stage(
            "align-kuea",
            "Align: KUEA",
            [align("kuea", "tiny_kuea.yaml", f"student={size.clip}")],
            [artifact["kuea"]],
        ),
        stage(
            "zeroshot",
            "Zero-shot colour and shape classification",
            [
                [
                    "zeroshot",
                    "--model",
                    str(path),
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
            "The existing MLLM: tiny LLaVA with the shapes CLIP, LoRA-tuned",
            [
                swap("tiny-llava", size.clip, "dropin", mllm / "base-untuned"),
                *tuning("base", mllm / "base-untuned", connector=False),
            ],
            [base],
        ),
        stage(
            "swap",
            "Swap: KUEA CLIP drop-in, SAIL tower rebuild",
            [
                swap(base, artifact["kuea"], "dropin", models["kuea-dropin"]),
                swap(base, artifact["sail"], "rebuild", models["sail-rebuild"]),
            ],
            [models["kuea-dropin"] / "swap_report.json", models["sail-rebuild"] / "swap_report.json"],
        ),
        stage(
            "tune",
            "Tune the rebuilt model (connector, then LoRA), and the original the same way as a control",
            [*tuning("sail", models["sail-rebuild"]), *tuning("control", base)],
            [models["sail-lora"], models["base-tuned"]],
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
