"""The base LLaVA recipe: an existing MLLM made on a shapes world the way LLaVA is made, as ``mllm-swap`` commands.

The never-trained tiny LLM first learns the answers' language (LoRA, its old connector riding along), then the
tower is rebuilt with a fresh connector input layer, which is pretrained (stage 1, connector) before the whole
is instruction-tuned (stage 2, LoRA) and merged. Without the second part the LLaVA answers alike whatever the
image (colour 0.23, chance 0.17: its old connector never learned the tower). The demo
(:mod:`mllm_swap.demo.pipeline`) and the predictor's calibration (:mod:`mllm_swap.predict.calibrate`) both make
their base with :func:`base_llava`; :func:`tune_argv` is the tuning command line on the world that both use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

Step = tuple[list[str], Path]  # an mllm-swap command line (argv without the program) and the file it finishes


@dataclass(frozen=True)
class BaseSize:
    """The base's tuning steps: ``language`` (LoRA on the untrained LLM), ``connector`` (its fresh connector's
    stage 1) and ``lora`` (stage 2, longer than an arm's: world 1's base read colour at chance with 100)."""

    language: int
    connector: int
    lora: int


def tune_argv(recipe: str, start: str | Path, out: str | Path, steps: int, seed: int, world: str | Path, *,
              recipes: str | Path = "recipes", score: int | None = None) -> list[str]:  # fmt: skip
    """``tune`` with ``recipes/recipe`` from ``start`` on the world's instructions; ``score``: the VQA of that many
    test questions at its end (``None``: none)."""
    world = Path(world)
    scored = ["eval_vqa=null"] if score is None else [f"eval_vqa={world / 'vqa_test.jsonl'}", f"eval_limit={score}"]
    sets = [f"model={start}", f"data={world / 'instruct.json'}", f"image_folder={world}", "shapes=null", *scored,
            f"train.steps={steps}", f"train.seed={seed}"]  # fmt: skip
    return ["tune", "--config", str(Path(recipes) / recipe), *(a for kv in sets for a in ("--set", kv)),
            "--out", str(out), "--overwrite"]  # fmt: skip


def base_llava(tower: str | Path, world: str | Path, mllm: str | Path, runs: str | Path, out: str | Path,
               size: BaseSize, seed: int, *, start: str = "tiny-llava", recipes: str | Path = "recipes",
               score: int | None = None) -> list[Step]:  # fmt: skip
    """The base's steps: ``tower`` dropped into ``start``, language LoRA, merged, ``tower`` rebuilt, connector,
    LoRA (``score``: its VQA at the end), merged into ``out``. Intermediate models go to ``mllm``, tuning runs to
    ``runs``; each step comes with the file that says it finished."""
    mllm, runs, out = Path(mllm), Path(runs), Path(out)

    def swap(source: str | Path, mode: str, folder: Path) -> Step:
        argv = ["swap", "--mllm", str(source), "--encoder", str(tower), "--mode", mode, "--out", str(folder),
                "--overwrite"]  # fmt: skip
        return argv, folder / "swap_report.json"

    def tune(recipe: str, source: Path, run: Path, steps: int, scored: int | None = None) -> Step:
        return tune_argv(recipe, source, run, steps, seed, world, recipes=recipes, score=scored), run / "result.json"

    def merge(run: Path, folder: Path) -> Step:
        return ["merge", "--adapter", str(run), "--out", str(folder), "--overwrite"], folder / "config.json"

    return [
        swap(start, "dropin", mllm / "base-untuned"),
        tune("tiny_llava_lora.yaml", mllm / "base-untuned", runs / "base-language", size.language),
        merge(runs / "base-language", mllm / "base-language"),
        swap(mllm / "base-language", "rebuild", mllm / "base-rebuild"),
        tune("tiny_llava_connector.yaml", mllm / "base-rebuild", runs / "base-connector", size.connector),
        tune("tiny_llava_lora.yaml", runs / "base-connector", runs / "base-lora", size.lora, score),
        merge(runs / "base-lora", out),
    ]
