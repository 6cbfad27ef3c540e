"""Connector pretraining (stage 1) with the frozen tower's tokens read from a cache vs the live tower.

Both variants run the same `tune` connector stage (same model, data, seed, steps) on the shapes world; the
cached one reads `tower_cache` (an image token cache written once by `encode --pool tokens`). Both tokenise the
conversations once when the dataset is made (reported as `tokenise_s`, outside the loop). Cases: `tiny`, the
tiny LLaVA as built (tiny-clip tower), and `large`, a real-size tower (`--large-encoder`, a `random:` shipped
config with seeded random weights) swapped by rebuild into the tiny LLaVA, so the tower is most of a step.
Reported per case: the training loop's wall time and samples/s of each variant (the loop's own clock: model
loading and tokenising excluded), the speed ratio within the run, where a step's time goes (the data path:
images read and processed, or cached tokens read; the model: forward + backward), the one-off cost of writing
the cache (and after how many steps it pays for itself), and the cache's disk cost beside the images it
replaces. The machine's load average is printed with the numbers.

    python benchmarks/bench_cached_stage1.py [--cases tiny,large] [--large-encoder random:openai/clip-vit-base-patch16]
        [--dtype fp16] [--n 256] [--steps 20] [--batch-size 8] [--out results/cached_stage1.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import common

COLUMNS = ["case", "variant", "loop_s", "samples_per_s", "final_loss", "tokenise_s", "data_s_per_batch",
           "model_s_per_batch"]  # fmt: skip


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def step_split(cfg, batches: int = 4) -> dict:
    """Seconds to tokenise the conversations (once, as the stage does), and per batch of the data path (images
    or cached tokens) and of forward + backward."""
    from mllm_swap.tune.stage import TuneMethod

    method = TuneMethod(cfg)
    model = method.build_model(cfg.train)
    loader = iter(method.dataloader(cfg.train.batch_size, 0))
    start = time.perf_counter()
    data = [next(loader) for _ in range(batches)]
    data_s = (time.perf_counter() - start) / batches
    start = time.perf_counter()
    for batch in data:
        method.loss(model, batch)[0].backward()
    model_s = (time.perf_counter() - start) / batches
    return {"tokenise_s": round(method.dataset.tokenise_s, 2), "data_s_per_batch": round(data_s, 4),
            "model_s_per_batch": round(model_s, 4)}  # fmt: skip


def run_case(case: str, model: str, encoder: str, args: argparse.Namespace, work: Path, shapes: Path) -> tuple:
    """(rows, summary) of the live and the cached stage on ``model`` whose tower is ``encoder``."""
    from align.data.cache import write_cache
    from align.train.config import TrainConfig
    from mllm_swap.tune.config import TuneConfig
    from mllm_swap.tune.stage import run_tune

    start = time.perf_counter()
    cache = write_cache(encoder, shapes, work / f"cache-{case}", pool="tokens", layer=-2, prefix="drop",
                        dtype=args.dtype)  # fmt: skip
    encode_s = time.perf_counter() - start

    def stage(**kw) -> TuneConfig:
        train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, log_every=10,
                            report_to=["jsonl"], save_every=0)  # fmt: skip
        return TuneConfig(model=model, data=shapes / "instruct.json", image_folder=shapes, stage="connector",
                          max_length=args.max_length, train=train, **kw)  # fmt: skip

    rows = []
    for name, cfg in (("live tower", stage()), ("cached tokens", stage(tower_cache=cache))):
        result = run_tune(cfg, work / f"{case}-{name.replace(' ', '-')}")
        rows.append({
            "case": case, "variant": name, "loop_s": round(result.elapsed_s, 2),
            "samples_per_s": round(result.samples_per_s, 1), "final_loss": round(result.final_loss, 5),
            **step_split(cfg),
        })  # fmt: skip
    ratio = rows[0]["loop_s"] / rows[1]["loop_s"]
    per_step_saved = (rows[0]["loop_s"] - rows[1]["loop_s"]) / args.steps
    cache_bytes, image_bytes = dir_bytes(cache), dir_bytes(shapes / "images")
    summary = {
        "case": case,
        "model": model if case == "tiny" else f"tiny-llava with {encoder} swapped in (rebuild)",
        "encoder": encoder,
        "speed_ratio": round(ratio, 2),
        "encode_s": round(encode_s, 2),
        "break_even_steps": round(encode_s / per_step_saved) if per_step_saved > 0 else None,
        "cache_bytes": cache_bytes,
        "cache_bytes_per_image": round(cache_bytes / args.n),
        "image_bytes": image_bytes,
        "load_average": os.getloadavg(),
    }
    print(
        f"{case}: speed ratio {ratio:.2f}x; cache: {common.fmt_bytes(cache_bytes)} ({args.dtype}, "
        f"{common.fmt_bytes(cache_bytes / args.n)}/image) beside {common.fmt_bytes(image_bytes)} of PNGs, "
        f"written in {encode_s:.1f} s (pays for itself after {summary['break_even_steps']} steps); "
        f"load average {summary['load_average'][0]:.2f}",
        flush=True,
    )
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="tiny,large", help="comma-separated: tiny, large")
    parser.add_argument("--large-encoder", default="random:openai/clip-vit-base-patch16",
                        help="the real-size tower swapped (rebuild) into the tiny LLaVA for the 'large' case")  # fmt: skip
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16")
    parser.add_argument("--n", type=int, default=256, help="shapes-world images")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=384, help="room for a real-size tower's 196 tokens")
    parser.add_argument("--out", default="benchmarks/results/cached_stage1.json")
    args = parser.parse_args()

    from align.data.shapes import generate_shapes
    from mllm_swap.swap import swap

    work = Path(tempfile.mkdtemp(prefix="bench-cached-stage1-"))
    try:
        shapes = work / "shapes"
        generate_shapes(shapes, n=args.n, seed=0, progress=False)
        rows, summaries = [], []
        for case in args.cases.split(","):
            if case == "tiny":
                model, encoder = "tiny-llava", "tiny-clip"
            elif case == "large":
                model, encoder = str(work / "swapped"), args.large_encoder
                swap("tiny-llava", encoder, model, mode="rebuild", verbose=False)
            else:
                raise SystemExit(f"--cases: unknown case {case!r} (expected tiny, large)")
            case_rows, summary = run_case(case, model, encoder, args, work, shapes)
            rows += case_rows
            summaries.append(summary)
        common.print_table(rows, COLUMNS)
        common.write_results(args.out, {"machine": common.machine_info(), "args": vars(args), "rows": rows,
                                        "summaries": summaries}, columns=COLUMNS)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
