"""Connector pretraining (stage 1) with the frozen tower's tokens read from a cache vs the live tower.

Both variants run the same `tune` connector stage (same model, data, seed, steps) on the shapes world; the
cached one reads `tower_cache` (an image token cache written once by `encode --pool tokens`). Reported: the
training loop's wall time and samples/s of each (model loading excluded: the loop's own clock), the speed
ratio, where a step's time goes (the data path: conversations tokenized, images or cached tokens read; the
model: forward + backward), the one-off cost of writing the cache (and after how many steps it pays for itself), and the
cache's disk cost beside the images it replaces. The machine's load average is printed with the numbers.

    python benchmarks/bench_cached_stage1.py [--model tiny-llava] [--encoder tiny-clip] [--layer -2]
        [--prefix drop] [--dtype fp16] [--n 512] [--steps 40] [--batch-size 16] [--out results/cached_stage1.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import common


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def step_split(cfg, batches: int = 4) -> dict:
    """Seconds per batch of the data path (conversations encoded, tokens or pixels) and of forward + backward."""
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
    return {"data_s_per_batch": round(data_s, 4), "model_s_per_batch": round((time.perf_counter() - start) / batches, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--encoder", default="tiny-clip", help="the encoder the model's tower is (the cache's)")
    parser.add_argument("--layer", type=int, default=-2)
    parser.add_argument("--prefix", choices=["keep", "drop"], default="drop")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16")
    parser.add_argument("--n", type=int, default=512, help="shapes-world images")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/cached_stage1.json")
    args = parser.parse_args()

    from align.data.cache import write_cache
    from align.data.shapes import generate_shapes
    from align.train.config import TrainConfig
    from mllm_swap.tune.config import TuneConfig
    from mllm_swap.tune.stage import run_tune

    work = Path(tempfile.mkdtemp(prefix="bench-cached-stage1-"))
    try:
        shapes = work / "shapes"
        generate_shapes(shapes, n=args.n, seed=0, progress=False)
        start = time.perf_counter()
        cache = write_cache(args.encoder, shapes, work / "cache", pool="tokens", layer=args.layer,
                            prefix=args.prefix, dtype=args.dtype)  # fmt: skip
        encode_s = time.perf_counter() - start

        def stage(**kw) -> TuneConfig:
            train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, log_every=10,
                                report_to=["jsonl"], save_every=0)  # fmt: skip
            return TuneConfig(model=args.model, data=shapes / "instruct.json", image_folder=shapes,
                              stage="connector", max_length=256, train=train, **kw)  # fmt: skip

        rows = []
        for name, cfg in (("live tower", stage()), ("cached tokens", stage(tower_cache=cache))):
            result = run_tune(cfg, work / name.replace(" ", "-"))
            rows.append({
                "variant": name, "loop_s": round(result.elapsed_s, 2),
                "samples_per_s": round(result.samples_per_s, 1), "final_loss": round(result.final_loss, 5),
                **step_split(cfg),
            })  # fmt: skip
        ratio = rows[0]["loop_s"] / rows[1]["loop_s"]
        per_step_saved = (rows[0]["loop_s"] - rows[1]["loop_s"]) / args.steps
        cache_bytes, image_bytes = dir_bytes(cache), dir_bytes(shapes / "images")
        summary = {
            "speed_ratio": round(ratio, 2),
            "encode_s": round(encode_s, 2),
            "break_even_steps": round(encode_s / per_step_saved) if per_step_saved > 0 else None,
            "cache_bytes": cache_bytes,
            "cache_bytes_per_image": round(cache_bytes / args.n),
            "image_bytes": image_bytes,
            "load_average": os.getloadavg(),
        }
        common.print_table(
            rows, ["variant", "loop_s", "samples_per_s", "final_loss", "data_s_per_batch", "model_s_per_batch"]
        )
        print(
            f"speed ratio {ratio:.2f}x; cache: {common.fmt_bytes(cache_bytes)} ({args.dtype}, "
            f"{common.fmt_bytes(cache_bytes / args.n)}/image) beside {common.fmt_bytes(image_bytes)} of PNGs, "
            f"written in {encode_s:.1f} s (pays for itself after {summary['break_even_steps']} steps); "
            f"load average {summary['load_average'][0]:.2f}"
        )
        common.write_results(args.out, {"machine": common.machine_info(), "args": vars(args), "rows": rows,
                                        "summary": summary})  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
