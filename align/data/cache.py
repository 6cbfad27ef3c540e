"""Embedding cache, the writer: encode a data source once into safetensors shards (read them with
:class:`align.data.cache_read.EmbeddingCache`).

Layout of a cache directory::

    cache_config.json          what is being encoded (encoder spec, pooling, dtype, rows, shard size)
    shard-00000.safetensors    ``embeddings`` [rows, D] or [rows, T, D] (+ ``mask`` [rows, T]), ``row_index`` [rows]
    shard-00000.json           sidecar written after its shard: rows, ids, sha256 (the shard's completion record)
    manifest.json              written last: the config plus every shard's record

Resuming runs the same command again: a shard counts as done only when its sidecar exists and the shard's
bytes match the recorded sha256, so a shard cut off mid-write or corrupted later is redone, never read.
Under ``accelerate launch`` each process encodes the shards ``k`` with ``k % world_size == rank``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from align.data.records import ImageTextDataset
from align.distributed import check_world_size, launch_state, launched_world_size
from align.encoders.base import TextEncoder, VisionEncoder
from align.io import atomic_path, read_json, sha256_file, write_json
from align.paths import portable_tree
from align.rundir import OutDir, OutDirError, claims_out_dir

CACHE_VERSION = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_POOLS = ("cls", "mean", "concat", "projected", "tokens")
TEXT_POOLS = ("sentence", "tokens")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _load_encoder(encoder: str | VisionEncoder | TextEncoder, modality: str) -> VisionEncoder | TextEncoder:
    if not isinstance(encoder, str | os.PathLike):
        return encoder
    from align.load import load_text_encoder, load_vision_encoder

    return load_vision_encoder(encoder) if modality == "image" else load_text_encoder(encoder)


def _check_request(encoder: VisionEncoder | TextEncoder, modality: str, pool: str) -> None:
    if modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    pools = IMAGE_POOLS if modality == "image" else TEXT_POOLS
    if pool not in pools:
        raise ValueError(f"pool {pool!r} is not valid for {modality} caches; expected one of {list(pools)}")
    if modality == "image" and pool != "tokens" and pool not in encoder.poolings:
        raise ValueError(
            f"{encoder.source}: pooling {pool!r} not available; it offers {list(encoder.poolings)}"
        )


def _encode_images(encoder: VisionEncoder, pixels: torch.Tensor, config: dict) -> dict[str, torch.Tensor]:
    if config["pool"] == "tokens":
        return {"embeddings": image_tokens(encoder, pixels, config["layer"], config["prefix"])}
    return {"embeddings": encoder.pooled(pixels, config["pool"])}


def image_tokens(encoder: VisionEncoder, pixels: torch.Tensor, layer: int, prefix: str) -> torch.Tensor:
    """Tokens of hidden-state ``layer`` (``VisionEncoder`` indexing), prefix tokens kept or dropped."""
    tokens = encoder(pixels, layer=layer)
    return tokens[:, encoder.num_prefix_tokens :] if prefix == "drop" else tokens


def probe_pixels(image_size: int) -> torch.Tensor:
    """A fixed input ``[1, 3, S, S]`` (seeded noise) whose tokens fingerprint the model that made a token cache."""
    return torch.randn((1, 3, image_size, image_size), generator=torch.Generator().manual_seed(0))


def fingerprint(tokens: torch.Tensor) -> dict[str, list[float]]:
    """A model's token fingerprint from its tokens ``[1, T, D]`` of :func:`probe_pixels`: the mean token and the
    first two tokens (3 D numbers, however many tokens)."""
    tokens = tokens.detach().float().cpu()[0]
    return {"mean": tokens.mean(0).tolist(), "first": tokens[:2].flatten().tolist()}


def _encode_texts(
    encoder: TextEncoder, texts: list[str], pool: str, max_tokens: int
) -> dict[str, torch.Tensor]:
    batch = encoder.tokenize(texts)
    device = next(encoder.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if pool == "sentence":  # the model's whole sentence pipeline, its Normalize module included
        emb = encoder.sentence_embedding(ids, mask)
        return {"embeddings": torch.nn.functional.normalize(emb, dim=-1) if encoder.normalize_output else emb}
    tokens = encoder.token_features(ids, mask)[:, :max_tokens]
    mask = mask[:, :max_tokens].bool()
    pad = max_tokens - tokens.shape[1]
    if pad > 0:
        tokens = torch.nn.functional.pad(tokens, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
    return {"embeddings": tokens, "mask": mask}


def _shard_done(out: Path, k: int) -> dict | None:
    """The shard's sidecar record if the shard is complete and intact, else None."""
    sidecar, shard = out / f"{shard_name(k)}.json", out / f"{shard_name(k)}.safetensors"
    if not sidecar.is_file() or not shard.is_file():
        return None
    record = json.loads(sidecar.read_text())
    if shard.stat().st_size != record.get("bytes") or sha256_file(shard) != record.get("sha256"):
        return None
    return record


