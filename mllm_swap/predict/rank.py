"""Rank candidate encoders for an MLLM without LLM training: swap each, measure, predict its VQA change.

Each candidate (encoder, mode) is swapped into the MLLM by the same ``swap`` command line the calibration ran
(:func:`mllm_swap.predict.calibrate.swap_argv`: the same held-out images, measurement count and bridge
budget), so its ``measurements`` are taken exactly as the calibration rows' were; the model fitted on the
calibration table (:mod:`mllm_swap.predict.model`) turns them into a predicted change with an interval. The
swapped checkpoints stay in ``OUT/swaps/`` (tune the best one). Writes ``predictions.json`` and
``predictions.md``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from align.errors import UserError
from align.io import read_json
from align.rundir import OutDir, claims_out_dir
from mllm_swap.predict.calibrate import Budget, RunCommand, slug, swap_argv
from mllm_swap.predict.model import fit, read_table

MODES = ("dropin", "bridge", "rebuild", "fuse")
DEFAULT_MODES = ("bridge", "rebuild")  # what every encoder allows; a fused pair A+B gets fuse


def shipped_table() -> Path:
    """The calibration table shipped with the package (built by ``mllm-swap calibrate`` with its defaults)."""
    return Path(__file__).resolve().parent / "calibration.csv"


def candidates(encoders: list[str], modes: list[str] | None) -> list[tuple[str, str]]:
    """(encoder, mode) pairs: ``A+B`` is fused, any other encoder gets ``modes`` (default :data:`DEFAULT_MODES`)."""
    bad = [m for m in modes or () if m not in MODES]
    if bad or (modes is not None and not modes):
        raise UserError(f"--mode: unknown mode(s) {bad or modes}; expected a comma-separated subset of {list(MODES)}")
    if not encoders:
        raise UserError("--encoder: expected encoder ids or paths, comma-separated (A+B for a fused pair)")
    pairs = []
    for encoder in encoders:
        fused = len(fused_parts(encoder)) > 1
        wanted = ["fuse"] if fused else [m for m in (modes or DEFAULT_MODES) if m != "fuse"]
        if modes is not None and fused and "fuse" not in modes:
            raise UserError(f"--encoder {encoder}: a fused pair is swapped by --mode fuse, not {','.join(modes)}")
        if not wanted:
            raise UserError(f"--encoder {encoder}: --mode fuse needs a pair A+B")
        pairs += [(encoder, mode) for mode in wanted]
    return pairs


def fused_parts(encoder: str) -> list[str]:
    """The parts of a fused pair ``A+B`` (one part for anything else, e.g. a path with a ``+`` in it)."""
    return encoder.split("+") if "+" in encoder and not Path(encoder).expanduser().exists() else [encoder]


def check_encoders(encoders: list[str]) -> None:
    """Fail early, naming the encoder, when one (or a fused part) cannot be loaded."""
    from align.load import load_vision_encoder

    for encoder in encoders:
        for part in fused_parts(encoder):
            try:
                load_vision_encoder(part)
            except (ValueError, KeyError, OSError) as err:
                detail = err.args[0] if isinstance(err, KeyError) and err.args else err
                raise UserError(f"--encoder {encoder}: cannot load {part!r}: {detail}") from err


def calibration_budget(table: Path) -> Budget:
    """The budget the table was built with (its ``calibration.json`` beside it), else the defaults."""
    record = table.with_suffix(".json")
    if not record.is_file():
        return Budget()
    budget = read_json(record).get("budget", {})
    return Budget(**{k: v for k, v in budget.items() if k in ("shapes", "world_seed", "bridge_steps", "measure_images")})


def default_world(budget: Budget) -> Path:
    """The shapes world the calibration measured on (generated once under the home directory)."""
    from align.data.shapes import generate_shapes
    from align.paths import home

    root = home() / "data" / f"shapes-n{budget.shapes}-s{budget.world_seed}"
    generate_shapes(root, budget.shapes, seed=budget.world_seed, progress=False)
    return root


@claims_out_dir("predict", out_arg="out")
def predict_swaps(
    mllm: str, encoders: list[str], modes: list[str] | None, out: str | os.PathLike, run_command: RunCommand, *,
    data: str | os.PathLike | None = None, calibration: str | os.PathLike | None = None, overwrite: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Swap, measure and rank every candidate; write ``out/predictions.json`` and ``.md``; return the record."""
    from align.io import atomic_path, write_json
    from align.paths import portable_tree

    pairs = candidates(encoders, modes)
    table_path = Path(calibration) if calibration is not None else shipped_table()
    fitted = fit(read_table(table_path))
    check_encoders(encoders)
    budget = calibration_budget(table_path)
    data = Path(data).resolve() if data is not None else default_world(budget)
    out = Path(out).resolve()
    mllm_arg = str(Path(mllm).resolve()) if Path(mllm).expanduser().exists() else mllm
    rows = []
    for encoder, mode in pairs:  # run from here, so encoder paths mean what they meant to the user
        folder = f"swaps/{slug(encoder, mode)}"
        argv = swap_argv(mllm_arg, encoder, mode, str(data), str(out / folder), budget.measure_images,
                         budget.bridge_steps)  # fmt: skip
        code = run_command(argv)
        if code != 0:
            raise UserError(f"candidate {encoder} ({mode}): the swap failed (exit {code}; its error is above)")
        measurements = read_json(out / folder / "swap_report.json")["measurements"]
        change, interval = fitted.predict(measurements, f"candidate {encoder} ({mode})")
        rows.append({"encoder": encoder, "mode": mode, "measurements": measurements, "predicted_change": change,
                     "interval": interval, "swap": folder})  # fmt: skip
    rows.sort(key=lambda r: -r["predicted_change"])
    for i, row in enumerate(rows):
        row["rank"] = i + 1
    source = str(table_path) if calibration is not None else "shipped: mllm_swap/predict/calibration.csv"
    record = {"mllm": mllm, "data": str(data), "calibration": {**fitted.record, "source": source},
              "candidates": rows}  # fmt: skip
    write_json(out / "predictions.json", portable_tree(record, out))
    with atomic_path(out / "predictions.md") as tmp:
        Path(tmp).write_text(format_predictions(record))
    OutDir.current(out).finish(owns=["predictions.json", "predictions.md", "swaps"])
    return record


