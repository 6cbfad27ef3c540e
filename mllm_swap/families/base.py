"""What every MLLM family offers: recognise and load a checkpoint, describe its tower, swap in place, save,
name its trainable parts, and run it (its prompt format, next-token log-probabilities, generation).

A family works on a loaded checkpoint (``Loaded``) so that the swap can measure the old model, change it
in place, and measure the new one without holding two copies of a large model. Adding a family: a module
with a :class:`Family` subclass, and its line in ``mllm_swap.families.FAMILIES``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from mllm_swap.chat_templates import llava_chat_template
from mllm_swap.families.prompts import Prompter
from mllm_swap.towers import NewTower, add_remote_code

LLAVA_TYPES = ("llava", "llava_next")
# the files of a transformers checkpoint directory (each group needs one of its names)
WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PROCESSOR = ("processor_config.json", "preprocessor_config.json")
TOKENIZER = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class TowerView:
    """A tower as the MLLM consumes it: architecture signature, width and tokens fed to the connector."""

    source: str
    arch: dict[str, Any]
    width: int
    num_tokens: int
    image_size: int
    patch_size: int
    prefix_rule: str
    select_layer: int | str

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model_type": self.arch.get("model_type"),
            "width": self.width,
            "image_tokens": self.num_tokens,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "prefix_rule": self.prefix_rule,
            "select_layer": self.select_layer,
        }


@dataclass
class Loaded:
    """A checkpoint in memory: the family's model object(s), processor and the on-disk facts it came from."""

    path: Path
    model: Any
    processor: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    family: Family | None = None


@dataclass
class SwapPlan:
    """What a swap does: the mode and why, the new view of the tower, and what becomes untrained."""

    mode: str
    reason: str
    old: TowerView
    new: TowerView
    new_modules: list[str] = field(default_factory=list)
    untrained: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
    "num_register_tokens",
    "mlp_ratio",
    "token_rule",
    "head_config",
)


