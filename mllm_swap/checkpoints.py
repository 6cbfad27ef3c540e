"""Where an MLLM checkpoint is and how to load it for use: one resolver and one factory.

:func:`resolve_checkpoint` turns a tiny model id (built on first use through the ``mllm_swap.tiny_models``
hook, :mod:`align.embedded`), a ``random:ORG/NAME[?layers=N]`` reference (a shipped hub config with seeded
random weights, its LLM optionally shortened: :func:`align.model_configs.random_model_dir`), a local path or
a hub id into a local checkpoint. :func:`load_mllm` loads
one for generation, evaluation or tuning: its family (:func:`mllm_swap.families.detect_family`) reads it
with :meth:`~mllm_swap.families.base.Family.load`, in the requested dtype, on the requested device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import mllm_swap.towers  # noqa: F401  (registers the aligned tower with the Auto classes)
from align.embedded import is_tiny_model, tiny_model_dir, tiny_model_names
from align.hub import check_hub_id, looks_like_hub_id
from align.model_configs import is_random_ref, random_model_dir
from mllm_swap.families import Loaded, detect_family

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def resolve_checkpoint(spec: str | os.PathLike, what: str = "MLLM") -> Path:
    """The local checkpoint (directory, or an OpenFlamingo state-dict file) that ``spec`` names.

    ``spec`` is a tiny model id (built on first use), a ``random:`` reference (built on first use), an existing path (verified against its
    ``checksums.json`` when it carries one; a LoRA adapter is refused: merge it first) or a hub id
    ``org/name`` (checked to be reachable or cached first, then taken from the local cache or downloaded).
    ``what`` names the thing in messages.
    """
    text = str(spec)
    if is_random_ref(text):
        return random_model_dir(text)
    if is_tiny_model(text):
        return tiny_model_dir(text)
    path = Path(text).expanduser()
    if looks_like_hub_id(text):
        from huggingface_hub import snapshot_download

        check_hub_id(text, what)
        return Path(snapshot_download(text))
    if not path.exists():
        raise FileNotFoundError(
            f"{what} '{text}': no such checkpoint directory or file, not a tiny model id "
            f"({', '.join(tiny_model_names())}), not 'random:ORG/NAME' and not a hub id 'org/name'"
        )
    if (path / "adapter_config.json").is_file():
        raise ValueError(
            f"{path} is a LoRA adapter, not a full checkpoint; merge it first "
            f"(mllm-swap merge --adapter {path} --out DIR) and use DIR"
        )
    if path.is_dir():  # a swapped, tuned or merged checkpoint of ours carries checksums.json
        from align.integrity import verify_dir

        verify_dir(path, "model checkpoint", required=False)
    return path


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) means the first GPU when there is one, else the CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it, else float32; otherwise a name from :data:`DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"mllm_swap: dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_mllm(
    spec: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantization_config: Any = None,
) -> Loaded:
    """An MLLM ready to run: ``Loaded`` with the model (eval mode), its processor and its family.

    ``spec`` as for :func:`resolve_checkpoint`; ``dtype`` a :data:`DTYPES` name, a ``torch.dtype`` or
    ``"auto"`` (None: as stored); ``device`` a device or ``"auto"`` (None: where it loads, the CPU);
    ``quantization_config`` a transformers quantization config (families loaded with ``from_pretrained``).
    """
    path = resolve_checkpoint(spec)
    family = detect_family(path)
    if not family.generates:
        raise ValueError(
            f"{path}: {family.name} checkpoints have no transformers generation path here; supported: "
            "HF Llava/LlavaNext, original LLaVA-1.5, IDEFICS"
        )
    device_ = None if device is None else resolve_device(device)
    dtype_ = None if dtype is None else resolve_dtype(dtype, device_ or torch.device("cpu"))
    loaded = family.load(path, dtype=dtype_, quantization_config=quantization_config)
    if device_ is not None and quantization_config is None:
        loaded.model = loaded.model.to(device_)
    loaded.model.eval()
    return loaded