def format_predictions(record: dict[str, Any]) -> str:
    """The ranking as markdown, with the calibration's honesty numbers and range under it."""
    cal, loeo = record["calibration"], record["calibration"]["leave_one_encoder_out"]
    rho = "n/a" if loeo["spearman"] is None else f"{loeo['spearman']:+.3f}"
    lines = [f"# Predicted VQA change of swaps into {record['mllm']}", "",
             "| rank | encoder | mode | predicted change | interval | token_cka | llm_input_cka | probe_new |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in record["candidates"]:
        m = r["measurements"]
        lines.append(f"| {r['rank']} | {r['encoder']} | {r['mode']} | {r['predicted_change']:+.3f} | "
                     f"[{r['interval'][0]:+.3f}, {r['interval'][1]:+.3f}] | {m['token_cka']:.3f} | "
                     f"{m['llm_input_cka']:.3f} | {m['probe_new']:.3f} |")  # fmt: skip
    lines += ["", f"Model: {cal['fit']['model']}, fitted on {cal['rows']} swaps of {len(cal['encoders'])} encoders "
              f"({Path(cal['source']).name}). Leave-one-encoder-out: Spearman {rho} (permutation p {loeo['spearman_permutation_p']}), MAE {loeo['mae']:.3f} "
              f"(predicting the mean: {loeo['mae_predicting_the_mean']:.3f}); {loeo['rows_beyond_2se']} of {cal['rows']} measured "
              f"changes exceed 2 SE. Interval: {cal['interval']['level']:.0%} "
              f"split-conformal from those residuals.", "", f"Range: {cal['range']}.", "",
              "Swapped checkpoints: `swaps/` (each with its swap_report.json).", ""]  # fmt: skip
    return "\n".join(lines)
