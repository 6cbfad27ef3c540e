"""What a training run costs before it is launched: parameters, FLOPs, memory per GPU, time.

A :class:`Stage` is a list of :class:`Part` s, each a module built at its real config on the meta device
(:mod:`align.model_configs`) with the recipe's freezing rules applied. The numbers:

* parameters: counted from the modules (``requires_grad`` = trainable);
* forward FLOPs per sample: ``2 * (matmul weights * tokens + 2 * layers * tokens**2 * width)`` (every
  ``nn.Linear``/conv weight is one multiply-add per token through it, plus attention's ``QK^T`` and
  ``AV``); training adds the backward: ``1x`` forward for the activation gradients wherever gradients
  flow, ``2 * trainable matmul weights * tokens`` for the weight gradients, and one more forward of the
  checkpointed parts with gradient checkpointing;
* memory per GPU, bf16 mixed precision as DeepSpeed runs it: 2 B per weight, 2 B per gradient, optimizer
  12 B per trainable weight for AdamW (fp32 master + two moments; Lion 8 B), divided over the GPUs by the
  ZeRO stage (2: gradients + optimizer, 3: weights too; ``3-offload``: weights and optimizer in CPU
  memory). Activations are an estimate (Korthikanti et al. 2022, flash/SDPA attention): ``34 * T * d``
  bytes per transformer layer and sample, ``2 * T * d`` per layer with checkpointing plus one layer's
  full set; other modules keep their bf16 inputs and outputs; LM logits ``4 * T * vocab`` bytes;
* time: ``samples * training FLOPs / (GPUs * peak bf16 FLOP/s * MFU)``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from align.errors import UserError

__all__ = [
    "DEVICES",
    "ZERO_STAGES",
    "Hardware",
    "Part",
    "Stage",
    "device_for_gpu",
    "estimate",
    "parse_hardware",
]

GIB = 1024**3
# device -> (dense bf16 datasheet peak FLOP/s, memory bytes); the planner's and the benchmarks' one table
DEVICES: dict[str, tuple[float, int]] = {
    "A100-80GB": (312e12, 80 * GIB),
    "A100-40GB": (312e12, 40 * GIB),
    "H100-80GB": (989e12, 80 * GIB),
    "H200-141GB": (989e12, 141 * 10**9),
    "4090-24GB": (165e12, 24 * GIB),
}
ZERO_STAGES = ("0", "2", "3", "3-offload")
OPTIMIZER_BYTES = {"adamw": 12, "lion": 8}
USABLE = 0.9  # of a GPU's memory: the rest goes to the CUDA context, NCCL buffers and fragmentation


@dataclasses.dataclass(frozen=True)
class Hardware:
    """``count`` GPUs of one kind from :data:`DEVICES`."""

    count: int
    device: str

    @property
    def name(self) -> str:
        return f"{self.count}x{self.device}"

    @property
    def peak(self) -> float:
        return DEVICES[self.device][0]

    @property
    def memory(self) -> int:
        return DEVICES[self.device][1]


def parse_hardware(text: str) -> Hardware:
    """``"8xA100-80GB"`` -> :class:`Hardware`; :class:`UserError` naming the known devices otherwise."""
    match = re.fullmatch(r"(\d+)x(.+)", text.strip())
    if not match or int(match.group(1)) < 1 or match.group(2) not in DEVICES:
        raise UserError(
            f"--hardware {text!r}: expected COUNTxDEVICE with COUNT >= 1 and DEVICE one of {sorted(DEVICES)}, "
            "e.g. 8xA100-80GB"
        )
    return Hardware(int(match.group(1)), match.group(2))


def device_for_gpu(name: str, memory: int) -> tuple[str, float] | None:
    """(:data:`DEVICES` key, peak FLOP/s) of a GPU named ``name`` (``torch.cuda.get_device_name``) with
    ``memory`` bytes: the model in the name, the nearest memory size; None for a GPU not in the table."""
    models = [key for key in DEVICES if key.split("-")[0] in name.replace(" ", "")]
    if not models:
        return None
    key = min(models, key=lambda k: abs(DEVICES[k][1] - memory))
    return key, DEVICES[key][0]


def matmul_weights(module: nn.Module, trainable_only: bool = False) -> int:
    """Weights of every ``nn.Linear`` and convolution in ``module`` (one multiply-add each per token)."""
    return sum(
        m.weight.numel()
        for m in module.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and (m.weight.requires_grad or not trainable_only)
    )


def _io_features(module: nn.Module) -> int:
    return sum(m.in_features + m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclasses.dataclass
class Part:
    """One model of a stage: ``tokens`` per sample pass through it; ``layers``/``width`` describe its
    transformer blocks (0 for heads without attention); ``grad_flows``: gradients pass through its
    activations (it trains, or a trained part feeds it); ``vocab``: an LM's output size (logits kept)."""

    name: str
    module: nn.Module
    tokens: int
    layers: int = 0
    width: int = 0
    grad_flows: bool = False
    vocab: int = 0

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    @property
    def frozen(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if not p.requires_grad)

    def forward_flops(self) -> int:
        """Forward FLOPs for one sample."""
        attention = 2 * self.layers * self.tokens**2 * self.width
        return 2 * (matmul_weights(self.module) * self.tokens + attention)

    def training_flops(self, checkpointing: bool) -> int:
        """Forward + backward (+ recomputation) FLOPs for one sample."""
        forward = self.forward_flops()
        weight_grads = 2 * matmul_weights(self.module, trainable_only=True) * self.tokens
        if not self.grad_flows:
            return forward + weight_grads
        recompute = forward if checkpointing and self.layers else 0
        return 2 * forward + weight_grads + recompute

    def activation_bytes(self, checkpointing: bool) -> int:
        """Activation memory for one sample kept for the backward (estimate, see the module docstring)."""
        if not self.grad_flows:
            return 0
        logits = 4 * self.tokens * self.vocab
        if not self.layers:
            return 2 * self.tokens * _io_features(self.module) + logits
        per_layer = 34 * self.tokens * self.width
        kept = (
            2 * self.tokens * self.width * self.layers + per_layer
            if checkpointing
            else per_layer * self.layers
        )
        return kept + logits


