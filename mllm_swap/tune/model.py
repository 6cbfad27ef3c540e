"""Instruction tuning of a (swapped) LLaVA-style model: stages, trainable selection, LoRA/QLoRA, outputs.

Stages (LLaVA-1.5's recipe and SAIL's variants):

* ``connector``: only ``multi_modal_projector`` trains (LLaVA stage 1, "pretrain").
* ``lora``: peft LoRA on every ``nn.Linear`` of the language model (not the tower, connector or
  ``lm_head``); the connector trains too, at ``connector_lr``, as a peft ``modules_to_save`` copy, so the
  adapter holds it and peft restores it (:func:`saved_modules`).
* ``full``: the whole language model (embeddings and ``lm_head`` included) and the connector.

``unfreeze_tower`` adds the vision tower, ``unfreeze_head`` only its alignment head (SAIL's stage 2),
both at ``tower_lr`` (in the ``lora`` stage as ``modules_to_save`` copies too). The model is an HF
``LlavaForConditionalGeneration`` layout (5.x paths ``model.model.vision_tower``,
``model.model.multi_modal_projector``, ``model.model.language_model``, ``model.lm_head``); a custom
aligned tower needs ``mllm_swap.towers`` imported, which this module does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import mllm_swap.towers  # noqa: F401  (registers the aligned tower with the Auto classes)
from align.errors import UserError
from align.hub import check_hub_id, looks_like_hub_id
from align.train.config import TrainConfig

STAGES = ("connector", "lora", "full")
NON_LORA_FILE = "non_lora_trainables.safetensors"
INFO_FILE = "tune_info.json"
QLORA_MESSAGE = (
    "QLoRA needs a CUDA GPU with bitsandbytes: 4-bit quantized training does not run on this machine "
    "({why}); set qlora: false (plain LoRA runs on CPU) or run on a CUDA GPU"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ShapesData:
    """Generate the shapes world (train conversations) when no ``data`` file is given."""

    n: int = 2000
    seed: int = 0


@dataclass
class TuneConfig:
    """One tuning stage: which model, which data, what trains, at which learning rates."""

    model: str = "tiny-llava"  # a directory, a hub id, or a tiny MLLM id
    data: Path | None = None  # LLaVA conversation JSON
    image_folder: Path | None = None
    shapes: ShapesData | None = None
    stage: Literal["connector", "lora", "full"] = "lora"
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    # peft modules_to_save: full copies trained and saved with the adapter (e.g. lm_head when the LLM was
    # never pretrained, as in the tiny default; LLaVA-1.5 itself uses none)
    modules_to_save: list[str] = field(default_factory=list)
    connector_lr: float | None = None  # None: train.lr
    tower_lr: float | None = None  # None: train.lr (tower and head)
    unfreeze_tower: bool = False
    unfreeze_head: bool = False
    qlora: bool = False
    init_trainables: Path | None = None  # a previous stage's non_lora_trainables.safetensors
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_length: int = 2048
    image_aspect_ratio: Literal["pad", "none"] = "pad"
    on_error: Literal["skip", "raise"] = "skip"
    group_by_length: bool = True
    deepspeed: Path | None = None  # DeepSpeed JSON, used when launched without an accelerate config
    eval_vqa: str | None = None  # a vqa_test.jsonl scored at the end, or "shapes" (the generated world's)
    eval_limit: int | None = 200
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0))

    def __post_init__(self) -> None:
        if self.qlora and self.stage != "lora":
            raise ValueError(f"qlora applies to the 'lora' stage only (stage is {self.stage!r})")
        if self.modules_to_save and self.stage != "lora":
            raise ValueError(f"modules_to_save applies to the 'lora' stage only (stage is {self.stage!r})")
        if self.unfreeze_tower and self.unfreeze_head:
            raise ValueError("set unfreeze_tower (whole tower) or unfreeze_head (head only), not both")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(
                f"lora_r must be >= 1, lora_alpha > 0 and lora_dropout in [0, 1); found "
                f"r={self.lora_r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}"
            )
        if self.data is None and self.shapes is None:
            raise ValueError("set 'data' (LLaVA conversation JSON) or 'shapes' (generate the shapes world)")
        if self.eval_vqa == "shapes" and self.shapes is None:
            raise ValueError("eval_vqa: 'shapes' needs the 'shapes' section (the generated world)")


def check_qlora_available() -> None:
    """Raise before any loading when 4-bit QLoRA cannot run here (no CUDA GPU or no bitsandbytes)."""
    if not torch.cuda.is_available():
        raise UserError(QLORA_MESSAGE.format(why="no CUDA GPU is visible"))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(QLORA_MESSAGE.format(why="bitsandbytes is not installed")) from None


def resolve_model(name: str | Path) -> str:
    """A tiny MLLM id becomes its built directory; other names are returned for ``from_pretrained``."""
    from mllm_swap.tiny import TINY_MLLM_BUILDERS, ensure_tiny_mllm

    if str(name) in TINY_MLLM_BUILDERS:
        return str(ensure_tiny_mllm(str(name)))
    path = Path(name)
    if (path / "adapter_config.json").is_file():
        raise ValueError(
            f"{path} is a LoRA adapter, not a full checkpoint; merge it first "
            f"(mllm-swap merge --adapter {path} --out DIR) and tune from DIR"
        )
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a model checkpoint directory")
    if not path.exists():
        if not looks_like_hub_id(str(name)):
            raise FileNotFoundError(
                f"model '{name}': no such checkpoint directory, and not a hub id 'org/name'"
            )
        check_hub_id(str(name), "model")
    elif path.is_dir():  # a swapped or merged checkpoint of ours carries checksums.json
        from align.integrity import verify_dir

        verify_dir(path, "model checkpoint", required=False)
    return str(name)


def load_model(cfg: TuneConfig) -> tuple[nn.Module, Any]:
    """The model and processor of ``cfg.model`` (QLoRA availability is checked before loading)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if cfg.qlora:
        check_qlora_available()
    source = resolve_model(cfg.model)
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype]}
    if cfg.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if cfg.dtype == "float32" else DTYPES[cfg.dtype],
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"],
        )
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    processor = AutoProcessor.from_pretrained(source)
    return model, processor