def _dist() -> tuple[int, int, Any]:
    """(rank, world_size, state) under accelerate; (0, 1, None) otherwise."""
    if launched_world_size() > 1:
        state = check_world_size(launch_state())
        return state.process_index, state.num_processes, state
    return 0, 1, None


def _cache_files(out: Path) -> list[str] | None:
    """The files of a cache at ``out`` (None when it holds none): what an overwrite may remove."""
    if not (out / "cache_config.json").is_file():
        return None
    shards = [p.name for p in out.glob("shard-*") if p.suffix in (".safetensors", ".json")]
    return sorted(["cache_config.json", "manifest.json", *shards])


@claims_out_dir("encode", out_arg="out", adopt=_cache_files, collective=True, reuse=True)
@torch.no_grad()
def write_cache(
    encoder: str | VisionEncoder | TextEncoder,
    source: Any,
    out: str | os.PathLike,
    modality: str = "image",
    pool: str = "concat",
    batch_size: int = 64,
    dtype: str = "fp16",
    shard_size: int = 4096,
    caption_index: int = 0,
    max_tokens: int = 77,
    layer: int = -1,
    prefix: str = "keep",
    on_error: str = "raise",
    device: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Encode ``source`` (a path for :func:`align.data.readers.open_data` or a ``DataSource``) into ``out``.

    Rerunning with the same arguments resumes: finished, intact shards are kept; the rest are redone.
    Image ``tokens`` caches hold hidden-state ``layer`` with the prefix tokens (CLS, registers) kept or
    dropped (``prefix``), and record both with the model's :func:`fingerprint`, so a reader (a connector
    pretraining stage) can check that they are what its MLLM consumes.
    A cache of other settings in ``out`` is refused, or replaced with ``overwrite``. Returns the cache directory once ``manifest.json`` is written.
    """
    from align.data.readers import open_data

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out = Path(out)
    encoder = _load_encoder(encoder, modality)
    _check_request(encoder, modality, pool)
    data = open_data(str(source), on_error=on_error) if isinstance(source, str | os.PathLike) else source
    rows = len(data)
    if rows == 0:
        raise ValueError(f"{getattr(data, 'source', source)}: no samples to encode")
    if modality == "text":
        missing = [s.id for s in data.samples if len(s.texts) <= caption_index]
        if missing:
            raise ValueError(
                f"{data.source}: {len(missing)} sample(s) have no caption #{caption_index} "
                f"(first ids: {missing[:5]})"
            )
    config = {
        "version": CACHE_VERSION,
        "encoder": encoder.spec,
        "modality": modality,
        "pool": pool,
        "dtype": dtype,
        "source": str(getattr(data, "source", source)),
        "rows": rows,
        "shard_size": shard_size,
        "caption_index": caption_index if modality == "text" else None,
        "max_tokens": max_tokens if pool == "tokens" and modality == "text" else None,
    }
    if modality == "image" and pool == "tokens":  # what an MLLM consumes: its layer, its prefix rule
        if prefix not in ("keep", "drop"):
            raise ValueError(f"prefix must be 'keep' or 'drop', got {prefix!r}")
        param = next(encoder.parameters())
        probe = probe_pixels(int(encoder.image_size)).to(param.device, param.dtype)
        config.update(
            layer=layer, prefix=prefix, fingerprint=fingerprint(image_tokens(encoder, probe, layer, prefix))
        )
    config = portable_tree(config, out)  # the cache travels: no absolute path in it
    rank, world, state = _dist()
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "cache_config.json"
    stale = config_file.is_file() and read_json(config_file) != config
    if stale and not overwrite:
        raise OutDirError(
            f"{out}: holds a cache of different settings ({config_file}); choose another --out "
            "or pass --overwrite to replace it"
        )
    # Every process decides alike (nothing is written before this point), so all return or none.
    if (
        not stale
        and (out / "manifest.json").is_file()
        and all(_shard_done(out, k) for k in range(_num_shards(config)))
    ):
        return out
    if rank == 0:
        if stale:
            OutDir.current(out).clear(_cache_files(out) or [])
        write_json(config_file, config)
    if state is not None:
        state.wait_for_everyone()

    if device:
        encoder.to(device)
    encoder.eval()
    todo = [k for k in range(_num_shards(config)) if k % world == rank and _shard_done(out, k) is None]
    if world > 1:
        print(f"encode {modality} {out.name}: process {rank} of {world} encodes shards {todo}", flush=True)
    bar = tqdm(
        total=sum(min(shard_size, rows - k * shard_size) for k in todo),
        desc=f"encode {modality}",
        unit="row",
        disable=rank != 0,
    )
    for k in todo:
        _write_shard(encoder, data, out, k, config, batch_size, bar)
    bar.close()
    if state is not None:
        state.wait_for_everyone()
    if rank == 0:
        records = [_shard_done(out, k) for k in range(_num_shards(config))]
        if any(r is None for r in records):
            raise RuntimeError(f"{out}: some shards are still incomplete after encoding")
        # rows skipped while encoding, plus images missing or corrupt when the source was listed (not in rows)
        skipped = rows - sum(r["rows"] for r in records)
        manifest = {**config, "skipped": skipped + data.errors.count, "skipped_at_listing": data.errors.count}
        write_json(out / "manifest.json", {**manifest, "shards": records})
    if state is not None:  # nobody opens the cache before its manifest exists
        state.wait_for_everyone()
    return out


def _num_shards(config: dict) -> int:
    return -(-config["rows"] // config["shard_size"])


def _write_shard(encoder, data, out: Path, k: int, config: dict, batch_size: int, bar: tqdm) -> None:
    start, stop = k * config["shard_size"], min((k + 1) * config["shard_size"], config["rows"])
    samples = data.samples[start:stop]
    parts: dict[str, list[torch.Tensor]] = {}
    rows: list[int] = []
    ids: list[str] = []
    torch_dtype = DTYPES[config["dtype"]]
    if config["modality"] == "image":
        dataset = ImageTextDataset(samples, batch_transform=encoder.preprocess, on_error=data.errors.on_error)
        loader = dataset.loader(batch_size=batch_size)
        param = next(encoder.parameters())
        for batch in loader:
            if len(batch["ids"]):
                encoded = _encode_images(encoder, batch["images"].to(param.device, param.dtype), config)
                for name, value in encoded.items():
                    parts.setdefault(name, []).append(value.to("cpu", torch_dtype))
                rows += [start + int(i) for i in batch["index"]]
                ids += batch["ids"]
            bar.update(len(batch["ids"]) + len(batch["skipped"]))
    else:
        for b in range(0, len(samples), batch_size):
            chunk = samples[b : b + batch_size]
            texts = [s.texts[config["caption_index"]] for s in chunk]
            encoded = _encode_texts(encoder, texts, config["pool"], config["max_tokens"] or 0)
            for name, value in encoded.items():
                parts.setdefault(name, []).append(
                    value.cpu() if name == "mask" else value.to("cpu", torch_dtype)
                )
            rows += list(range(start + b, start + b + len(chunk)))
            ids += [s.id for s in chunk]
            bar.update(len(chunk))
    tensors = {name: torch.cat(values).contiguous() for name, values in parts.items()}
    if not tensors:  # every image of the shard was skipped
        tensors = {"embeddings": torch.empty(0, dtype=torch_dtype)}
    tensors["row_index"] = torch.tensor(rows, dtype=torch.int64)
    shard = out / f"{shard_name(k)}.safetensors"
    with atomic_path(shard) as tmp:
        save_file(tensors, str(tmp))
    record = {
        "shard": shard.name,
        "rows": len(rows),
        "first_row": start,
        "bytes": shard.stat().st_size,
        "sha256": sha256_file(shard),
        "ids": ids,
    }
    write_json(out / f"{shard_name(k)}.json", record)
