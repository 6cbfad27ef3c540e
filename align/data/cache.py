"""Embedding cache: encode a data source once into memory-mapped safetensors shards.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from align.data.images import ImageTextDataset
from align.distributed import check_world_size, launch_state, launched_world_size
from align.encoders.base import TextEncoder, VisionEncoder
from align.integrity import CorruptFileError, verify_file
from align.io import atomic_path, read_json, sha256_file, write_json
from align.paths import portable_tree
from align.rundir import OutDir, OutDirError, claims_out_dir

CACHE_VERSION = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_POOLS = ("cls", "mean", "concat", "projected", "tokens")
TEXT_POOLS = ("sentence", "tokens")
_NP_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "BOOL": np.bool_,
    "U8": np.uint8,
}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _load_encoder(encoder: str | VisionEncoder | TextEncoder, modality: str) -> VisionEncoder | TextEncoder:
    if not isinstance(encoder, str | os.PathLike):
        return encoder
    from align.encoders import load_text_encoder, load_vision_encoder

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


def _encode_images(encoder: VisionEncoder, pixels: torch.Tensor, pool: str) -> dict[str, torch.Tensor]:
    if pool == "tokens":
        return {"embeddings": encoder(pixels)}
    return {"embeddings": encoder.pooled(pixels, pool)}


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
    on_error: str = "raise",
    device: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Encode ``source`` (a path for :func:`align.data.readers.open_data` or a ``DataSource``) into ``out``.

    Rerunning with the same arguments resumes: finished, intact shards are kept; the rest are redone.
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
    if not stale and (out / "manifest.json").is_file() and all(
        _shard_done(out, k) for k in range(_num_shards(config))
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
                encoded = _encode_images(
                    encoder, batch["images"].to(param.device, param.dtype), config["pool"]
                )
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


def _check_shard(manifest: Path, record: dict, arrays: dict[str, np.ndarray], config: dict) -> None:
    """Cross-check one manifest record against its shard's tensors: rows, ids and source rows agree."""
    rows, index = record.get("rows"), arrays.get("row_index")
    n_emb = arrays["embeddings"].shape[0] if arrays["embeddings"].ndim > 1 else 0
    problems = []
    if index is None or len(index) != rows:
        problems.append(f"rows {rows} but row_index holds {None if index is None else len(index)}")
    elif n_emb != rows:
        problems.append(f"rows {rows} but embeddings hold {n_emb}")
    elif len(record.get("ids", ())) != rows:
        problems.append(f"rows {rows} but {len(record.get('ids', ()))} ids")
    elif rows and (
        index.min() < record.get("first_row", 0)
        or index.max() >= min(record.get("first_row", 0) + config["shard_size"], config["rows"])
    ):
        problems.append(f"row_index {int(index.min())}..{int(index.max())} outside the shard's source rows")
    sidecar = manifest.parent / f"{Path(record.get('shard', '')).stem}.json"
    if not problems and sidecar.is_file() and read_json(sidecar) != record:
        problems.append(f"its record differs from the shard's own record {sidecar.name}")
    if problems:
        raise ValueError(
            f"{manifest}: shard {record.get('shard')}: {'; '.join(problems)}; the manifest disagrees with "
            "its shard: rerun the encode command"
        )


def _memmap(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file (format: u64 header length, JSON header, raw data)."""
    with path.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    base = 8 + header_len
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            arrays[name] = np.zeros(shape, dtype=_NP_DTYPES[info["dtype"]])
            continue
        arrays[name] = np.memmap(
            path, dtype=_NP_DTYPES[info["dtype"]], mode="r", offset=base + begin, shape=shape
        )
    return arrays


class EmbeddingCache:
    """Read a cache written by :func:`write_cache` without loading it into RAM.

    ``get(rows)`` returns float32 embeddings for cache rows (``(tokens, mask)`` for token caches). Opening
    verifies every shard's size and sha256 against the manifest (hashed once per file, see
    :mod:`align.integrity`; ``verify=False`` checks sizes only) and cross-checks each manifest record
    with its shard's tensors (row counts, ids, source rows).
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        manifest_file = self.path / "manifest.json"
        if not manifest_file.is_file():
            partial = (self.path / "cache_config.json").is_file()
            hint = " (encoding is unfinished: rerun the same encode command to resume)" if partial else ""
            raise FileNotFoundError(f"{manifest_file}: no cache manifest{hint}")
        self.manifest = read_json(manifest_file)
        self._shards: list[dict[str, np.ndarray]] = []
        for record in self.manifest["shards"]:
            shard = self.path / record["shard"]
            if verify:  # sha256 + size, hashed once per file (align.integrity's memo)
                verify_file(shard, record["bytes"], record["sha256"], "cache shard")
            elif not shard.is_file() or shard.stat().st_size != record["bytes"]:
                raise ValueError(
                    f"{shard}: missing or truncated (manifest expects {record['bytes']} bytes); "
                    "rerun the encode command to redo it"
                )
            self._shards.append(_memmap(shard))
            _check_shard(manifest_file, record, self._shards[-1], self.manifest)
        counts = [r["rows"] for r in self.manifest["shards"]]
        self._offsets = np.cumsum([0, *counts])
        self.ids: list[str] = [i for r in self.manifest["shards"] for i in r["ids"]]
        self.is_tokens = self.manifest["pool"] == "tokens"
        self._bf16 = self.manifest["dtype"] == "bf16"
        # ``rows`` counts the listed samples; ``skipped`` also counts images already missing at listing time
        skipped = self.manifest.get("skipped", 0) - self.manifest.get("skipped_at_listing", 0)
        if len(self) + skipped != self.manifest["rows"]:
            raise CorruptFileError(
                f"{manifest_file}: rows {self.manifest['rows']} != {len(self)} rows in shards + "
                f"{skipped} skipped while encoding; the manifest was altered: rerun the encode command"
            )

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def dim(self) -> int:
        """Embedding width (last dimension)."""
        for shard in self._shards:
            if shard["embeddings"].size:
                return int(shard["embeddings"].shape[-1])
        raise ValueError(f"{self.path}: the cache holds no rows")

    @property
    def source_rows(self) -> np.ndarray:
        """Row index in the original source of every cache row."""
        return np.concatenate([s["row_index"] for s in self._shards])

    def _to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if self._bf16 and arr.dtype == np.uint16:
            t = t.view(torch.bfloat16)
        return t.float() if t.is_floating_point() else t

    def get(
        self, rows: Sequence[int] | torch.Tensor | np.ndarray
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the given cache rows (any order), as float32 tensors."""
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: row out of range [0, {len(self)})")
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        emb_parts, mask_parts, positions = [], [], []
        for k in np.unique(shard_of):
            sel = order[shard_of[order] == k]
            local = rows[sel] - self._offsets[k]
            emb_parts.append(self._to_tensor(self._shards[k]["embeddings"][local]))
            if self.is_tokens and "mask" in self._shards[k]:
                mask_parts.append(torch.from_numpy(np.asarray(self._shards[k]["mask"][local])))
            positions.append(sel)
        inverse = (
            torch.from_numpy(np.argsort(np.concatenate(positions)))
            if positions
            else torch.empty(0, dtype=torch.long)
        )
        emb = torch.cat(emb_parts)[inverse] if emb_parts else torch.empty(0)
        if not self.is_tokens:
            return emb
        mask = torch.cat(mask_parts)[inverse] if mask_parts else torch.ones(emb.shape[:2], dtype=torch.bool)
        return emb, mask.bool()

    def __getitem__(self, rows: Sequence[int] | torch.Tensor | np.ndarray):
        return self.get(rows)
