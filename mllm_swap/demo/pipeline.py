"""The demo's pipeline: how big it runs, where each output goes, and its stages as ``mllm-swap`` command lines.

The story has numbered sections, each a folder of the run directory:
``000_world`` (the shapes world, the tiny CLIP and DINOv2 built from the run's seed, linear probes of
what each tower knows), ``001_freeze_align`` (the debiased CKA ranking with its noise floor, the toy
CKA-vs-loss experiment, the freeze_align heads), ``002_sail`` (SAIL heads, a tiny LLaVA with the CLIP as
the existing MLLM, the SAIL tower rebuilt into it and tuned exactly like a control) and ``003_kuea``
(KUEA with the paper's trainable kernel and anchor, the no-anchor ablation, the drop-in with no tuning
and after the same tuning); ``004_swaps`` (bridge, rebuild, fused tower, cached stage 1) is
:mod:`mllm_swap.demo.swaps`. The command lines use paths relative to the run directory they run in (see
:func:`mllm_swap.demo.run.run_demo`) and are recorded in the report.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align.errors import UserError
from mllm_swap.base_llava import BaseSize, base_llava
from mllm_swap.demo.stages import Stage, StageResult

RunCommand = Callable[[list[str]], int]  # runs one mllm-swap command line (argv without the program)

MMVP_PAIRS = "mmvp_pairs.jsonl"  # where `data mmvp` writes them: the shapes folder, where the task finds them

KINDS = ("color", "shape", "count", "position")  # the shapes world's question kinds
CLIP_BLIND = ("count", "position")  # what the tiny CLIP's captions never say
RANDOM_TOWERS = ("tiny-dinov2-random", "tiny-dinov2-reg-random", "tiny-siglip")
TEXT_ENCODERS = ("tiny-text", "minilm")
# The tuned arms, once per tuning seed: a swapped model and its control get the same tuning from the same
# state. A rebuild (new tower, re-initialised connector input) trains the connector, then LoRA; its control
# is the original CLIP rebuilt the same way. A drop-in keeps the connector and gets LoRA; its control is
# the original itself given the same LoRA.
ARMS = {  # arm -> (section, starting model, connector stage first)
    "clip-rebuild": ("002_sail", "002_sail/mllm/clip-rebuild", True),
    "sail": ("002_sail", "002_sail/mllm/sail-rebuild", True),
    "clip": ("003_kuea", "002_sail/mllm/base", False),
    "kuea": ("003_kuea", "003_kuea/mllm/kuea-dropin", False),
    "bridge": ("004_swaps", "004_swaps/mllm/dino-bridge", False),  # keeps the connector: tuned like a drop-in
    "fuse": ("004_swaps", "004_swaps/mllm/clip-dino-fuse", True),
}


@dataclass(frozen=True)
class DemoSize:
    """How big the demo runs: ``full`` is the README's demo, ``quick`` the test suite's."""

    shapes: int
    score_n: int
    toy_instances: int
    align_steps: int
    base_steps: int  # LoRA steps in which the existing MLLM's never-trained LLM learns the answers' language
    base_lora_steps: int  # its LoRA after its fresh connector (the stage where it learns to use the image)
    connector_steps: int  # the extra tuning of every arm (and the base's fresh connector): connector, then LoRA
    lora_steps: int
    eval_limit: int
    seeds: int  # tuning seeds by default
    pretrain_steps: int | None  # None: `mllm-swap pretrain`'s own budget
    batch: int | None = None  # overrides the recipes' batch sizes (the quick run's world is tiny)
    mmvp: tuple[str, ...] = ()  # `data mmvp` flags (the quick run's 24 held-out scenes need loose quantiles)
    probe_labels: tuple[str, ...] = KINDS  # the attributes the linear probes fit (each one a probe per feature)
    random_floor: bool = True  # probe a random DINOv2 too, as the floor a learned tower must beat
    parallel: bool = True  # independent stages at once by default (quick: no; a child's imports cost ~6 s)


FULL = DemoSize(
    shapes=2000, score_n=500, toy_instances=200, align_steps=200, base_steps=200, base_lora_steps=200,
    connector_steps=40, lora_steps=100, eval_limit=400, seeds=3, pretrain_steps=None,
)  # fmt: skip
QUICK = DemoSize(
    shapes=120, score_n=64, toy_instances=16, align_steps=6, base_steps=4, base_lora_steps=3, connector_steps=2,
    lora_steps=3,
    eval_limit=16, seeds=1, pretrain_steps=2, batch=16,
    mmvp=("--clip-quantile", "0.5", "--dino-quantile", "0.9"), probe_labels=CLIP_BLIND, random_floor=False,
    parallel=False,
)  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """One demo run: its size, the seed everything is generated from, and the tuning seeds."""

    size: DemoSize
    seed: int = 0
    seeds: int = 0  # 0: the size's default

    @property
    def tune_seeds(self) -> list[int]:
        """The tuning stages' seeds, all derived from the run's seed."""
        return [1000 * self.seed + k for k in range(self.seeds or self.size.seeds)]

    @property
    def clip(self) -> str:
        """The tiny CLIP, built inside the run from its seed (`mllm-swap pretrain clip`)."""
        return "models/clip"

    @property
    def dino(self) -> str:
        """The tiny DINOv2, built inside the run from its seed (`mllm-swap pretrain dino`)."""
        return "models/dino"


WORLD, FREEZE, SAIL, KUEA, SWAPS = (Path(d) for d in ("000_world", "001_freeze_align", "002_sail", "003_kuea", "004_swaps"))
SECTIONS = {  # folder -> the story it tells
    WORLD.name: "The world and what each tower knows",
    FREEZE.name: "freeze_align: which vision encoder is already closest to language",
    SAIL.name: "SAIL: a language-aligned DINOv2 tower rebuilt into the LLaVA",
    KUEA.name: "KUEA: CLIP pulled toward DINOv2's kernel, dropped into the LLaVA",
    SWAPS.name: "Swap without retraining, and know before you train",
}
SHAPES = WORLD / "shapes"
ARTIFACTS = {"freeze_align": FREEZE / "align" / "artifact", "sail": SAIL / "align" / "artifact",
             "kuea": KUEA / "align" / "artifact", "kuea-noanchor": KUEA / "align-noanchor" / "artifact"}  # fmt: skip
BASE = SAIL / "mllm" / "base"
EVAL = {SAIL.name: SAIL / "eval", KUEA.name: KUEA / "eval", SWAPS.name: SWAPS / "eval"}


def arm_model(arm: str, tune_seed: int) -> tuple[str, Path]:
    """The eval name and merged checkpoint of ``arm`` tuned with ``tune_seed``."""
    name = f"{arm}-s{tune_seed}"
    return name, Path(ARMS[arm][0]) / "mllm" / name


def section_arms(section: Path) -> list[str]:
    """The tuned arms of ``section``, control first."""
    return [arm for arm, (folder, _, _) in ARMS.items() if folder == section.name]


def eval_models(plan: Plan) -> dict[str, dict[str, Path]]:
    """``{section: {name: checkpoint}}``: what each section's eval stage scores."""
    tuned = {arm: dict(arm_model(arm, s) for s in plan.tune_seeds) for arm in ARMS}
    return {
        SAIL.name: {"base": BASE, "sail-rebuild": SAIL / "mllm" / "sail-rebuild", **tuned["clip-rebuild"],
                    **tuned["sail"]},
        KUEA.name: {"kuea-dropin": KUEA / "mllm" / "kuea-dropin", **tuned["clip"], **tuned["kuea"]},
        SWAPS.name: {m: SWAPS / "mllm" / m for m in ("dino-bridge", "dino-rebuild")} | tuned["bridge"] | tuned["fuse"],
    }  # fmt: skip