@dataclasses.dataclass
class Stage:
    """One run of a recipe: its parts, the per-GPU ``micro_batch``, the run's length (``steps``, or
    ``epochs`` over ``dataset_size`` samples; ``None`` when the recipe does not say), the optimizer,
    whether it trains (``False``: a forward-only encoding pass) and ``notes`` to print."""

    name: str
    parts: list[Part]
    micro_batch: int
    grad_accum: int = 1
    steps: int | None = None
    epochs: float | None = None
    dataset_size: int | None = None
    optimizer: str = "adamw"
    checkpointing: bool = False
    trains: bool = True
    image_tokens: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    def samples(self, gpus: int) -> int | None:
        """Samples the run processes on ``gpus`` GPUs (``None`` when the data size is unknown)."""
        if self.steps is not None:
            return self.steps * self.micro_batch * self.grad_accum * gpus
        if self.epochs is not None and self.dataset_size is not None:
            return int(self.epochs * self.dataset_size)
        return None


def memory(stage: Stage, zero: str, gpus: int, checkpointing: bool, micro_batch: int) -> dict[str, int]:
    """Bytes per GPU (and in CPU memory, ``cpu``) of weights, gradients, optimizer and activations."""
    trainable = sum(p.trainable for p in stage.parts)
    total = trainable + sum(p.frozen for p in stage.parts)
    weights, grads = 2 * total, 2 * trainable
    optimizer = OPTIMIZER_BYTES[stage.optimizer] * trainable if stage.trains else 0
    grads = grads if stage.trains else 0
    if zero != "0":
        optimizer, grads = optimizer / gpus, grads / gpus
    cpu = 0
    if zero.startswith("3"):
        weights /= gpus
    if zero == "3-offload":
        cpu, weights, optimizer = weights + optimizer, 0, 0
    activations = (
        micro_batch * sum(p.activation_bytes(checkpointing) for p in stage.parts) if stage.trains else 0
    )
    out = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations}
    return {k: int(v) for k, v in out.items()} | {"total": int(sum(out.values())), "cpu": int(cpu)}


def _advice(stage: Stage, hw: Hardware, zero: str, checkpointing: bool) -> list[str]:
    """Settings under which a stage that does not fit would fit (each alone, then combined)."""
    usable = USABLE * hw.memory
    options = []
    if not checkpointing:
        options.append(("gradient checkpointing", zero, True, stage.micro_batch))
    for other in ZERO_STAGES[ZERO_STAGES.index(zero) + 1 :]:
        options.append((f"ZeRO-{other}", other, checkpointing, stage.micro_batch))
    micro = stage.micro_batch // 2
    while micro >= 1:
        accum = stage.grad_accum * stage.micro_batch // micro
        options.append((f"micro-batch {micro} x grad_accum {accum}", zero, checkpointing, micro))
        micro //= 2
    options.append(("ZeRO-3-offload + checkpointing + micro-batch 1", "3-offload", True, 1))
    for label, z, ckpt, mb in options:
        need = memory(stage, z, hw.count, ckpt, mb)["total"]
        if need <= usable:
            return [f"fits with {label} ({need / GIB:.1f} GiB)"]
    return ["does not fit even with ZeRO-3-offload, checkpointing and micro-batch 1: use more or larger GPUs"]


def estimate(stage: Stage, hw: Hardware, zero: str, mfu: float) -> dict[str, Any]:
    """Every figure of ``stage`` on ``hw`` under ZeRO ``zero`` at ``mfu``: a JSON-able record."""
    if zero not in ZERO_STAGES:
        raise UserError(f"--zero {zero!r}: expected one of {', '.join(ZERO_STAGES)}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu}: expected a fraction in (0, 1]")
    ckpt = stage.checkpointing
    forward = sum(p.forward_flops() for p in stage.parts)
    train = sum(p.training_flops(ckpt) for p in stage.parts) if stage.trains else forward
    samples = stage.samples(hw.count)
    seconds = samples * train / (hw.count * hw.peak * mfu) if samples is not None else None
    mem = memory(stage, zero, hw.count, ckpt, stage.micro_batch)
    other = memory(stage, zero, hw.count, not ckpt, stage.micro_batch)["activations"]
    fits = mem["total"] <= USABLE * hw.memory
    return {
        "stage": stage.name,
        "trains": stage.trains,
        "parts": {
            p.name: {
                "trainable": p.trainable,
                "frozen": p.frozen,
                "tokens": p.tokens,
                "forward_flops": p.forward_flops(),
            }
            for p in stage.parts
        },
        "trainable": sum(p.trainable for p in stage.parts),
        "frozen": sum(p.frozen for p in stage.parts),
        "image_tokens": stage.image_tokens,
        "forward_flops": forward,
        "train_flops": train,
        "memory": mem,
        "activations_checkpointing" if not ckpt else "activations_no_checkpointing": other,
        "checkpointing": ckpt,
        "micro_batch": stage.micro_batch,
        "samples": samples,
        "hours": None if seconds is None else seconds / 3600,
        "fits": fits,
        "advice": [] if fits else _advice(stage, hw, zero, ckpt),
        "notes": stage.notes,
    }
