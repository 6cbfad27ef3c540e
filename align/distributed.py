"""What a run needs to know about the processes ``accelerate launch`` started, and DeepSpeed's sizes.

* :func:`launch_state` gives accelerate's process state exactly as ``Accelerator()`` would create it
  (``ACCELERATE_USE_CPU`` honoured), so code that runs before the training loop (the embedding
  cache) sees the launcher's world size instead of freezing a one-process state.
* :func:`outside_launch` runs a block as a plain single process (launcher variables and accelerate
  state set aside): a tiny model built on first use inside a launch trains alone, never joins the
  run's process group or its DeepSpeed config.
* :func:`whole_model` gives a model whose parameters are whole, also under DeepSpeed ZeRO-3
  (evaluation and saving build artifacts from the modules themselves).
* :func:`summed_over_processes` adds a tensor up across the run's processes (token counts of a
  global batch).
* :func:`fill_deepspeed_autos` resolves the size-type ``"auto"`` values of a DeepSpeed config for any
  model, not only those with an HF ``config``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "check_world_size",
    "DEEPSPEED_SIZE_DEFAULTS",
    "fill_deepspeed_autos",
    "global_rank",
    "hidden_width",
    "launch_backend",
    "launch_record",
    "launch_state",
    "launched_world_size",
    "local_rank",
    "outside_launch",
    "start_line",
    "summed_over_processes",
    "whole_model",
    "whole_models",
]

# Variables torchrun / accelerate set for the processes they start (``ACCELERATE_*`` as well).
LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
)
# DeepSpeed's own defaults (deepspeed.runtime.zero.config), used when a model has no hidden width.
DEEPSPEED_SIZE_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def global_rank() -> int:
    """This process's rank among all launched processes (``RANK``; 0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def check_world_size(state: Any) -> Any:
    """``state`` (an ``Accelerator`` or ``PartialState``) if it spans every launched process, else an error.

    Fewer processes than the launcher started means each one would work alone (a state created
    before the launcher's, or DeepSpeed on CPU without the backend :func:`launch_backend` names).
    """
    launched = launched_world_size()
    if state.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but accelerate set up "
            f"{state.num_processes} ({state.distributed_type.value}): each process would work alone. On CPU "
            "use `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N` (DDP over "
            "gloo), or `accelerate launch --config_file <DeepSpeed config> --num_processes N` (gloo is "
            "named for it: align.distributed.launch_backend)"
        )
    return state


def launch_backend() -> str | None:
    """The process-group backend to name to accelerate: ``"gloo"`` for DeepSpeed launched on a
    machine without GPUs, else None (accelerate's own choice).

    There accelerate finds no backend of its own, so, although DeepSpeed's process group spans every
    process, it reports one process per rank (each would train alone); named, it counts them all.
    """
    from accelerate.utils import parse_flag_from_env

    deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and "LOCAL_RANK" in os.environ
    if deepspeed and not parse_flag_from_env("ACCELERATE_USE_CPU") and not torch.cuda.is_available():
        return "gloo"
    return None


def launch_state() -> Any:
    """accelerate's shared ``PartialState``, created as ``Accelerator()`` creates it.

    A bare ``PartialState()`` ignores ``ACCELERATE_USE_CPU`` (and :func:`launch_backend`) and, on a
    machine without GPUs, settles on one process for the rest of the run, although the launcher
    started several.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    backend = launch_backend()
    kwargs = {"backend": backend} if backend else {}
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **kwargs)


def summed_over_processes(value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``value`` summed over every process of the run (an all-reduce, detached), and their number.

    ``(value, 1)`` when ``torch.distributed`` is not initialized. Every process must call it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value.detach(), 1
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total, dist.get_world_size()


@contextlib.contextmanager
def outside_launch() -> Iterator[None]:
    """Run the block as a single plain process: no launcher variables, a fresh accelerate state.

    Everything is put back afterwards (environment, accelerate's shared states, transformers'
    ZeRO-3 flag: :func:`whole_models`), so the surrounding run continues as launched.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState

    names = [k for k in os.environ if k in LAUNCH_VARIABLES or k.startswith("ACCELERATE_")]
    saved_env = {k: os.environ.pop(k) for k in names}
    states = (PartialState, AcceleratorState, GradientState)
    saved_states = [dict(cls._shared_state) for cls in states]
    for cls in states:
        cls._shared_state.clear()
    try:
        with whole_models():
            yield
    finally:
        for cls, saved in zip(states, saved_states, strict=True):
            cls._shared_state.clear()
            cls._shared_state.update(saved)
        os.environ.update(saved_env)


