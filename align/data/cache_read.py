"""Embedding cache, the reader: memory-maps the shards :func:`align.data.cache.write_cache` wrote and
checks them against the manifest (layout: :mod:`align.data.cache`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from align.integrity import CorruptFileError, verify_file
from align.io import read_json

__all__ = ["EmbeddingCache"]

_NP_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "BOOL": np.bool_,
    "U8": np.uint8,
}


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
