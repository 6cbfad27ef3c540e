"""Original LLaVA-1.5 checkpoints (``llava_llama``): a loader with upstream semantics, conversion, and swap.

Upstream (haotian-liu/LLaVA) builds the tower from ``mm_vision_tower`` at load time (``delay_load``), so
tower weights stored in the checkpoint are dropped unless ``unfreeze_mm_vision_tower`` is set; features
are ``hidden_states[mm_vision_select_layer]``, minus index 0 for ``mm_vision_select_feature == "patch"``;
``mlp2x_gelu`` is ``Linear -> GELU -> Linear`` (``model.mm_projector.0/.2``). The upstream package cannot
be installed beside current torch, so :func:`load_llava_original` rebuilds the same computation as an HF
``LlavaForConditionalGeneration``, with the key mapping of transformers' ``convert_llava_weights_to_hf.py``
(``<image>`` and ``<pad>`` added to the tokenizer, vocabulary padded to a multiple of 64).

Extension beyond upstream (whose builder accepts CLIP towers only): a tower directory of any
``AutoModel`` type (DINOv2, SigLIP, aligned towers after ``import mllm_swap``) loads here too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from align.io import read_tensors
from mllm_swap.families.base import (
    WEIGHTS,
    Loaded,
    SwapPlan,
    TowerView,
    quiet_transformers,
    require_files,
    save_checkpoint,
)
from mllm_swap.families.llava_hf import LlavaHF, fed_image_size, feed_view
from mllm_swap.towers import NewTower, add_remote_code

TOWER_PREFIX = "model.vision_tower.vision_tower."
CLIP_TOWER_PREFIX = TOWER_PREFIX + "vision_model."  # upstream's CLIPVisionModel (4.x nesting)
SKIP_COPY = {*WEIGHTS, "config.json", "tiny_build.json", "swap_report.json", "preprocessor_config.json"}
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def read_original_config(path: Path) -> dict[str, Any]:
    """``config.json`` of an original LLaVA checkpoint, checked for the keys this loader understands."""
    require_files(
        path, "original LLaVA", [("config.json",), WEIGHTS, ("tokenizer.json", "tokenizer.model")]
    )
    config = json.loads((path / "config.json").read_text())
    missing = [k for k in ("mm_vision_tower", "mm_hidden_size", "hidden_size") if k not in config]
    if missing:
        raise ValueError(f"{path / 'config.json'}: missing {missing}; not an original LLaVA-1.5 checkpoint")
    if config.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ValueError(
            f"{path / 'config.json'}: mm_projector_type '{config.get('mm_projector_type', 'linear')}' is not "
            "supported; expected 'mlp2x_gelu' (LLaVA-1.5), which maps onto HF Llava's projector"
        )
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise ValueError(
            f"{path / 'config.json'}: mm_use_im_start_end / mm_use_im_patch_token are not supported"
        )
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE:
        raise ValueError(
            f"{path / 'config.json'}: mm_vision_select_feature '{feature}': expected patch or cls_patch"
        )
    return config


def tower_dir(path: Path, config: dict[str, Any]) -> str:
    """Where ``mm_vision_tower`` points: an existing path (upstream), a path next to the checkpoint, or a hub id."""
    name = str(config["mm_vision_tower"])
    if Path(name).exists():
        return name
    beside = path / Path(name).name
    return str(beside) if beside.is_dir() else name


def load_tower(source: str) -> tuple[torch.nn.Module, Any]:
    """The tower module and its vision config from a tower directory (CLIP like upstream, else ``AutoModel``)."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    config = AutoConfig.from_pretrained(source)
    with quiet_transformers():
        if config.model_type in ("clip", "clip_vision_model"):
            tower = CLIPVisionModel.from_pretrained(source)
        else:
            tower = AutoModel.from_pretrained(source)
    return tower.eval(), tower.config


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (safetensors or ``torch.load(weights_only=True)``, sharded or not)."""
    index = next(
        (
            path / n
            for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
            if (path / n).is_file()
        ),
        None,
    )
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index else None
    files = files or [n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()][:1]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(read_tensors(path / name))
    return state


def convert_original_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original keys -> HF 5.x ``LlavaForConditionalGeneration`` keys (tower keys end up under ``model.vision_tower.``)."""
    out = {}
    for key, value in state.items():
        if key.endswith(".inv_freq") or key.startswith(("model.image_newline", "model.vision_resampler")):
            continue
        if key.startswith(CLIP_TOWER_PREFIX):
            new = "model.vision_tower." + key[len(CLIP_TOWER_PREFIX) :]
        elif key.startswith(TOWER_PREFIX):
            new = "model.vision_tower." + key[len(TOWER_PREFIX) :]
        elif key.startswith("model.mm_projector."):
            rest = key[len("model.mm_projector.") :]
            index, _, param = rest.partition(".")
            new = f"model.multi_modal_projector.linear_{ {'0': 1, '2': 2}[index] }.{param}"
        elif key.startswith("model."):
            new = "model.language_model." + key[len("model.") :]
        else:
            new = key  # lm_head.*
        out[new] = value
    return out