@contextlib.contextmanager
def whole_models() -> Iterator[None]:
    """Models loaded inside (an evaluation's encoders) come whole: transformers' ZeRO-3 flag, which a
    ZeRO-3 DeepSpeed config sets so that ``from_pretrained`` partitions, is off meanwhile."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _from_deepspeed(hook: Any) -> bool:
    return str(getattr(getattr(hook, "func", hook), "__module__", "")).startswith("deepspeed")


def settle_partitions(engine: Any) -> None:
    """Under DeepSpeed ZeRO-3, wait for and release every parameter the prefetcher left gathered or in flight.

    The prefetcher follows the order it recorded during training (with gradient checkpointing, the backward's
    recomputation too), so a forward in another order (the final loss check, in eval mode) ends with
    parameters still in flight, and gathering them for the whole copy then fails in DeepSpeed ("Cannot
    partition a param in flight"; seen on a GPU, not on CPU). Nothing to do for any other model.
    """
    release = getattr(engine, "empty_partition_cache", None)  # a DeepSpeedEngine; ZeRO-3 acts on it
    if callable(release):
        release()


def whole_model(module: nn.Module, *, copy_always: bool = False) -> nn.Module:
    """``module`` with every parameter whole: itself (a copy with ``copy_always``), or under DeepSpeed
    ZeRO-3 a plain copy.

    ZeRO-3 leaves each process an empty shard of every parameter and gathers them in hooks around
    each forward. The copy is made while all of them are gathered (``deepspeed.zero.GatheredParameters``)
    and keeps none of DeepSpeed's hooks, so it can be copied, moved, run and saved like the module
    ``build_model`` returned (or ``from_pretrained`` loaded: under a ZeRO-3 config it partitions too).
    Under ZeRO-3 every process must call it (the gathering is collective).
    """
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return copy.deepcopy(module) if copy_always else module
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        whole = copy.deepcopy(module)  # a Parameter copies as a plain one, of its (gathered) data
    for sub in whole.modules():
        for hooks in (
            sub._forward_pre_hooks,
            sub._forward_hooks,
            sub._backward_pre_hooks,
            sub._backward_hooks,
        ):
            for key in [key for key, hook in hooks.items() if _from_deepspeed(hook)]:
                del hooks[key]
                sub._forward_pre_hooks_with_kwargs.pop(key, None)
                sub._forward_hooks_with_kwargs.pop(key, None)
                sub._forward_hooks_always_called.pop(key, None)
    return whole


def hidden_width(model: nn.Module) -> int | None:
    """The model's hidden width, read as HF's Trainer reads it, or None when it has none.

    From ``model.config`` (else the first submodule with a ``config``, e.g. the CLIP inside a KUEA
    student): ``hidden_size``, the largest of ``hidden_sizes``, then the text or vision sub-config.
    """
    configs = [getattr(model, "config", None)]
    configs += [getattr(m, "config", None) for m in model.modules() if m is not model]
    for config in configs:
        for cfg in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
            if isinstance(getattr(cfg, "hidden_size", None), int):
                return cfg.hidden_size
            sizes = getattr(cfg, "hidden_sizes", None)
            if sizes:
                return max(sizes)
    return None


def fill_deepspeed_autos(conf: dict[str, Any], model: nn.Module) -> dict[str, int]:
    """Replace the size-type ``"auto"`` values of ``conf["zero_optimization"]`` in place; return them.

    With a hidden width ``h`` (:func:`hidden_width`): ``reduce_bucket_size = h*h``,
    ``stage3_prefetch_bucket_size = 0.9*h*h``, ``stage3_param_persistence_threshold = 10*h`` (the HF
    Trainer's and accelerate's rule). Without one (alignment heads have no HF config): DeepSpeed's
    own defaults, :data:`DEEPSPEED_SIZE_DEFAULTS`.
    """
    zero = conf.get("zero_optimization", {})
    width = hidden_width(model)
    if width is None:
        sizes = dict(DEEPSPEED_SIZE_DEFAULTS)
    else:
        sizes = {
            "reduce_bucket_size": width * width,
            "stage3_prefetch_bucket_size": int(0.9 * width * width),
            "stage3_param_persistence_threshold": 10 * width,
        }
    filled = {key: value for key, value in sizes.items() if zero.get(key) == "auto"}
    zero.update(filled)
    return filled


def launch_record(accelerator: Any, model: nn.Module, batch_size: int, grad_accum: int) -> dict[str, Any]:
    """How the run really runs, read from the prepared objects: processes, batch, precision, engine.

    ``engine`` is the class of the prepared model (``DeepSpeedEngine``, ``DistributedDataParallel``
    or the model's own); ``zero_stage`` is the engine's own ZeRO stage (None without DeepSpeed).
    """
    stage = model.zero_optimization_stage() if hasattr(model, "zero_optimization_stage") else None
    world = accelerator.num_processes
    return {
        "world_size": world,
        "distributed_type": accelerator.distributed_type.value,
        "batch_size_per_process": batch_size,
        "grad_accum": grad_accum,
        "global_batch": batch_size * grad_accum * world,
        "mixed_precision": accelerator.mixed_precision,
        "engine": type(model).__name__,
        "zero_stage": None if stage is None else int(stage),
    }


def start_line(record: dict[str, Any], step: int, resumed_from: Any) -> str:
    """The one line a training run prints when it starts (see :func:`launch_record`)."""
    r = record
    deepspeed = "none" if r["zero_stage"] is None else f"ZeRO-{r['zero_stage']} ({r['engine']})"
    resume = f"resuming at step {step} from {resumed_from}" if resumed_from else "from step 0 (fresh)"
    return (
        f"train start: world size {r['world_size']} ({r['distributed_type']}), batch {r['batch_size_per_process']} "
        f"per process x {r['grad_accum']} accumulation = {r['global_batch']} global, mixed precision "
        f"{r['mixed_precision']}, DeepSpeed {deepspeed}, {resume}"
    )
