"""Model surgery for a tuning stage: load the model, choose what trains, wrap it with LoRA/QLoRA, optimizer groups.

Stages (LLaVA-1.5's recipe and SAIL's variants; settings in :mod:`mllm_swap.tune.config`):

* ``connector``: only the connector trains (LLaVA stage 1, "pretrain").
* ``lora``: peft LoRA on every ``nn.Linear`` of the language model (not the tower, connector or
  ``lm_head``); the connector trains too, at ``connector_lr``, as a peft ``modules_to_save`` copy, so the
  adapter holds it and peft restores it (:func:`saved_modules`).
* ``full``: the whole language model (embeddings and ``lm_head`` included) and the connector.

``unfreeze_tower`` adds the vision tower, ``unfreeze_head`` only its alignment head (SAIL's stage 2),
both at ``tower_lr`` (in the ``lora`` stage as ``modules_to_save`` copies too). Where the parts live is
the family's knowledge (:meth:`mllm_swap.families.base.Family.trainable_parts`); for HF Llava (5.x):
``model.model.vision_tower``, ``model.model.multi_modal_projector``, ``model.model.language_model``,
``model.lm_head``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllm_swap.checkpoints import DTYPES, load_mllm, resolve_checkpoint
from mllm_swap.families import Family, Loaded, detect_family
from mllm_swap.tune.config import TuneConfig, check_qlora_available

NON_LORA_FILE = "non_lora_trainables.safetensors"
INFO_FILE = "tune_info.json"


def load_for_tuning(cfg: TuneConfig) -> Loaded:
    """``cfg.model`` loaded in ``cfg.dtype`` (QLoRA: 4-bit, availability checked before loading)."""
    if not cfg.qlora:
        return load_mllm(cfg.model, dtype=cfg.dtype)
    check_qlora_available()
    from transformers import BitsAndBytesConfig

    path = resolve_checkpoint(cfg.model)
    parts = detect_family(path).part_paths
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if cfg.dtype == "float32" else DTYPES[cfg.dtype],
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        llm_int8_skip_modules=[parts[p].rsplit(".", 1)[-1] for p in ("tower", "connector", "lm_head") if p in parts],
    )
    return load_mllm(path, dtype=cfg.dtype, quantization_config=quantization)


def _params_under(model: nn.Module, prefix: str) -> list[str]:
    """Parameters under ``prefix``; for a module peft saves in full, its trainable copy, not the frozen original."""
    return [
        name
        for name, _ in model.named_parameters()
        if name.startswith(prefix + ".") and ".original_module." not in name
    ]


def head_param_names(model: nn.Module, family: Family) -> list[str]:
    """Parameters of the tower's alignment head (:meth:`~mllm_swap.families.base.Family.head_modules`)."""
    return [n for module in family.head_modules(model) for n in _params_under(model, module)]


def saved_modules(model: nn.Module, cfg: TuneConfig, family: Family) -> list[str]:
    """Modules a LoRA adapter keeps in full (peft ``modules_to_save``): every non-LoRA trainable.

    The connector, the tower (``unfreeze_tower``) or its head (``unfreeze_head``), then ``cfg.modules_to_save``.
    """
    parts = family.trainable_parts(model)
    names = [parts["connector"]]
    if cfg.unfreeze_tower:
        names.append(parts["tower"])
    elif cfg.unfreeze_head:
        names += family.head_modules(model)
    return names + [m for m in cfg.modules_to_save if m not in names]


def select_trainable(model: nn.Module, cfg: TuneConfig, family: Family) -> dict[str, list[str]]:
    """Set ``requires_grad`` for ``cfg``'s stage; return the trainable parameter names per group.

    Groups: ``lora`` (adapter weights), ``llm`` (full stage), ``connector``, ``tower``, ``head`` (peft's
    trainable copies once wrapped) and ``saved`` (other ``modules_to_save`` copies). Call after wrapping
    with peft for the ``lora`` stage.
    """
    parts = family.trainable_parts(model)
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
        groups["head"] = head_param_names(model, family)
    parted = {name for names in groups.values() for name in names}
    saved = [n for n, _ in model.named_parameters() if ".modules_to_save." in n and n not in parted]
    if saved:
        groups["saved"] = saved
    wanted = {name for names in groups.values() for name in names}
    for name, param in model.named_parameters():
        if name in wanted:
            param.requires_grad_(True)
    return groups


def add_lora(model: nn.Module, cfg: TuneConfig, family: Family) -> nn.Module:
    """Wrap ``model`` with peft LoRA on the family's LoRA targets, keeping :func:`saved_modules` in full.

    QLoRA: after k-bit preparation.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = family.lora_target_modules(model)
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
        modules_to_save=saved_modules(model, cfg, family),
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