def _tokenizer(path: Path):
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if "<image>" not in tok.get_vocab():
        tok.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def load_llava_original_with_processor(path: str | Path):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` for an original LLaVA-1.5 checkpoint directory."""
    with quiet_transformers():
        return _load(Path(path))


def _load(path: Path):
    from transformers import (
        AutoImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.initialization import no_init_weights

    from mllm_swap.chat_templates import DEFAULT_CHAT_TEMPLATE
    from mllm_swap.towers import prefix_tokens_of

    config = read_original_config(path)
    source = tower_dir(path, config)
    tower, vision_config = load_tower(source)
    if vision_config.hidden_size != config["mm_hidden_size"]:
        raise ValueError(
            f"{path / 'config.json'}: mm_hidden_size {config['mm_hidden_size']} but the tower at {source} has "
            f"width {vision_config.hidden_size}"
        )
    tok = _tokenizer(path)
    strategy = SELECT_FEATURE[config.get("mm_vision_select_feature", "patch")]
    text_fields = {
        k: v for k, v in config.items() if k in LlamaConfig.__dataclass_fields__ and k != "architectures"
    }
    text_config = LlamaConfig(**text_fields)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    extra = (
        (vision_config.num_output_tokens - patches)
        if hasattr(vision_config, "num_output_tokens")
        else prefix_tokens_of(vision_config)
    )
    llava_config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=patches + extra - (1 if strategy == "default" else 0),
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
    )
    with no_init_weights():
        model = LlavaForConditionalGeneration(llava_config)
    state = convert_original_state_dict(read_state(path))
    stored_tower = {
        k[len("model.vision_tower.") :]: v for k, v in state.items() if k.startswith("model.vision_tower.")
    }
    rest = {k: v for k, v in state.items() if not k.startswith("model.vision_tower.")}
    model.model.vision_tower = tower
    if config.get("unfreeze_mm_vision_tower"):  # upstream: the checkpoint's tower weights override
        tower.load_state_dict(stored_tower, strict=True)
    result = model.load_state_dict(rest, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("model.vision_tower.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not fit LLaVA-1.5: missing {missing[:6]}, unexpected {result.unexpected_keys[:6]}"
        )
    state_gen = torch.random.get_rng_state()
    torch.manual_seed(0)  # the added <image>/<pad> rows are sampled around the mean embedding, reproducibly
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=True)
    torch.random.set_rng_state(state_gen)
    model.generation_config.pad_token_id = tok.pad_token_id
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(source),
        tokenizer=tok,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )
    return model.eval(), processor


def load_llava_original(path: str | Path):
    """An original LLaVA-1.5 checkpoint as an HF ``LlavaForConditionalGeneration`` (upstream semantics)."""
    return load_llava_original_with_processor(path)[0]


def convert_llava_original_to_hf(path: str | Path, out: str | Path) -> Path:
    """Write an original LLaVA-1.5 checkpoint in the HF Llava layout (model + processor) to ``out``."""
    from align.io import atomic_path

    model, processor = load_llava_original_with_processor(path)
    with atomic_path(out) as tmp:
        save_checkpoint(model, processor, tmp)
    return Path(out)


class LlavaOriginal(LlavaHF):
    """Swap into an original checkpoint: the new tower goes to ``out/vision_tower`` (what ``mm_vision_tower``
    names), ``mm_hidden_size`` / select layer / select feature follow it, ``mm_projector.0`` is re-initialised
    on rebuild, and the stored tower weights are replaced too (used only with ``unfreeze_mm_vision_tower``)."""

    name = "llava_original"

    formats = "original LLaVA-1.5 (config.json model_type llava_llama with mm_vision_tower)"

    @classmethod
    def recognizes(cls, path: Path, config: dict[str, Any] | None) -> bool:
        return config is not None and (config.get("model_type") == "llava_llama" or "mm_vision_tower" in config)

    def load(self, path: Path, dtype: torch.dtype | None = None, quantization_config: Any = None) -> Loaded:
        if quantization_config is not None:
            raise ValueError(
                f"{path}: an original LLaVA-1.5 checkpoint is converted on load and cannot be quantized; "
                "write it in the HF layout first (mllm-swap swap --to-hf) and load that"
            )
        config = read_original_config(path)
        model, processor = load_llava_original_with_processor(path)
        if dtype is not None:
            model = model.to(dtype)
        return Loaded(path=path, model=model, processor=processor, extra={"config": config}, family=self)

    def old_view(self, loaded: Loaded) -> TowerView:
        cfg = loaded.model.config
        source = loaded.extra["config"]["mm_vision_tower"]
        side = fed_image_size(getattr(loaded.processor, "image_processor", None))
        return feed_view(
            cfg.vision_config, cfg.vision_feature_select_strategy, cfg.vision_feature_layer, source, side
        )

    def plan(self, loaded: Loaded, tower: NewTower, mode: str, select_layer: int | None) -> SwapPlan:
        plan = super().plan(loaded, tower, mode, select_layer)
        plan.new_modules = [
            m.replace("model.multi_modal_projector.linear_1", "model.mm_projector.0")
            for m in plan.new_modules
        ]
        plan.untrained = ["model.mm_projector.0"] if plan.untrained else []
        plan.notes = [
            n.replace("model.multi_modal_projector.linear_2", "model.mm_projector.2") for n in plan.notes
        ]
        plan.notes.append(
            "new tower written to vision_tower/ and referenced by mm_vision_tower (absolute path)"
        )
        if plan.new.arch.get("model_type") != "clip_vision_model":
            plan.notes.append(
                "non-CLIP tower: upstream llava's builder loads CLIP towers only; load this checkpoint with "
                "mllm_swap.families.llava_original.load_llava_original (or convert it with --to-hf)"
            )
        return plan

    def save(self, loaded: Loaded, out: Path, final: Path, plan: SwapPlan, tower: NewTower) -> None:
        model = loaded.model
        vision = model.model.vision_tower
        vision.save_pretrained(out / "vision_tower")
        add_remote_code(out / "vision_tower")
        loaded.processor.image_processor.save_pretrained(out / "vision_tower")
        clip = model.config.vision_config.model_type == "clip_vision_model"
        prefix = CLIP_TOWER_PREFIX if clip else TOWER_PREFIX
        state = {k: v for k, v in read_state(loaded.path).items() if not k.startswith(TOWER_PREFIX)}
        state.update({prefix + k: v for k, v in vision.state_dict().items()})
        projector = model.model.multi_modal_projector
        for index, layer in (("0", projector.linear_1), ("2", projector.linear_2)):
            state.update({f"model.mm_projector.{index}.{k}": v for k, v in layer.state_dict().items()})
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), {"format": "pt"}
        )
        config = dict(loaded.extra["config"])
        feature = {v: k for k, v in SELECT_FEATURE.items()}[model.config.vision_feature_select_strategy]
        config.update(
            mm_vision_tower=str(final / "vision_tower"),
            mm_hidden_size=int(model.config.vision_config.hidden_size),
            mm_vision_select_layer=int(model.config.vision_feature_layer),
            mm_vision_select_feature=feature,
        )
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for item in loaded.path.iterdir():
            if (
                item.is_file()
                and item.name not in SKIP_COPY
                and not item.name.startswith(("model-", "pytorch_model-"))
            ):
                shutil.copy2(item, out / item.name)
        loaded.processor.image_processor.save_pretrained(out)  # a copy of the tower's, as in the source

    def to_hf(self, loaded: Loaded, out: Path) -> None:
        """The swapped model in the HF Llava layout (what :func:`convert_llava_original_to_hf` writes)."""
        save_checkpoint(loaded.model, loaded.processor, out)
