"""DINOv2's data side at the shapes world's scale: multi-crop views and the masks of iBOT.

The augmentations are DINOv2's (``dinov2/data/augmentations.py``) built from
``torchvision.transforms.v2``: random resized crops (global: scale 0.32-1 at the full size; local:
0.05-0.32 at half the size), horizontal flips, colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur
(p 1.0 / 0.1 / 0.5 for the first global, the second global and the locals) and solarization (p 0.2, second
global only). Blur kernels scale with the image (DINOv2's sigma 0.1-2 at 224 px).

Randomness comes only from a per-sample seed (a function of the epoch seed and the sample index), drawn
inside ``torch.random.fork_rng``: no global random numbers are consumed and a resumed run sees the same views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2

__all__ = ["MultiCrop", "sample_seed"]


def sample_seed(seed: int, index: int) -> int:
    """The seed of one sample's views and mask in the epoch whose seed is ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


@dataclass
class MultiCrop:
    """``__call__(image uint8 [3, H, W], seed) -> (globals [2, 3, S, S], locals [L, 3, S/2, S/2], masks [2, P])``.

    Views are normalized with ``mean``/``std`` (the tower's image processor). ``masks[g]`` marks the
    patches of global view ``g`` the student sees as mask tokens: with probability ``mask_probability``
    a random ``mask_ratio`` share of the ``(S / patch)^2`` patches, else none (iBOT's random masking).
    """

    size: int
    patch: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_local: int = 4
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)

    def __post_init__(self) -> None:
        sigma = (0.1 * self.size / 224, 2.0 * self.size / 224)
        kernel = 2 * max(1, round(4 * sigma[1])) + 1  # covers +-2 sigma of the widest blur

        def view(size: int, scale: tuple[float, float], blur: float, solarize: float) -> v2.Compose:
            return v2.Compose([
                v2.RandomResizedCrop(size, scale=scale, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=blur),
                v2.RandomSolarize(128, p=solarize),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ])  # fmt: skip

        local = self.size // 2
        if self.size % self.patch or local % self.patch:
            raise ValueError(
                f"crop sizes {self.size} and {local} must be multiples of the patch size {self.patch}"
            )
        self.global_views = [
            view(self.size, self.global_scale, 1.0, 0.0),
            view(self.size, self.global_scale, 0.1, 0.2),
        ]
        self.local_view = view(local, self.local_scale, 0.5, 0.0)
        self.num_patches = (self.size // self.patch) ** 2

    def __call__(self, image: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            globals_ = torch.stack([transform(image) for transform in self.global_views])
            locals_ = torch.stack([self.local_view(image) for _ in range(self.n_local)])
            masks = torch.zeros(len(self.global_views), self.num_patches, dtype=torch.bool)
            for g in range(len(self.global_views)):
                if torch.rand(()) < self.mask_probability:
                    low, high = self.mask_ratio
                    count = int(self.num_patches * (low + (high - low) * torch.rand(()).item()))
                    masks[g, torch.randperm(self.num_patches)[:count]] = True
        return globals_, locals_, masks