def zeroshot_models(plan: Plan) -> dict[str, dict[str, str | Path]]:
    """``{section: {name: model}}`` scored zero-shot in that section's folder."""
    return {FREEZE.name: {"clip": plan.clip, "freeze_align": ARTIFACTS["freeze_align"]},
            SAIL.name: {"sail": ARTIFACTS["sail"]},
            KUEA.name: {"kuea": ARTIFACTS["kuea"], "kuea-noanchor": ARTIFACTS["kuea-noanchor"]}}  # fmt: skip


def probe_towers(plan: Plan) -> dict[str, dict[str, str | Path]]:
    """``{probe folder: {name: encoder}}``: the towers whose features are probed."""
    world = {"clip": plan.clip, "dino": plan.dino}
    if plan.size.random_floor:
        world["dino-random"] = RANDOM_TOWERS[0]
    return {str(WORLD / "probe"): world, str(KUEA / "probe"): {"kuea": ARTIFACTS["kuea"]}}


def command_line(argv: list[str]) -> str:
    """``argv`` as the ``mllm-swap`` command line a user types."""
    return "mllm-swap " + shlex.join(argv)


def run_step(run_command: RunCommand, argv: list[str]) -> str:
    """Run one ``mllm-swap`` command line with ``run_command``; return it. Fails on a non-zero exit."""
    line = command_line(argv)
    code = run_command(list(argv))
    if code != 0:  # the step printed its own error above
        raise UserError(f"demo step failed (exit {code}): {line}")
    return line


