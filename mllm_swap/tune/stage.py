"""Run one tuning stage on the shared training loop: the stage as a ``Method`` (``align.train.method``).

``run_tune(cfg, out_dir)`` loads the model, wraps it for the stage (:mod:`mllm_swap.tune.model`), streams
length-grouped LLaVA conversations (:mod:`mllm_swap.tune.batches`) and writes the stage's outputs:
the peft adapter (``lora``: LoRA weights plus every other trainable as peft ``modules_to_save``) or the full
checkpoint and ``non_lora_trainables.safetensors`` (``connector``/``full``), the processor, ``tune_info.json``
and a model card (``README.md``, :mod:`mllm_swap.tune.adapter`), next to the loop's checkpoints, metrics and
``result.json``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.distributed import launched_world_size, summed_over_processes
from align.errors import UserError
from align.integrity import record_checksums
from align.io import read_json, write_json
from align.paths import shipped
from align.rundir import OutDir
from align.train.config import TrainConfig
from align.train.resume import RUN_FILES
from mllm_swap.checkpoints import resolve_checkpoint
from mllm_swap.towers import add_remote_code
from mllm_swap.tune.adapter import reference, write_card
from mllm_swap.tune.config import TuneConfig, check_qlora_available
from mllm_swap.tune.conversations import IGNORE_INDEX
from mllm_swap.tune.model import (
    INFO_FILE,
    NON_LORA_FILE,
    add_lora,
    describe,
    load_for_tuning,
    load_non_lora,
    param_groups,
    select_trainable,
)

logger = logging.getLogger(__name__)


def resolve_data(cfg: TuneConfig) -> tuple[Path, Path | None]:
    """The conversation JSON and image folder: ``data``/``image_folder``, or a generated shapes world."""
    if cfg.data is not None:
        return Path(cfg.data), Path(cfg.image_folder) if cfg.image_folder else Path(cfg.data).parent
    from align.data.shapes import generate_shapes
    from align.paths import home

    root = home() / "data" / f"shapes-n{cfg.shapes.n}-s{cfg.shapes.seed}"
    generate_shapes(root, cfg.shapes.n, seed=cfg.shapes.seed)
    return root / "instruct.json", root


class TuneMethod:
    """One tuning stage as a Method of the shared loop (``align.train.loop.train``)."""

    def __init__(self, cfg: TuneConfig) -> None:
        self.cfg = cfg
        if cfg.qlora:
            check_qlora_available()
        # Build a tiny model now, before a ZeRO-3 config exists (it would partition the builder's models).
        resolve_checkpoint(cfg.model)
        self.data, self.image_folder = resolve_data(cfg)
        self.groups: dict[str, list[str]] = {}
        self.processor: Any = None
        self.family: Any = None
        self.dataset: Any = None
        self.tokens_seen = 0

    def build_model(self, train_cfg: TrainConfig) -> nn.Module:
        """Load, apply earlier trainables, wrap with LoRA for the lora stage, select what trains."""
        from mllm_swap.tune.batches import ConversationDataset

        loaded = load_for_tuning(self.cfg)
        model, self.processor, self.family = loaded.model, loaded.processor, loaded.family
        cache = None
        if self.cfg.tower_cache is not None:
            from mllm_swap.tune.tower_cache import install

            cache = install(model, self.family.trainable_parts(model)["tower"], self.cfg.tower_cache)
        self.dataset = ConversationDataset(
            self.data,
            self.image_folder,
            self.processor,
            max_length=self.cfg.max_length,
            image_aspect_ratio=self.cfg.image_aspect_ratio,
            on_error=self.cfg.on_error,
            tower_cache=cache,
        )
        if cache is not None:
            cache.check_images(self.dataset, model)
        logger.info(
            "tune data: %s; conversations tokenised once in %.1f s",
            self.dataset.summary.describe(),
            self.dataset.tokenise_s,
        )
        if self.cfg.init_trainables is not None:
            load_non_lora(model, self.cfg.init_trainables)
        if train_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        if self.cfg.stage == "lora":
            model = add_lora(model, self.cfg, self.family)
        self.groups = select_trainable(model, self.cfg, self.family)
        return model

    def param_groups(self, model: nn.Module, train_cfg: TrainConfig) -> list[dict[str, Any]]:
        """Per-part learning rates (connector_lr, tower_lr)."""
        return param_groups(model, self.groups, self.cfg)

    def dataloader(self, batch_size: int, seed: int) -> Any:
        """Length-grouped (or plainly shuffled) batches in an order fixed by ``seed``.

        Grouped by the batch of all processes (``batch_size`` times the launched world size): the
        processes' consecutive batches then make up the global batch one process would draw.
        """
        from torch.utils.data import DataLoader

        from align.train.batches import PermutationSampler
        from mllm_swap.tune.batches import ConversationCollator, LengthGroupedSampler

        if self.cfg.group_by_length:
            sampler: Any = LengthGroupedSampler(
                self.dataset.lengths(), batch_size * launched_world_size(), seed
            )
        else:
            sampler = PermutationSampler(len(self.dataset), seed)
        return DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.cfg.train.num_workers,
            collate_fn=ConversationCollator(self.processor.tokenizer.pad_token_id),
            generator=torch.Generator().manual_seed(seed),  # no draw from the global RNG (exact resume)
        )

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The model's own next-token loss, the mean over the assistant tokens of the global batch.

        Each process sums its token losses and divides by the token count of all processes
        (``num_items_in_batch``, the HF Trainer's mechanism), times the number of processes: DDP's
        (or DeepSpeed's) average of the processes' gradients is then the one-process gradient of the
        same global batch, however the tokens fall between processes. ``tokens`` (input tokens) and
        ``label_tokens`` (the tokens the loss scores) count the global batch; with a tower cache,
        ``cached_images`` the images whose tower tokens the batch carries instead of pixels.
        """
        images = batch.get("pixel_values")
        if images is not None:
            dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
            batch = {**batch, "pixel_values": images.to(dtype)}
        scored = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # next-token targets: labels shifted by one
        cached = images.shape[0] if images is not None and images.dim() == 3 else 0  # [B, N, D]: tokens
        counts, processes = summed_over_processes(
            torch.stack([batch["attention_mask"].sum(), scored, scored.new_tensor(cached)])
        )
        out = model(**batch, num_items_in_batch=counts[1])
        self.tokens_seen += int(counts[0])
        logged = {"tokens": counts[0].float(), "label_tokens": counts[1].float()}
        if self.cfg.tower_cache is not None:
            logged["cached_images"] = counts[2].float()
        return out.loss * processes, logged

    def state_dict(self) -> dict[str, Any]:
        """Counters that continue across a resume (saved in the loop's checkpoints)."""
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens_seen = int(state["tokens_seen"])

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Exact-match VQA accuracy on ``cfg.eval_vqa`` (skipped when unset)."""
        self.restore_tower(model)
        if self.cfg.eval_vqa is None:
            return {}
        from mllm_swap.tune.quick_vqa import evaluate_vqa

        path = (
            self.image_folder / "vqa_test.jsonl" if self.cfg.eval_vqa == "shapes" else Path(self.cfg.eval_vqa)
        )
        result = evaluate_vqa(model, self.processor, path, limit=self.cfg.eval_limit)
        flat = {"vqa_accuracy": result["accuracy"], "vqa_n": result["n"]}
        flat.update({f"vqa_{kind}": acc for kind, acc in result["per_kind"].items()})
        flat.update({f"chance_{name}": value for name, value in result["chance"].items()})
        return flat

    def restore_tower(self, model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """With a tower cache: the real tower back in the model (and its weights in ``state_dict``)."""
        if self.cfg.tower_cache is not None:
            from mllm_swap.tune.tower_cache import restore

            restore(model, self.family.trainable_parts(model)["tower"], state_dict)

    def save(self, model: nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """Adapter (lora) or full checkpoint + non-LoRA trainables, processor and ``tune_info.json``.

        Paths are recorded by :func:`mllm_swap.tune.adapter.reference` (relative to ``out_dir``, or ids).
        """
        self.restore_tower(model, None if self.cfg.stage == "lora" else state_dict)
        base = reference(self.cfg.model, out_dir)
        if self.cfg.stage == "lora":
            model.peft_config[model.active_adapter].base_model_name_or_path = base
            # LoRA targets linear layers only and tuning never resizes the vocabulary: no embedding layers to
            # save, and no lookup of the base by its recorded name (relative, or a hub id) while saving.
            model.save_pretrained(out_dir, state_dict=state_dict, save_embedding_layers=False)
        else:
            from safetensors.torch import save_file

            names = [n for part in ("connector", "tower", "head") for n in self.groups.get(part, [])]
            non_lora = {n: state_dict[n].detach().cpu().contiguous() for n in names}
            model.save_pretrained(out_dir, state_dict=state_dict)
            add_remote_code(out_dir)  # a full checkpoint with an aligned tower loads without this package
            save_file(non_lora, str(out_dir / NON_LORA_FILE), metadata={"format": "pt"})
        self.processor.save_pretrained(out_dir)
        shapes = self.cfg.shapes
        source = (
            reference(self.cfg.data, out_dir)
            if self.cfg.data is not None
            else f"generated shapes world (n={shapes.n}, seed={shapes.seed})"
        )
        info = {
            "stage": self.cfg.stage,
            "base_model": base,
            "trainable": describe(self.groups, model),
            "data": {"source": source, "summary": self.dataset.summary.describe()},
            "tokens_seen": self.tokens_seen,
        }
        write_json(out_dir / INFO_FILE, info)


# What DeepSpeed's process group is built from (set by `accelerate launch`, torchrun, the deepspeed launcher).
PROCESS_GROUP_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def deepspeed_kwargs(cfg: TuneConfig) -> dict[str, Any]:
    """A DeepSpeed plugin for ``cfg.deepspeed`` unless the launcher already configured DeepSpeed.

    Outside a launcher there is no process group for DeepSpeed to join: a :class:`UserError` names the
    ``accelerate launch`` command (the accelerate config shipped for that DeepSpeed file) before anything runs.
    """
    if cfg.deepspeed is None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {}
    if not Path(cfg.deepspeed).is_file():
        raise FileNotFoundError(f"deepspeed: {cfg.deepspeed}: config file not found")
    missing = [name for name in PROCESS_GROUP_VARIABLES if name not in os.environ]
    if missing:
        accelerate = f"recipes/accelerate/deepspeed_{Path(cfg.deepspeed).stem}.yaml"
        if not (shipped("recipes").parent / accelerate).is_file():
            accelerate = "recipes/accelerate/deepspeed_zero2.yaml"
        raise UserError(
            f"deepspeed: {cfg.deepspeed}: DeepSpeed runs in a launched process group, and this process was not "
            f"launched ({', '.join(missing)} unset). Run it under `accelerate launch --config_file {accelerate} "
            "--num_processes N -m mllm_swap tune --config ...` from the repository root, or without DeepSpeed "
            "(--set deepspeed=null)"
        )
    from accelerate.utils import DeepSpeedPlugin

    return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=str(cfg.deepspeed))}


def run_tune(
    cfg: TuneConfig, out_dir: str | Path, resume: bool | str = "auto", overwrite: bool = False
) -> Any:
    """Train one stage into ``out_dir`` with the shared loop; returns its ``TrainResult``."""
    from accelerate import PartialState

    from align.train.loop import train

    accelerator_kwargs = deepspeed_kwargs(cfg)  # before anything is written
    with OutDir(out_dir, "tune", overwrite, collective=True):
        method = TuneMethod(cfg)
        result = train(
            method,
            cfg.train,
            out_dir,
            resume,
            overwrite=overwrite,
            accelerator_kwargs=accelerator_kwargs,
            config_to_save=cfg,
        )
        if PartialState().is_main_process:
            info_path = Path(out_dir) / INFO_FILE
            if info_path.is_file():
                info = read_json(info_path)
                info["tokens_per_s"] = method.tokens_seen / max(result.elapsed_s, 1e-9)
                write_json(info_path, info)
                write_card(out_dir, cfg, info, result)  # over peft's empty template
            record_checksums(out_dir, exclude=RUN_FILES)  # the adapter's record, verified by merge
    return result