def model_parts(model: nn.Module) -> dict[str, str]:
    """Qualified module names of ``tower``, ``connector``, ``llm`` and ``lm_head`` in ``model``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = "base_model.model." if base is not model else ""
    inner = getattr(base, "model", None)
    wanted = {
        "tower": "model.vision_tower",
        "connector": "model.multi_modal_projector",
        "llm": "model.language_model",
        "lm_head": "lm_head",
    }
    missing = [path for path in wanted.values() if _get(base, path) is None]
    if inner is None or missing:
        raise ValueError(
            f"{type(base).__name__}: expected an HF Llava layout (transformers 5.x) with modules "
            f"{sorted(wanted.values())}; missing {missing}"
        )
    return {part: prefix + path for part, path in wanted.items()}


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for attr in path.split("."):
        module = getattr(module, attr, None)
        if module is None:
            return None
    return module


def _params_under(model: nn.Module, prefix: str) -> list[str]:
    """Parameters under ``prefix``; for a module peft saves in full, its trainable copy, not the frozen original."""
    return [
        name
        for name, _ in model.named_parameters()
        if name.startswith(prefix + ".") and ".original_module." not in name
    ]


def lora_target_modules(model: nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` in the language model (tower, connector, lm_head excluded)."""
    llm = model_parts(model)["llm"]
    return [
        name for name, m in model.named_modules() if name.startswith(llm + ".") and isinstance(m, nn.Linear)
    ]


def head_modules(model: nn.Module) -> list[str]:
    """The tower's alignment head: its ``head`` module, else its outermost submodules named like "head"."""
    tower = model_parts(model)["tower"]
    names = [n for n, _ in model.named_modules() if n.startswith(tower + ".") and ".original_module" not in n]
    if tower + ".head" in names:
        return [tower + ".head"]
    heads = [n for n in names if "head" in n.rsplit(".", 1)[-1]]
    outer = [n for n in heads if not any(n.startswith(h + ".") for h in heads)]
    if not outer:
        raise ValueError(
            f"unfreeze_head: the vision tower ({tower}) has no head parameters (no submodule named like "
            "'head'); an aligned tower built by mllm_swap.towers has one (use unfreeze_tower to train the "
            "whole tower)"
        )
    return outer


def head_param_names(model: nn.Module) -> list[str]:
    """Parameters of the tower's alignment head (:func:`head_modules`)."""
    return [n for module in head_modules(model) for n in _params_under(model, module)]


def saved_modules(model: nn.Module, cfg: TuneConfig) -> list[str]:
    """Modules a LoRA adapter keeps in full (peft ``modules_to_save``): every non-LoRA trainable.

    The connector, the tower (``unfreeze_tower``) or its head (``unfreeze_head``), then ``cfg.modules_to_save``.
    """
    parts = model_parts(model)
    names = [parts["connector"]]
    if cfg.unfreeze_tower:
        names.append(parts["tower"])
    elif cfg.unfreeze_head:
        names += head_modules(model)
    return names + [m for m in cfg.modules_to_save if m not in names]


