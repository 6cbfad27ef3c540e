"""A tiny DINOv2 that learned to see: self-supervised pretraining on the shapes world's images.

:class:`DinoPretrain` is a ``Method`` of the shared loop (:func:`align.train.loop.train`) trained the way
DINOv2 was (``facebookresearch/dinov2``, ``ssl_meta_arch.py``), at toy scale:

* a student and an EMA teacher (HF ``Dinov2Model``, or ``Dinov2WithRegistersModel`` with registers), each
  with a projection head ending in weight-normalised prototypes (:class:`DinoHead`); the teacher follows
  the student after every step with a momentum rising from ``momentum`` to 1 on a cosine;
* multi-crop views (:class:`align.pretrain.augment.MultiCrop`): two global crops at the tower's image size
  and ``local_crops`` at half of it (HF Dinov2 interpolates its position embeddings);
* the DINO loss on the CLS token, the teacher centred (``centering``: DINO's EMA of its batch means, or
  DINOv2's Sinkhorn-Knopp) and sharpened (temperature warming up from ``teacher_temp[0]`` to
  ``teacher_temp[1]``), the iBOT loss on the patches the student saw as mask tokens (``bool_masked_pos``)
  against the teacher's unmasked ones, and KoLeo on the student's global CLS tokens
  (:mod:`align.pretrain.objectives`).

:func:`pretrain_dinov2` trains one and writes the teacher's backbone (what DINOv2 releases) as an HF
directory with the base tower's ``BitImageProcessor``, plus ``pretrain.json`` and ``pretrain_loss.png``.
No labels or captions are read.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from align.pretrain.augment import MultiCrop, sample_seed
from align.pretrain.objectives import (
    dino_loss,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_probs,
    update_center,
)
from align.train.config import TrainConfig

__all__ = ["DinoHead", "DinoPretrain", "DinoSettings", "SelfDistillation", "pretrain_dinov2"]

# The architecture fields a Dinov2Config and a Dinov2WithRegistersConfig share.
ARCH_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "hidden_act", "layer_norm_eps",
    "image_size", "patch_size", "num_channels", "qkv_bias", "layerscale_value", "use_swiglu_ffn",
    "initializer_range",
)  # fmt: skip
# The teacher's centrings (DINOv2's ``train.centering``): an EMA of batch means, or Sinkhorn-Knopp.
CENTERINGS = ("centering", "sinkhorn_knopp")


@dataclasses.dataclass
class DinoSettings:
    """Data, schedule and objective of the pretraining (defaults: about 140 CPU-seconds, one core).

    ``base``: the tower whose architecture and image processor are used (weights start from the seed).
    ``shapes``/``shapes_seed``: the world generated when no ``shapes_dir`` is given.
    ``centering``: the teacher's, ``"centering"`` (EMA centre, ``center_momentum``) or ``"sinkhorn_knopp"``.
    ``global_scale``/``local_scale``: the area ranges of the crops (DINOv2's defaults).
    """

    base: str = "tiny-dinov2-random"
    shapes: int = 2000
    shapes_seed: int = 1234
    seed: int = 0
    steps: int = 80
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.04
    warmup: float = 0.1
    grad_clip: float = 3.0
    local_crops: int = 4
    prototypes: int = 256
    head_hidden: int = 256
    head_batch_norm: bool = True
    bottleneck: int = 64
    student_temp: float = 0.1
    teacher_temp: tuple[float, float] = (0.04, 0.07)
    teacher_temp_warmup: float = 0.3
    momentum: float = 0.98
    centering: str = "centering"
    center_momentum: float = 0.9
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    log_every: int = 10

    def __post_init__(self) -> None:
        positive = ("shapes", "steps", "batch_size", "prototypes", "head_hidden", "bottleneck", "log_every")
        bad = [f"{k}={getattr(self, k)!r}" for k in positive if not getattr(self, k) > 0]
        if not 0 <= self.momentum <= 1 or not 0 <= self.center_momentum <= 1:
            bad.append(
                f"momentum={self.momentum}, center_momentum={self.center_momentum} (expected in [0, 1])"
            )
        if self.centering not in CENTERINGS:
            bad.append(f"centering={self.centering!r} (expected one of {', '.join(CENTERINGS)})")
        for key in ("global_scale", "local_scale"):
            low, high = getattr(self, key)
            if not 0 < low <= high <= 1:
                bad.append(f"{key}={getattr(self, key)!r} (expected 0 < low <= high <= 1)")
        if self.local_crops < 0:
            bad.append(f"local_crops={self.local_crops} (expected >= 0)")
        if bad:
            raise ValueError(f"DinoSettings: expected positive sizes and valid rates, found {', '.join(bad)}")


class DinoHead(nn.Module):
    """DINO's projection head: a 3-layer MLP to an L2-normalised bottleneck, then ``prototypes`` logits
    through a weight-normalised linear layer whose norms are fixed to 1 (``norm_last_layer``).

    ``batch_norm``: DINO's ``use_bn_in_head`` (BatchNorm after the hidden layers); a random tiny tower's
    CLS tokens of different images are nearly equal, and without it the centred teacher starts uniform.
    """

    def __init__(
        self, dim: int, hidden: int, bottleneck: int, prototypes: int, batch_norm: bool = True
    ) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return nn.BatchNorm1d(hidden) if batch_norm else nn.Identity()

        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), norm(), nn.GELU(), nn.Linear(hidden, hidden), norm(), nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )  # fmt: skip
        self.prototypes = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, prototypes, bias=False))
        norms = self.prototypes.parametrizations.weight.original0
        norms.data.fill_(1.0)
        norms.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))


class SelfDistillation(nn.Module):
    """Student (trained) and teacher (its EMA, frozen): ``{"backbone", "head"}`` each, and the teacher's
    centres of CLS and patch logits. ``forward`` returns the loss terms of one batch of views."""

    def __init__(self, backbone: nn.Module, head: DinoHead, settings: DinoSettings) -> None:
        super().__init__()
        self.settings = settings
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.prefix = 1 + int(getattr(backbone.config, "num_register_tokens", 0))
        self.register_buffer("center", torch.zeros(1, settings.prototypes))
        self.register_buffer("patch_center", torch.zeros(1, settings.prototypes))

    def targets(self, logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
        """The teacher's target distributions, by the settings' ``centering`` (``center`` follows its EMA)."""
        if self.settings.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temperature)
        probs = teacher_probs(logits, center, temperature)
        update_center(center, logits, self.settings.center_momentum)
        return probs

    def forward(
        self, globals_: torch.Tensor, locals_: torch.Tensor, masks: torch.Tensor, teacher_temp: float
    ) -> dict[str, torch.Tensor]:
        """``globals_ [B, 2, 3, S, S]``, ``locals_ [B, L, 3, s, s]``, ``masks [B, 2, P]`` from the loader."""
        s = self.settings
        views = globals_.transpose(0, 1).flatten(0, 1)  # view-major: [2B, ...]
        masks = masks.transpose(0, 1).flatten(0, 1)
        masked = int(masks.sum()) >= 2  # iBOT needs masked patches (and the head's BatchNorm two of them)
        with torch.no_grad():
            t_tokens = self.teacher["backbone"](pixel_values=views).last_hidden_state
            targets = self.targets(self.teacher["head"](t_tokens[:, 0]), self.center, teacher_temp)
            if masked:
                t_patch = self.teacher["head"](t_tokens[:, self.prefix :][masks])
                patch_targets = self.targets(t_patch, self.patch_center, teacher_temp)
        student = self.student["backbone"]
        tokens = student(pixel_values=views, bool_masked_pos=masks).last_hidden_state
        cls = [tokens[:, 0]]
        if locals_.shape[1]:
            cls.append(student(pixel_values=locals_.transpose(0, 1).flatten(0, 1)).last_hidden_state[:, 0])
        logits = self.student["head"](torch.cat(cls))
        dino = dino_loss(logits, targets, 2 + locals_.shape[1], s.student_temp)
        ibot = torch.zeros((), device=tokens.device)
        if masked:
            patch_logits = self.student["head"](tokens[:, self.prefix :][masks])
            ibot = ibot_loss(patch_logits, patch_targets, masks, s.student_temp)
        koleo = sum(koleo_loss(chunk) for chunk in tokens[:, 0].chunk(2))
        loss = dino + s.ibot_weight * ibot + s.koleo_weight * koleo
        return {"loss": loss, "dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach()}


class _Views(torch.utils.data.Dataset):
    """Item ``k``: the multi-crop views and masks of image ``k``, drawn from ``(epoch seed, k)``."""

    def __init__(self, images: torch.Tensor, crops: MultiCrop, seed: int) -> None:
        self.images, self.crops, self.seed = images, crops, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.crops(self.images[k], sample_seed(self.seed, k))


class DinoPretrain:
    """A ``Method`` for :func:`align.train.loop.train`: DINO + iBOT + KoLeo self-distillation (module doc)."""

    def __init__(
        self, base_dir: Path, images: torch.Tensor, settings: DinoSettings, registers: int = 0
    ) -> None:
        from transformers import AutoConfig, AutoImageProcessor

        self.settings, self.images, self.registers = settings, images, int(registers)
        self.processor = AutoImageProcessor.from_pretrained(base_dir)
        base = AutoConfig.from_pretrained(base_dir)
        self.arch = {k: getattr(base, k) for k in ARCH_FIELDS}
        self.crops = MultiCrop(
            size=base.image_size, patch=base.patch_size, mean=tuple(self.processor.image_mean),
            std=tuple(self.processor.image_std), n_local=settings.local_crops,
            global_scale=settings.global_scale, local_scale=settings.local_scale,
            mask_probability=settings.mask_probability, mask_ratio=settings.mask_ratio,
        )  # fmt: skip
        self.step = 0

    def backbone(self) -> nn.Module:
        """A freshly initialised tower of the base architecture (with ``registers`` register tokens)."""
        from transformers import (
            Dinov2Config,
            Dinov2Model,
            Dinov2WithRegistersConfig,
            Dinov2WithRegistersModel,
        )

        if self.registers:
            return Dinov2WithRegistersModel(
                Dinov2WithRegistersConfig(num_register_tokens=self.registers, **self.arch)
            )
        return Dinov2Model(Dinov2Config(use_mask_token=True, **self.arch))

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        s = self.settings
        backbone = self.backbone()
        head = DinoHead(
            backbone.config.hidden_size, s.head_hidden, s.bottleneck, s.prototypes, s.head_batch_norm
        )
        return SelfDistillation(backbone, head, s)

    def dataloader(self, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
        from align.train.batches import PermutationSampler

        views = _Views(self.images, self.crops, seed)
        return torch.utils.data.DataLoader(
            views, batch_size=batch_size, sampler=PermutationSampler(len(views), seed), drop_last=True
        )

    def teacher_temp(self) -> float:
        """The teacher temperature now: linear warm-up over ``teacher_temp_warmup`` of the steps, then flat."""
        low, high = self.settings.teacher_temp
        warm = self.settings.teacher_temp_warmup * self.settings.steps
        return high if self.step >= warm else low + (high - low) * self.step / warm

    def momentum(self) -> float:
        """The teacher's EMA momentum now: from ``settings.momentum`` to 1 on a cosine over the run."""
        m0 = self.settings.momentum
        return 1 - (1 - m0) * (1 + math.cos(math.pi * self.step / self.settings.steps)) / 2

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Mapping[str, Any]]:
        temp = self.teacher_temp()
        out = model(*batch, teacher_temp=temp)
        metrics = {k: v for k, v in out.items() if k != "loss"}
        return out["loss"], {**metrics, "teacher_temp": temp, "momentum": self.momentum()}

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """The teacher follows the student: ``teacher <- m * teacher + (1 - m) * student``."""
        m = self.momentum()
        teacher, student = list(model.teacher.parameters()), list(model.student.parameters())
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1 - m)
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def save(self, model: nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
        final = out_dir / "model"
        model.teacher["backbone"].save_pretrained(final)
        self.processor.save_pretrained(final)


def load_images(rows: list[dict]) -> torch.Tensor:
    """The rows' images as one uint8 tensor ``[N, 3, H, W]`` (all of one size, as a shapes world's are)."""
    import numpy as np

    from align.data.images import open_image

    arrays = [np.asarray(open_image(Path(r["image"])).convert("RGB")) for r in rows]
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"expected images of one size, found {sorted(sizes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def pretrain_dinov2(
    out: str | os.PathLike, settings: DinoSettings | None = None, shapes_dir: str | os.PathLike | None = None,
    registers: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Pretrain a tiny DINOv2 on the train split of ``shapes_dir`` (else a fresh world from
    ``settings.shapes_seed``) and write it to ``out`` (see the module doc). Deterministic for
    ``settings.seed``; returns the record written to ``out/pretrain.json``."""
    from align.encoders.registry import resolve
    from align.io import read_jsonl, write_json
    from align.pretrain.world import publish, train_rows
    from align.train.loop import train

    settings = settings or DinoSettings()
    if registers < 0:
        raise ValueError(f"registers: expected a number of register tokens >= 0, found {registers}")
    start = time.perf_counter()
    base = Path(resolve(settings.base))
    with tempfile.TemporaryDirectory(prefix="dino-pretrain-") as tmp:
        world, rows = train_rows(shapes_dir, Path(tmp), settings.shapes, settings.shapes_seed)
        method = DinoPretrain(base, load_images(rows), settings, registers)
        cfg = TrainConfig(
            steps=settings.steps, batch_size=min(settings.batch_size, len(rows)), lr=settings.lr,
            min_lr_ratio=settings.min_lr_ratio, weight_decay=settings.weight_decay, warmup=settings.warmup,
            grad_clip=settings.grad_clip, seed=settings.seed, save_every=0, log_every=settings.log_every,
            report_to=["jsonl"],
        )  # fmt: skip
        result = train(method, cfg, Path(tmp) / "run", resume=False)
        record = {
            "method": "DINOv2 self-distillation (DINO + iBOT + KoLeo), EMA teacher saved",
            "settings": dataclasses.asdict(settings),
            "registers": registers,
            "data": {"shapes": world.name if shapes_dir is not None else None, "train_images": len(rows)},
            "final_loss": result.final_loss,
            "curve": read_jsonl(Path(tmp) / "run" / "metrics.jsonl"),
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        built = Path(tmp) / "run" / "model"
        write_json(built / "pretrain.json", record)
        plot_curve(record["curve"], built / "pretrain_loss.png")
        publish(built, out)
    return record


def plot_curve(rows: list[dict], path: Path) -> None:
    """The loss and its three terms against the step (one line each), written atomically."""
    from align.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    steps = [r["step"] for r in rows]
    for key in ("loss", "dino", "ibot", "koleo"):
        ax.plot(steps, [r[key] for r in rows], label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("DINOv2 pretraining (student)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
