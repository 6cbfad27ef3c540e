"""LoRA tuning step of a LLaVA-1.5-7B-shaped model under DeepSpeed ZeRO-2, through the training loop.

    python benchmarks/bench_lora_step.py [--layers 32] [--vision-layers 24] [--device cuda]
        [--variants bf16+sdpa+ckpt,bf16+sdpa] [--batch-size 8] [--text-tokens 512] [--steps 6]
        [--out runs/bench/lora_step.json]

The model: ``llava-hf/llava-1.5-7b-hf``'s shipped config (CLIP ViT-L/14-336 tower, 2-layer MLP
connector, Vicuna-7B: width 4096, vocabulary 32064) with random weights, the language model cut to
``--layers`` decoder layers and the tower to ``--vision-layers`` (defaults: the real 32 and 24).
What trains is the LLaVA-1.5 LoRA recipe (``recipes/llava15_lora.yaml``: r 128, alpha 256, every
``nn.Linear`` of the language model, the connector in full at its own rate), set up by the project's
own ``mllm_swap.tune.model`` (``add_lora``, ``select_trainable``, ``param_groups``) and trained by
``align.train.loop.train`` under the shipped ``deepspeed_configs/zero2.json`` (its ``auto`` values
filled by the loop), in one process (``RANK=0``, ``WORLD_SIZE=1`` unless launched). A sample is 576
image tokens (one 336 px image) and ``--text-tokens`` text tokens, all with labels.

Per variant (``+``-joined): ``bf16`` (``train.mixed_precision: bf16``) or ``fp32``; ``sdpa`` or ``eager``
attention; ``ckpt`` (``train.gradient_checkpointing``, as the recipe). Step time: the median of the
loop's own per-step log (``metrics.jsonl``, ``log_every: 1``) after the first step; FLOPs: one step
under ``FlopCounterMode`` (executed FLOPs, so with ``ckpt`` the recompute counts too).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    datasheet_peak,
    fmt_bytes,
    machine_info,
    matmul_tflops,
    print_table,
    random_model,
    rates,
    shrink_config,
    write_results,
)
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HUB_ID = "llava-hf/llava-1.5-7b-hf"
OPTIONS = {"bf16", "fp32", "sdpa", "eager", "ckpt"}
PRECISION = {True: "bf16", False: "'no'"}  # quoted: a bare no is YAML's false


def lora_bench(cfg, args: argparse.Namespace, attn: str):  # noqa: ANN001 - a TuneConfig
    """The tuning stage's ``Method`` (``TuneMethod``: its loss, optimizer groups and counters) on the
    random 7B-shaped LLaVA and synthetic batches instead of a checkpoint and conversations."""
    from mllm_swap.tune.stage import TuneMethod

    class LoraBench(TuneMethod):
        def __init__(self) -> None:  # no checkpoint or data to resolve
            self.cfg, self.groups, self.tokens_seen, self.flops, self.window = cfg, {}, 0, None, None

        def build_model(self, train_cfg) -> torch.nn.Module:  # noqa: ANN001 - a TrainConfig
            from transformers import LlavaForConditionalGeneration

            from align.model_configs import shipped_config
            from mllm_swap.families import family_by_name
            from mllm_swap.tune.model import add_lora, select_trainable

            config = shrink_config(shipped_config(HUB_ID), args.shrink)
            config.text_config.num_hidden_layers = args.layers
            config.vision_config.num_hidden_layers = args.vision_layers
            model = random_model(config, LlavaForConditionalGeneration, args.device, torch.float32, attn)
            self.family, self.config = family_by_name("llava_hf"), config
            if train_cfg.gradient_checkpointing:
                model.gradient_checkpointing_enable()
                model.enable_input_require_grads()
            model = add_lora(model, cfg, self.family)
            self.groups = select_trainable(model, cfg, self.family)
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            return model

        def dataloader(self, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
            """Identical samples: BOS, ``<image>`` expanded to its 576 tokens, text; every text token scored."""
            vision = self.config.vision_config
            gen = torch.Generator().manual_seed(seed)
            ids = torch.randint(3, 32000, (576 + args.text_tokens,), generator=gen)
            ids[0] = self.config.text_config.bos_token_id
            ids[1 : 1 + (vision.image_size // vision.patch_size) ** 2] = self.config.image_token_id
            sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                      "labels": ids.masked_fill(ids == self.config.image_token_id, -100),
                      "pixel_values": torch.randn(3, vision.image_size, vision.image_size, generator=gen)}  # fmt: skip
            return torch.utils.data.DataLoader(
                [sample] * (batch_size * (args.steps + 1)), batch_size=batch_size
            )

        def loss(self, model, batch):  # noqa: ANN001
            if self.flops is None:  # count the first step: forward here, backward and update in the loop
                self.flops, self.window = 0, FlopCounterMode(display=False)
                self.window.__enter__()
            return super().loss(model, batch)

        def after_step(self, model) -> None:  # noqa: ANN001
            if self.window is not None:
                self.window.__exit__(None, None, None)
                self.flops, self.window = self.window.get_total_flops(), None

        def save(self, model, out_dir: Path, state_dict) -> None:  # noqa: ANN001
            """Nothing to keep: the adapter of random weights."""

    return LoraBench()


def run_variant(args: argparse.Namespace, variant: str, out: Path) -> dict:
    """One loop run of ``variant``; its row (step time, FLOPs, the DeepSpeed engine that ran)."""
    from align.io import read_jsonl
    from align.recipes import load_config
    from align.train.loop import train
    from mllm_swap.tune.config import TuneConfig
    from mllm_swap.tune.stage import deepspeed_kwargs

    options = set(variant.split("+"))
    if options - OPTIONS:
        raise ValueError(
            f"unknown option(s) {sorted(options - OPTIONS)} in {variant!r}; known: {sorted(OPTIONS)}"
        )
    sets = [f"deepspeed={ROOT / 'deepspeed_configs/zero2.json'}", f"train.steps={args.steps}", "train.epochs=null",
            f"train.batch_size={args.batch_size}", f"train.gradient_checkpointing={'ckpt' in options}",
            f"train.mixed_precision={PRECISION['bf16' in options]}", "train.save_every=0",
            "train.log_every=1", "train.report_to=[jsonl]", "train.num_workers=0", "train.warmup=0",
            "eval_vqa=null"]  # fmt: skip
    cfg = load_config(TuneConfig, ROOT / "recipes/llava15_lora.yaml", sets)
    method = lora_bench(cfg, args, "eager" if "eager" in options else "sdpa")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = train(method, cfg.train, out, overwrite=True, accelerator_kwargs=deepspeed_kwargs(cfg))
    logged = [row["samples_per_s"] for row in read_jsonl(out / "metrics.jsonl")][1:]  # after the first step
    seconds = args.batch_size / statistics.median(logged)
    tokens = args.batch_size * (576 + args.text_tokens)
    row = {"step_s": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
    row["engine"] = f"{result.launch.get('engine')} ZeRO-{result.launch.get('zero_stage')}"
    row["trainable_m"] = round(method.trainable / 1e6, 1)
    return row | {"flops": method.flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layers", type=int, default=32, help="decoder layers of the language model (real: 32)"
    )
    parser.add_argument("--vision-layers", type=int, default=24, help="layers of the CLIP tower (real: 24)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="bf16+sdpa+ckpt")
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch per GPU")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument(
        "--steps", type=int, default=6, help="loop steps per variant (the first is not timed)"
    )
    parser.add_argument("--out", default="runs/bench/lora_step.json")
    parser.add_argument(
        "--shrink", type=int, default=1, help="divide widths by this (dry runs: same code paths)"
    )
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is not timed)")
    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    peak = datasheet_peak(args.device)
    matmul = {}
    rows = []
    for variant in args.variants.split(","):
        row = {"variant": variant, "shrink": args.shrink, "layers": args.layers, "vision_layers": args.vision_layers,
               "batch": args.batch_size, "tokens": 576 + args.text_tokens}  # fmt: skip
        try:
            dtype = torch.bfloat16 if "bf16" in variant.split("+") else torch.float32
            if dtype not in matmul:
                matmul[dtype] = matmul_tflops(dtype=dtype, device=args.device)
            with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
                found = run_variant(args, variant, Path(tmp) / "run")
            row.update({k: v for k, v in found.items() if k != "flops"})
            row.update(rates(found["flops"], found["step_s"], matmul[dtype], peak))
            if args.device.startswith("cuda"):
                row["peak_mem"] = fmt_bytes(torch.cuda.max_memory_allocated())
        except Exception as err:  # a failed variant (out of memory, say) is a row, the others still run
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rows.append(row)
        print(row, flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    columns = [
        "variant",
        "layers",
        "vision_layers",
        "batch",
        "tokens",
        "engine",
        "trainable_m",
        "step_s",
        "tokens_per_s",
    ]
    columns += ["achieved_tflops", "matmul_tflops", "fraction_of_matmul"]
    columns += (["fraction_of_peak"] if peak else []) + ["peak_mem", "error"]
    print_table(rows, columns)
    payload = {
        "benchmark": "lora_step",
        "machine": machine_info(args.device),
        "settings": vars(args),
        "rows": rows,
    }
    write_results(args.out, payload, columns)


if __name__ == "__main__":
    main()
