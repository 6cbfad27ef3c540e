"""The data order of a run: epoch ``e``'s order is a function of (seed, e) only, so a resumed run
skips the batches already consumed and then sees exactly the batches an uninterrupted run would."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, IterableDataset

from align.train.config import TrainConfig

__all__ = ["BatchStream", "PermutationSampler", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order: a fixed function of the run seed and the epoch."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class PermutationSampler(torch.utils.data.Sampler[int]):
    """Indices ``0..n-1`` in an order fixed by ``seed`` (a random permutation computed when iterated).

    It holds no per-epoch state, so restarting a run re-creates exactly the same order.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = int(n), int(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        yield from torch.randperm(self.n, generator=generator).tolist()


class BatchStream:
    """Micro-batches as one stream across epochs; epoch ``e``'s order depends on (seed, e) only."""

    def __init__(self, method: Any, cfg: TrainConfig, accelerator: Accelerator) -> None:
        if not (hasattr(method, "dataloader") or hasattr(method, "train_dataset")):
            raise TypeError(f"{type(method).__name__}: a Method needs train_dataset() or dataloader()")
        self.method, self.cfg, self.accelerator = method, cfg, accelerator
        self.dataset = None if hasattr(method, "dataloader") else method.train_dataset()
        sized = self.dataset is not None and not isinstance(self.dataset, IterableDataset)
        if sized and len(self.dataset) < cfg.batch_size:
            raise ValueError(
                f"train dataset has {len(self.dataset)} samples, fewer than batch_size {cfg.batch_size}"
            )
        self.epoch, self.pos, self._iter = 0, 0, None

    def loader(self, epoch: int) -> Iterable:
        """The unprepared loader of one epoch."""
        seed = epoch_seed(self.cfg.seed, epoch)
        if self.dataset is None:
            return self.method.dataloader(self.cfg.batch_size, seed)
        sampler = None
        if not isinstance(self.dataset, IterableDataset):
            sampler = PermutationSampler(len(self.dataset), seed)
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.cfg.num_workers,
            collate_fn=getattr(self.method, "collate", None),
            generator=torch.Generator().manual_seed(seed),
        )

    def start(self, prepared: Any, epoch: int, skip: int) -> None:
        """Begin at batch ``skip`` of epoch ``epoch`` from its already prepared loader."""
        self.epoch, self.pos = epoch, skip
        self._open(self.accelerator.skip_first_batches(prepared, skip) if skip else prepared)

    def _open(self, loader: Any) -> None:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        self._iter = iter(loader)

    def next(self) -> Any:
        """The next micro-batch; at the end of an epoch the next epoch's loader is opened."""
        while True:
            try:
                batch = next(self._iter)
            except StopIteration:
                if self.pos == 0:
                    raise ValueError(f"the training data gave no batch in epoch {self.epoch}") from None
                self.epoch, self.pos = self.epoch + 1, 0
                self._open(self.accelerator.prepare_data_loader(self.loader(self.epoch)))
                continue
            self.pos += 1
            return batch
