"""Embedding-cache writer throughput vs the encoder's bare forward pass on the same batches.

Three variants over the same shapes-world images, rows/s, in one run:
  bare      encoder.pooled() on pre-decoded, preprocessed tensors (the model alone)
  pipeline  open + decode + preprocess + encode, no writing (the data path)
  cache     write_cache end to end (data path + fp16 cast + safetensors shards + sha256 + sidecars)
The ratios pipeline/bare and cache/bare say what the data path and the writing cost.

    python benchmarks/bench_cache.py [--encoder tiny-dinov2] [--n 1024] [--batch-size 64] [--out results/cache.json]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import common
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="tiny-dinov2")
    parser.add_argument("--pool", default="concat")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/cache.json")
    args = parser.parse_args()

    from align.data.cache import write_cache
    from align.data.images import open_image
    from align.data.readers import open_data
    from align.data.shapes import generate_shapes
    from align.load import load_vision_encoder

    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        generate_shapes(work / "shapes", n=args.n, seed=0, progress=False)
        data = open_data(work / "shapes")
        encoder = load_vision_encoder(args.encoder)
        images = [open_image(s.image) for s in data]
        batches = [
            encoder.preprocess(images[i : i + args.batch_size])
            for i in range(0, len(images), args.batch_size)
        ]

        @torch.no_grad()
        def bare() -> None:
            for pixels in batches:
                encoder.pooled(pixels, args.pool)

        @torch.no_grad()
        def pipeline() -> None:
            loader = data.dataset(batch_transform=encoder.preprocess).loader(batch_size=args.batch_size)
            for batch in loader:
                encoder.pooled(batch["images"], args.pool)

        def cache() -> None:
            out = work / "cache"
            shutil.rmtree(out, ignore_errors=True)
            write_cache(encoder, data, out, pool=args.pool, batch_size=args.batch_size, dtype="fp16")

        rows = []
        for name, fn in (("bare", bare), ("pipeline", pipeline), ("cache", cache)):
            result = common.measure(fn, repeats=args.repeats, warmup=1)
            rows.append(
                {
                    "variant": name,
                    "seconds": round(result["seconds"], 3),
                    "rows_per_s": round(len(data) / result["seconds"], 1),
                }
            )
        for row in rows:
            row["throughput_vs_bare"] = round(row["rows_per_s"] / rows[0]["rows_per_s"], 3)
        common.print_table(rows, ["variant", "seconds", "rows_per_s", "throughput_vs_bare"])
        common.write_results(args.out, {"machine": common.machine_info(), "args": vars(args), "rows": rows})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
