"""The cost stage of a tuning recipe (:mod:`align.cost`): the HF Llava model at its real config on the meta
device, with exactly what the stage trains (:func:`mllm_swap.tune.model.add_lora` and
:func:`~mllm_swap.tune.model.select_trainable`, the same calls ``tune`` makes).

The model is the recipe's ``model``: a hub id with a shipped config (:mod:`align.model_configs`) or a local
checkpoint directory (its ``config.json``); ``encoder`` plans it as swapped with that vision encoder (a
shipped hub id), under the swap's own rules (:func:`mllm_swap.towers.new_tower`: prefix tokens, tower
kind; :func:`mllm_swap.families.llava_hf.strategy_for`; the connector's input follows the new width).
Text tokens per sample are not in a recipe: known LLaVA data
files carry an assumed average (:data:`DATASETS`), else ``max_length`` bounds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.cost import Part, Stage
from align.errors import UserError
from align.model_configs import build_meta, config_dir, shipped_config
from mllm_swap.families import family_by_name
from mllm_swap.families.llava_hf import fed_image_size, feed_view, strategy_for
from mllm_swap.towers import prefix_tokens_of
from mllm_swap.tune.config import TuneConfig
from mllm_swap.tune.model import add_lora, select_trainable

__all__ = ["DATASETS", "tune_stage"]

# data file name -> (samples, assumed average text tokens per sample: an estimate, not a measurement)
DATASETS: dict[str, tuple[int, int]] = {
    "blip_laion_cc_sbu_558k.json": (558_128, 64),  # one short caption + the chat template
    "llava_v1_5_mix665k.json": (665_298, 320),  # multi-turn conversations
}


def _config(model: str) -> tuple[Any, Path]:
    """The config of ``model`` and the folder it came from (a checkpoint, or the shipped configs)."""
    from transformers import AutoConfig

    if Path(model, "config.json").is_file():
        return AutoConfig.from_pretrained(model), Path(model)
    try:
        folder = config_dir(model)
    except UserError as err:
        raise UserError(
            f"model '{model}': no checkpoint directory there and {err}; plan a swapped model by its base "
            "with --set model=llava-hf/llava-1.5-7b-hf"
        ) from None
    return shipped_config(model), folder


def _fed_side(folder: Path) -> int | None:
    """The pixels a side the image processor in ``folder`` feeds the tower (None: no processor there)."""
    from transformers import AutoImageProcessor

    try:
        return fed_image_size(AutoImageProcessor.from_pretrained(str(folder)))
    except (OSError, ValueError):
        return None


def swapped(config: Any, encoder: str) -> tuple[Any, Any]:
    """``config`` (an HF Llava config) with its tower replaced by ``encoder``'s, as ``swap`` builds it, and
    the :class:`~mllm_swap.towers.NewTower` (its ``num_tokens`` at the encoder's own image size)."""
    from align.model_configs import meta_vision_encoder
    from mllm_swap.towers import new_tower

    tower = new_tower(meta_vision_encoder(encoder))
    config.vision_config = tower.config
    config.vision_feature_select_strategy = strategy_for(tower)[0]
    config.image_seq_length = tower.num_tokens
    return config, tower


def tune_stage(
    cfg: TuneConfig, text_tokens: int | None = None, dataset_size: int | None = None, encoder: str | None = None
) -> Stage:
    """The :class:`~align.cost.Stage` of tuning recipe ``cfg`` (``text_tokens``/``dataset_size`` override
    :data:`DATASETS`; ``encoder``: swapped with that tower)."""
    from transformers import LlavaForConditionalGeneration

    config, folder = _config(cfg.model)
    if config.model_type != "llava":
        raise UserError(f"model '{cfg.model}': plan knows HF Llava models (model_type llava), found {config.model_type!r}")
    new = None
    if encoder is not None:
        config, new = swapped(config, encoder)
    family = family_by_name("llava_hf")
    model = build_meta(config, LlavaForConditionalGeneration)
    if cfg.stage == "lora":
        model = add_lora(model, cfg, family)
    select_trainable(model, cfg, family)
    paths = family.trainable_parts(model)
    vision, text = config.vision_config, config.text_config
    notes = []
    if new is not None:  # the encoder's processor sets the image size (DINOv2: 224, its config 518)
        image_tokens, tower_tokens = new.num_tokens, new.num_patches + new.num_prefix_tokens
    else:
        strategy, layer = config.vision_feature_select_strategy, config.vision_feature_layer
        side = _fed_side(folder)  # the processor's pixels set the patches (a DINOv2 tower: 224, its config 518)
        if side is None:
            notes.append(f"no image processor in {folder}: image size {vision.image_size} from the vision config")
        view = feed_view(vision, strategy, layer, cfg.model, side)
        image_tokens = view.num_tokens  # what the connector receives
        tower_tokens = (view.image_size // view.patch_size) ** 2 + prefix_tokens_of(vision)
    known = DATASETS.get(Path(str(cfg.data)).name) if cfg.data else None
    if text_tokens is None:
        text_tokens = known[1] if known else cfg.max_length - image_tokens
        notes.append(f"{text_tokens} text tokens per sample ({'assumed average' if known else 'max_length bound'}; --text-tokens)")
    dataset_size = dataset_size or (known[0] if known else None)
    seq = min(cfg.max_length, image_tokens + text_tokens)
    tower = model.get_submodule(paths["tower"])
    trains = {name: any(p.requires_grad for p in model.get_submodule(paths[name]).parameters()) for name in paths}
    parts = [
        Part("vision tower", tower, tower_tokens, vision.num_hidden_layers, vision.hidden_size, trains["tower"]),
        Part("connector", model.get_submodule(paths["connector"]), image_tokens, grad_flows=True),
        Part("language model", model.get_submodule(paths["llm"]), seq, text.num_hidden_layers, text.hidden_size, True),
        Part("lm_head", model.get_submodule(paths["lm_head"]), seq, grad_flows=True, vocab=text.vocab_size),
    ]
    t = cfg.train
    return Stage(f"tune {cfg.stage}", parts, t.batch_size, t.grad_accum, t.steps, t.epochs, dataset_size,
                 t.optimizer, t.gradient_checkpointing, image_tokens=image_tokens, notes=notes)  # fmt: skip