def select_trainable(model: nn.Module, cfg: TuneConfig) -> dict[str, list[str]]:
    """Set ``requires_grad`` for ``cfg``'s stage; return the trainable parameter names per group.

    Groups: ``lora`` (adapter weights), ``llm`` (full stage), ``connector``, ``tower``, ``head`` (peft's
    trainable copies once wrapped) and ``saved`` (other ``modules_to_save`` copies). Call after wrapping
    with peft for the ``lora`` stage.
    """
    parts = model_parts(model)
    for param in model.parameters():
        param.requires_grad_(False)
    groups: dict[str, list[str]] = {"connector": _params_under(model, parts["connector"])}
    if cfg.stage == "lora":
        groups["lora"] = [n for n, _ in model.named_parameters() if "lora_" in n]
        if not groups["lora"]:
            raise ValueError("stage 'lora': the model has no LoRA parameters (wrap it with add_lora first)")
    elif cfg.stage == "full":
        groups["llm"] = _params_under(model, parts["llm"]) + _params_under(model, parts["lm_head"])
    if cfg.unfreeze_tower:
        groups["tower"] = _params_under(model, parts["tower"])
    elif cfg.unfreeze_head:
        groups["head"] = head_param_names(model)
    parted = {name for names in groups.values() for name in names}
    saved = [n for n, _ in model.named_parameters() if ".modules_to_save." in n and n not in parted]
    if saved:
        groups["saved"] = saved
    wanted = {name for names in groups.values() for name in names}
    for name, param in model.named_parameters():
        if name in wanted:
            param.requires_grad_(True)
    return groups


def add_lora(model: nn.Module, cfg: TuneConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA on :func:`lora_target_modules`, keeping :func:`saved_modules` in full.

    QLoRA: after k-bit preparation.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = lora_target_modules(model)
    if not targets:
        raise ValueError("stage 'lora': found no nn.Linear modules in the language model")
    if cfg.qlora:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing
        )
    # No task_type: transformers 5 has no AutoModelForCausalLM class for a Llava config, so peft records the
    # base's own class (auto_mapping) instead, which AutoPeftModel(ForCausalLM) then loads the base with.
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=saved_modules(model, cfg),
        bias="none",
    )
    return get_peft_model(model, lora)


def _no_decay(model: nn.Module, name: str, param: torch.Tensor) -> bool:
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return param.ndim < 2 or name.endswith("bias") or type(owner).__name__.endswith("Norm")


def param_groups(model: nn.Module, groups: dict[str, list[str]], cfg: TuneConfig) -> list[dict[str, Any]]:
    """Optimizer groups: per part its learning rate; no weight decay on biases, norms and 1-d tensors."""
    lr = cfg.train.lr
    rates = {"lora": lr, "saved": lr, "llm": lr, "connector": cfg.connector_lr or lr}
    rates["tower"] = rates["head"] = cfg.tower_lr or lr
    params = dict(model.named_parameters())
    out = []
    for part, names in groups.items():
        plain = [n for n in names if _no_decay(model, n, params[n])]
        decay = [n for n in names if n not in set(plain)]
        for chunk, wd in ((decay, cfg.train.weight_decay), (plain, 0.0)):
            if chunk:
                out.append(
                    {
                        "params": [params[n] for n in chunk],
                        "lr": rates[part],
                        "weight_decay": wd,
                        "name": part,
                    }
                )
    return out


def load_non_lora(model: nn.Module, path: str | Path) -> list[str]:
    """Copy a ``non_lora_trainables.safetensors`` into ``model``; names and shapes must match."""
    from align.io import read_tensors

    path = Path(path)
    if path.is_dir():
        path = path / NON_LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: non-LoRA trainables file not found")
    state = read_tensors(path)
    params = dict(model.named_parameters())
    for name, value in state.items():
        target = params.get(name)
        if target is None:
            raise ValueError(f"{path}: tensor '{name}' has no parameter of that name in the model")
        if target.shape != value.shape:
            raise ValueError(
                f"{path}: tensor '{name}' has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
    return sorted(state)


def describe(groups: dict[str, list[str]], model: nn.Module) -> dict[str, dict[str, int]]:
    """Tensors and elements per trainable group, and the model's total, for logs and tune_info.json."""
    params = dict(model.named_parameters())
    out = {
        part: {"tensors": len(n), "params": sum(params[x].numel() for x in n)} for part, n in groups.items()
    }
    out["total"] = {"tensors": len(params), "params": sum(p.numel() for p in params.values())}
    return out