def _sets(*pairs: str) -> list[str]:
    """``--set k=v`` for each ``k=v``."""
    return [arg for kv in pairs for arg in ("--set", kv)]


RECIPES = ("tiny_sail.yaml", "tiny_freeze_align.yaml", "tiny_kuea.yaml", "tiny_llava_connector.yaml",
           "tiny_llava_lora.yaml")  # fmt: skip


# Stages of one group read nothing another of them writes, so they may run at once (mllm_swap.demo.stages):
AFTER_PROBE = "after-probe"  # rank, the freeze_align and SAIL heads, the base LLaVA (the world, towers, MMVP pairs)
AFTER_SAIL = "after-sail"  # SAIL's scores, KUEA's alignment (the CLIP and DINOv2 alone)
AFTER_KUEA = "after-kuea"  # KUEA's scores, section 004's swaps and predictions (the base LLaVA and the towers)


def build_stages(plan: Plan, run_command: RunCommand) -> list[Stage]:
    """The demo's stages, in order, as commands run from inside the run directory by ``run_command``."""
    size, recipes = plan.size, Path("recipes")
    batch = _sets(f"train.batch_size={size.batch}") if size.batch else []

    def stage(name: str, title: str, commands: list[list[str]], outputs: list[Path], group: str = "") -> Stage:
        def run() -> StageResult:
            lines = [run_step(run_command, argv) for argv in commands]
            return StageResult(summary={}, outputs=outputs, command="\n".join(lines))

        return Stage(name, title, run, "\n".join(command_line(argv) for argv in commands), group, commands, outputs)

    def align(method: str, recipe: str, out: Path, *extra: str) -> list[str]:
        settings = _sets(f"data.train={SHAPES}", f"train.steps={size.align_steps}", f"train.seed={plan.seed}",
                         *extra)  # fmt: skip
        return ["align", method, "--config", str(recipes / recipe), *settings, *batch, "--out", str(out)]

    def zeroshot(section: Path) -> list[list[str]]:
        """Classification of colour and shape, and MMVP-VLM on the Shapes-MMVP pairs, per dual encoder."""
        tasks = [["--task", "classify", "--label", "color"], ["--task", "classify", "--label", "shape"],
                 ["--task", "pairs"]]  # fmt: skip
        return [["zeroshot", "--model", str(model), *task, "--data", str(SHAPES),
                 "--out", str(section / "zeroshot" / f"{name}-{task[-1]}")]
                for name, model in zeroshot_models(plan)[section.name].items() for task in tasks]  # fmt: skip

    def tune(recipe: str, start: Path, out: Path, steps: int, seed: int) -> list[str]:
        data = _sets(f"model={start}", f"data={SHAPES / 'instruct.json'}", f"image_folder={SHAPES}", "shapes=null",
                     "eval_vqa=null", f"train.steps={steps}", f"train.seed={seed}")  # fmt: skip
        return ["tune", "--config", str(recipes / recipe), *data, "--out", str(out), "--overwrite"]

    def tuning(arm: str, seed: int) -> list[list[str]]:
        """The tuning of ``arm`` with ``seed``: [connector pretraining, then] LoRA, merged."""
        (name, merged), (_, start, connector_first) = arm_model(arm, seed), ARMS[arm]
        folder = merged.parent.parent / "tune"
        connector, adapter = folder / f"{name}-connector", folder / f"{name}-lora"
        first = [tune("tiny_llava_connector.yaml", Path(start), connector, size.connector_steps, seed)]
        return [*(first if connector_first else []),
                tune("tiny_llava_lora.yaml", connector if connector_first else Path(start), adapter, size.lora_steps,
                     seed),
                ["merge", "--adapter", str(adapter), "--out", str(merged), "--overwrite"]]  # fmt: skip

    def tune_stages(section: Path, title: str) -> list[Stage]:
        arms = section_arms(section)
        return [stage(f"{section.name}-tune-s{seed}", f"{title} (tuning seed {seed})",
                      [c for arm in arms for c in tuning(arm, seed)], [arm_model(arm, seed)[1] for arm in arms],
                      group=f"{section.name}-tune")  # the seeds are independent: they may run at once
                for seed in plan.tune_seeds]  # fmt: skip

    def swap(mllm_in: str | Path, encoder: str | Path, mode: str, out: Path) -> list[str]:
        return ["swap", "--mllm", str(mllm_in), "--encoder", str(encoder), "--mode", mode,
                "--out", str(out), "--overwrite"]  # fmt: skip

    def evaluate(section: Path, group: str = "") -> Stage:
        models = eval_models(plan)[section.name]
        tasks = "shapes_vqa,shapes_mmvp"
        argv = ["eval", "--model", ",".join(f"{k}={v}" for k, v in models.items()), "--tasks", tasks,
                "--shapes", str(SHAPES), "--limit", str(size.eval_limit), "--batch-size", "8",
                "--out", str(EVAL[section.name])]  # fmt: skip
        return stage(f"{section.name}-eval", f"{SECTIONS[section.name].split(':')[0]}: score the LLaVAs with lmms-eval ({tasks})", [argv],
                     [EVAL[section.name] / "comparison.csv"], group)  # fmt: skip

    def probe(folder: str, towers: dict[str, str | Path]) -> list[str]:
        return ["probe", "--encoder", ",".join(str(t) for t in towers.values()), "--data", str(SHAPES),
                "--labels", ",".join(size.probe_labels), "--out", folder, "--overwrite"]  # fmt: skip

    def base_commands() -> list[list[str]]:
        """The existing MLLM: :func:`mllm_swap.base_llava.base_llava` (the recipe the calibration shares)."""
        sizes = BaseSize(size.base_steps, size.connector_steps, size.base_lora_steps)
        return [argv for argv, _ in base_llava(plan.clip, SHAPES, SAIL / "mllm", SAIL / "tune", BASE, sizes, plan.seed)]

    steps = ["--steps", str(size.pretrain_steps)] if size.pretrain_steps else []
    pretrain = {kind: ["pretrain", kind, "--data", str(SHAPES), "--seed", str(plan.seed), *steps, "--out",
                       f"models/{kind}", "--overwrite"]
                for kind in ("clip", "dino")}  # fmt: skip
    (world_probe, world_towers), (kuea_probe, kuea_towers) = probe_towers(plan).items()
    mmvp = [["data", "mmvp", "--data", str(SHAPES), "--clip", plan.clip, "--dino", plan.dino,
             "--seed", str(plan.seed), *size.mmvp]]  # fmt: skip
    rebuild, clip_rebuild, dropin = (Path(ARMS[arm][1]) for arm in ("sail", "clip-rebuild", "kuea"))
    kuea_student = f"student={plan.clip}", f"target={plan.dino}"
    stages = [
        stage(
            "000_world-data",
            "Shapes world",
            [["data", "shapes", "--out", str(SHAPES), "--n", str(size.shapes), "--seed", str(plan.seed)]],
            [SHAPES / "meta.json", SHAPES / "pairs.jsonl"],
        ),  # fmt: skip
        *(
            stage(f"000_world-{kind}", f"Tiny {name} pretrained on this world", [argv], [Path(argv[-2])],
                  group="000_world-models")  # the two towers are independent: they may train at once
            for (kind, argv), name in zip(pretrain.items(), ("CLIP", "DINOv2"), strict=True)
        ),  # fmt: skip
        stage(
            "000_world-probe",
            "Linear probes: what each tower knows",
            [probe(world_probe, world_towers), *mmvp],
            [Path(world_probe) / "probe.json", *([SHAPES / MMVP_PAIRS] if mmvp else [])],
        ),  # fmt: skip
        stage(
            "001_freeze_align-rank",
            "Rank encoder pairs (debiased CKA, mutual kNN) and the CKA toy",
            [
                [
                    "rank",
                    "--vision",
                    ",".join(dict.fromkeys([plan.clip, plan.dino, *RANDOM_TOWERS])),
                    "--text",
                    ",".join(TEXT_ENCODERS),
                    "--data",
                    str(SHAPES),
                    "--n",
                    str(size.score_n),
                    "--metrics",
                    "cka,mknn",
                    "--seed",
                    str(plan.seed),
                    "--out",
                    str(FREEZE / "rank"),
                ],
                [
                    "rank",
                    "toy",
                    "--instances",
                    str(size.toy_instances),
                    "--seed",
                    str(plan.seed),
                    "--out",
                    str(FREEZE / "toy"),
                ],
            ],
            [FREEZE / "rank" / "scores.json", FREEZE / "toy" / "toy.json"],
            group=AFTER_PROBE,
        ),  # fmt: skip
        stage(
            "001_freeze_align-align",
            "Align: freeze_align, zero-shot",
            [
                align("freeze_align", "tiny_freeze_align.yaml", FREEZE / "align", f"vision={plan.dino}"),
                *zeroshot(FREEZE),
            ],
            [ARTIFACTS["freeze_align"], FREEZE / "zeroshot"],
            group=AFTER_PROBE,
        ),  # fmt: skip
        stage(
            "002_sail-align",
            "Align: SAIL, zero-shot",
            [align("sail", "tiny_sail.yaml", SAIL / "align", f"vision={plan.dino}"), *zeroshot(SAIL)],
            [ARTIFACTS["sail"], SAIL / "zeroshot"],
            group=AFTER_PROBE,
        ),  # fmt: skip
        stage(
            "002_sail-base",
            "The existing MLLM: tiny LLaVA with the CLIP (language LoRA, then a fresh connector: connector, LoRA)",
            base_commands(),
            [BASE],
            group=AFTER_PROBE,
        ),
        stage(
            "002_sail-rebuild",
            "Swap: the SAIL tower rebuilt into the LLaVA, and the CLIP rebuilt the same way (the control)",
            [
                swap(BASE, ARTIFACTS["sail"], "rebuild", rebuild),
                swap(BASE, plan.clip, "rebuild", clip_rebuild),
            ],
            [rebuild / "swap_report.json", clip_rebuild / "swap_report.json"],
        ),
        *tune_stages(SAIL, "Tune both rebuilds alike: connector, then LoRA"),
        evaluate(SAIL, AFTER_SAIL),
        stage(
            "003_kuea-align",
            "Align: KUEA and its no-anchor ablation, zero-shot, probes",
            [
                align("kuea", "tiny_kuea.yaml", KUEA / "align", *kuea_student),
                align(
                    "kuea", "tiny_kuea.yaml", KUEA / "align-noanchor", *kuea_student, "loss.anchor_weight=0"
                ),
                *zeroshot(KUEA),
                probe(kuea_probe, kuea_towers),
            ],
            [
                ARTIFACTS["kuea"],
                ARTIFACTS["kuea-noanchor"],
                KUEA / "zeroshot",
                Path(kuea_probe) / "probe.json",
            ],
            group=AFTER_SAIL,
        ),  # fmt: skip
        stage(
            "003_kuea-dropin",
            "Swap: the KUEA CLIP dropped into the LLaVA (no tuning)",
            [swap(BASE, ARTIFACTS["kuea"], "dropin", dropin)],
            [dropin / "swap_report.json"],
        ),
        *tune_stages(KUEA, "Tune the KUEA drop-in and the original alike: LoRA"),
        evaluate(KUEA, AFTER_KUEA),
    ]
    from mllm_swap.demo.swaps import swap_stages  # noqa: PLC0415 (section 004 builds on this module)

    return stages + swap_stages(plan, stage=stage, swap=swap, tune=tune, tune_stages=tune_stages, evaluate=evaluate)