def arch_of(config: Any) -> dict[str, Any]:
    """The architecture signature of a vision config (what must match for a weights-only swap)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if data.get("model_type") == "clip":  # a composite CLIP config: its vision part is the tower
        data = data["vision_config"]
    if "embed_dim" in data and "hidden_size" not in data:  # IDEFICS' vision config
        data["hidden_size"] = data["embed_dim"]
    out = {k: data[k] for k in ARCH_KEYS if k in data}
    if out.get("model_type") in ("clip", "clip_vision_model", "idefics_vision"):
        out["model_type"] = "clip_vision_model"
    if "vision_backbone" in data:
        out["backbone"] = arch_of(data["vision_backbone"])
    return out


def mismatches(old: TowerView, new: TowerView) -> list[str]:
    """Human-readable differences that rule out a drop-in (empty when weights can simply be replaced)."""
    diffs = []
    if old.width != new.width:
        diffs.append(f"width {old.width} vs {new.width}")
    if old.num_tokens != new.num_tokens:
        diffs.append(f"image tokens {old.num_tokens} vs {new.num_tokens}")
    if old.image_size != new.image_size:
        diffs.append(f"image size {old.image_size} vs {new.image_size}")
    if old.arch.get("model_type") != new.arch.get("model_type"):
        diffs.append(f"tower type {old.arch.get('model_type')} vs {new.arch.get('model_type')}")
    else:
        keys = sorted(k for k in set(old.arch) | set(new.arch) if k not in ("hidden_size", "image_size"))
        diffs += [
            f"{k} {old.arch.get(k)!r} vs {new.arch.get(k)!r}"
            for k in keys
            if old.arch.get(k) != new.arch.get(k)
        ]
    return diffs


class Family:
    """Base class of the MLLM families (HF Llava, original LLaVA, IDEFICS, OpenFlamingo)."""

    name = ""
    formats = ""  # the checkpoints it reads, for messages
    modes: tuple[str, ...] = ("dropin", "rebuild")
    hf_tower = True  # holds a transformers tower (an open_clip visual is converted to HF CLIP first)
    generates = True  # loads as a runnable transformers model (generation, scoring, tuning)
    prompter_class: type[Prompter] = Prompter
    # module paths of the trainable parts "tower", "connector", "llm", "lm_head" (empty: not tunable)
    part_paths: dict[str, str] = {}

    @classmethod
    def recognizes(cls, path: Path, config: dict[str, Any] | None) -> bool:
        """Whether the checkpoint at ``path`` (``config``: its ``config.json``, None without one) is this family's."""
        raise NotImplementedError

    def load(self, path: Path, dtype: torch.dtype | None = None, quantization_config: Any = None) -> Loaded:
        """Read the checkpoint at ``path`` (``dtype`` None: as stored; ``quantization_config``: transformers')."""
        raise NotImplementedError

    def old_view(self, loaded: Loaded) -> TowerView:
        raise NotImplementedError

    def plan(self, loaded: Loaded, tower: NewTower, mode: str, select_layer: int | None) -> SwapPlan:
        raise NotImplementedError

    def apply(self, loaded: Loaded, tower: NewTower, plan: SwapPlan) -> None:
        """Change ``loaded`` in place so that it holds the new tower."""
        raise NotImplementedError

    def save(self, loaded: Loaded, out: Path, final: Path, plan: SwapPlan, tower: NewTower) -> None:
        """Write the swapped checkpoint into ``out``, which will be renamed to ``final`` afterwards."""
        save_checkpoint(loaded.model, loaded.processor, out)

    def consumed_tokens(self, loaded: Loaded, images: list[Image.Image]) -> torch.Tensor:
        """Tower tokens ``[B, N, D]`` exactly as the MLLM consumes them (layer, prefix rule applied)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ trainable parts
    def trainable_parts(self, model: nn.Module) -> dict[str, str]:
        """Qualified module names of ``tower``, ``connector``, ``llm`` and ``lm_head`` in ``model`` (peft-wrapped or not)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        prefix = "base_model.model." if base is not model else ""
        if not self.part_paths:
            raise ValueError(f"{self.name}: tuning is not supported for this family (no trainable parts known)")
        missing = [path for path in self.part_paths.values() if _get(base, path) is None]
        if missing:
            raise ValueError(
                f"{type(base).__name__}: expected the {self.name} layout ({self.formats}) with modules "
                f"{sorted(self.part_paths.values())}; missing {missing}"
            )
        return {part: prefix + path for part, path in self.part_paths.items()}

    def lora_target_modules(self, model: nn.Module) -> list[str]:
        """Full names of every ``nn.Linear`` in the language model (tower, connector, lm_head excluded)."""
        llm = self.trainable_parts(model)["llm"]
        return [n for n, m in model.named_modules() if n.startswith(llm + ".") and isinstance(m, nn.Linear)]

    def head_modules(self, model: nn.Module) -> list[str]:
        """The tower's alignment head: its ``head`` module, else its outermost submodules named like "head"."""
        tower = self.trainable_parts(model)["tower"]
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

    # ------------------------------------------------------------------ running it
    def prompter(self, processor: Any, image_aspect_ratio: str = "pad") -> Prompter:
        """The family's prompt format over ``processor``."""
        return self.prompter_class(processor, image_aspect_ratio)

    def inputs(self, loaded: Loaded, image: Image.Image, prompt: str) -> dict[str, torch.Tensor]:
        """Model inputs for ``prompt`` about ``image`` in the family's prompt format, on the model's device."""
        prompter = self.prompter(loaded.processor)
        batch = prompter.encode([prompter.prompt(prompt, 1)], [[image]], padding_side="left")
        return to_model(batch, loaded.model)

    @torch.no_grad()
    def next_token_logprobs(self, loaded: Loaded, image: Image.Image, prompt: str) -> torch.Tensor | None:
        """Log-probabilities of the next token after ``prompt`` about ``image``; ``None`` if not runnable."""
        if not self.generates:
            return None
        logits = loaded.model(**self.inputs(loaded, image, prompt)).logits[0, -1]
        return torch.log_softmax(logits.double(), dim=-1)

    @torch.no_grad()
    def generate(
        self, loaded: Loaded, image: Image.Image, prompt: str, max_new_tokens: int = 8
    ) -> str | None:
        """Greedy continuation of ``prompt`` about ``image``; ``None`` if the family cannot run here."""
        if not self.generates:
            return None
        inputs = self.inputs(loaded, image, prompt)
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def load_pretrained(
    family: Family, model_class: Any, path: Path, dtype: torch.dtype | None, quantization_config: Any
) -> Loaded:
    """A transformers checkpoint directory read with ``model_class.from_pretrained`` and ``AutoProcessor``."""
    from transformers import AutoProcessor

    require_files(path, family.formats, [("config.json",), WEIGHTS, PROCESSOR, TOKENIZER])
    kwargs = {"dtype": dtype, "quantization_config": quantization_config}
    with quiet_transformers():
        model = model_class.from_pretrained(path, **{k: v for k, v in kwargs.items() if v is not None}).eval()
        processor = AutoProcessor.from_pretrained(path)
    return Loaded(path=path, model=model, processor=processor, family=family)


def to_model(inputs: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensor inputs on ``model``'s device, floating ones in its dtype."""
    device, dtype = next(model.parameters()).device, model.dtype
    return {
        k: v.to(device, dtype=dtype if v.is_floating_point() else None)
        for k, v in inputs.items()
        if isinstance(v, torch.Tensor)
    }


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for attr in path.split("."):
        module = getattr(module, attr, None)
        if module is None:
            return None
    return module


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (expected unused keys, e.g. a CLIP text tower) for a block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def require_files(path: Path, what: str, groups: list[tuple[str, ...]]) -> None:
    """Fail early when a checkpoint directory lacks files: each group needs at least one existing name."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {what} checkpoint directory not found")
    present = {p.name for p in path.iterdir()}
    missing = [" or ".join(g) for g in groups if not any(name in present for name in g)]
    if missing:
        raise FileNotFoundError(
            f"{path}: {what} checkpoint is missing {', '.join(missing)} (found {sorted(present)[:12]})"
        )


def save_checkpoint(model: Any, processor: Any, out: Path) -> None:
    """``save_pretrained`` of a model and its processor into ``out``, made to load without this package.

    An HF Llava processor gets :func:`~mllm_swap.chat_templates.llava_chat_template` (string and list
    content); a model with an aligned tower gets its remote code (:func:`mllm_swap.towers.add_remote_code`).
    """
    if model.config.model_type in LLAVA_TYPES:
        processor.chat_template = llava_chat_template(processor.chat_template)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    add_remote_code(out)
