"""``mllm-swap encode``: cache embeddings of a data source once (resumable, sharded safetensors)."""

from __future__ import annotations

import argparse

from mllm_swap.commands.options import add_overwrite, at_least, device

HELP = "cache embeddings of a data source (SAIL's pre-encoding step)"
DESCRIPTION = (
    "Encode every sample of --data with --encoder into sharded safetensors under --out, plus a "
    "manifest. Rerun the same command to resume after a kill: finished shards are checked and kept. Under "
    "`accelerate launch` each process encodes its own shards."
)


def run(args: argparse.Namespace) -> int:
    from align.data.cache import write_cache
    from align.data.cache_read import EmbeddingCache
    from align.distributed import global_rank

    pool = args.pool or ("concat" if args.modality == "image" else "sentence")
    out = write_cache(
        args.encoder,
        args.data,
        args.out,
        modality=args.modality,
        pool=pool,
        batch_size=args.batch_size,
        dtype=args.dtype,
        shard_size=args.shard_size,
        caption_index=args.caption_index,
        max_tokens=args.max_tokens,
        layer=args.layer,
        prefix=args.prefix,
        on_error=args.on_error,
        device=args.device,
        overwrite=args.overwrite,
    )
    if global_rank() != 0:  # under `accelerate launch`, report once
        return 0
    cache = EmbeddingCache(out)
    m = cache.manifest
    print(
        f"{out}: {len(cache)} rows x {cache.dim} ({m['modality']}, pool={m['pool']}, {m['dtype']}) in "
        f"{len(m['shards'])} shard(s); skipped {m['skipped']}"
    )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``encode``."""
    parser.add_argument("--encoder", required=True, help="encoder id or directory (see `mllm-swap encoders`)")
    parser.add_argument(
        "--data", required=True, help="pairs .jsonl/.csv, shapes dir, image folder, HF dataset, tars"
    )
    parser.add_argument("--modality", choices=["image", "text"], default="image")
    parser.add_argument(
        "--pool",
        choices=["concat", "cls", "mean", "projected", "tokens", "sentence"],
        help="image: concat (default), cls, mean, projected, tokens; text: sentence (default), tokens",
    )
    parser.add_argument("--out", required=True, help="cache directory")
    parser.add_argument("--batch-size", type=at_least(1), default=64)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--shard-size", type=at_least(1), default=4096, help="rows per shard")
    parser.add_argument(
        "--caption-index", type=at_least(0), default=0, help="text: which caption of each sample"
    )
    parser.add_argument(
        "--max-tokens", type=at_least(1), default=77, help="text tokens: padded/truncated length"
    )
    parser.add_argument(
        "--layer", type=int, default=-1,
        help="image tokens: the hidden-state layer (-1 the final token output, -2 what LLaVA consumes)",
    )  # fmt: skip
    parser.add_argument(
        "--prefix", choices=["keep", "drop"], default="keep",
        help="image tokens: keep or drop the prefix tokens (CLS, registers); a cache for connector "
        "pretraining (tune's tower_cache) drops them as the swapped MLLM does",
    )  # fmt: skip
    parser.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="missing or corrupt images: fail (default) or skip and count",
    )
    parser.add_argument("--device", type=device, help="e.g. cuda; default: CPU")
    add_overwrite(parser)
