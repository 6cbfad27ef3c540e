"""KUEA training-step throughput: a cached vs a live target (tiny models, a ratio), and the real
students at their shipped configs with random weights against the device's own matmul rate.

Default (tiny): a step is what the loop does per batch: read the batch (decode each image, run the
student's preprocessing, and either read the cached target embedding or run the target's
preprocessing), then forward (student, frozen original, live target), backward and an AdamW step. Both
modes run in the same process, interleaved in blocks so that load from other processes hits them
alike; the per-step times are medians.

    python benchmarks/bench_kuea_step.py                 # tiny-clip + tiny-dinov2 on a shapes world (CPU)

``--students``: each hub id's shipped config (``model_configs/``) built with random weights, a cached
target (random ``[B, 1024]`` embeddings, DINOv2-L's width) and the paper's kernels and loss weights
(``KueaModel``); one measured call = forward (student and frozen original), backward, AdamW step. Per
variant (``--variants``, comma-separated ``+``-joined options): ``fp32`` or ``bf16`` (autocast, fp32
master weights, as ``train.mixed_precision: bf16``), ``sdpa`` or ``eager`` attention, ``compile``
(``torch.compile`` of the model), ``ckpt`` (gradient checkpointing). FLOPs by ``FlopCounterMode``;
``fraction_of_matmul`` against the dense matmul rate in the run's dtype (and ``fraction_of_peak``, the
datasheet, on a known GPU).

    python benchmarks/bench_kuea_step.py --students openai/clip-vit-base-patch16 --batch-size 2 \
        --variants fp32+sdpa,fp32+eager,bf16+sdpa,fp32+sdpa+ckpt --out runs/bench/kuea_real.json
    python benchmarks/bench_kuea_step.py --device cuda --batch-size 64 \
        --students openai/clip-vit-base-patch16,openai/clip-vit-large-patch14-336 \
        --variants bf16+sdpa,bf16+eager,bf16+sdpa+ckpt,bf16+sdpa+compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from align.methods.kuea.recipe import KueaMethod, load_recipe


def _setup(args: argparse.Namespace, root: Path) -> tuple[list[str], int]:
    from align.data.shapes import generate_shapes

    student, target, data = "tiny-clip", "tiny-dinov2-random", str(root / "shapes")
    generate_shapes(data, n=max(4 * args.batch_size, 128), seed=0, progress=False, test_fraction=0.0)
    overrides = [f"student={student}", f"target={target}", f"data.train={data}", "data.split=null",
                 "data.cache_dtype=fp32", f"train.batch_size={args.batch_size}", "train.steps=1"]  # fmt: skip
    return overrides, args.batch_size


class Mode:
    """One configuration (cached or live target) ready to step."""

    def __init__(self, overrides: list[str], live: bool, out: Path, args: argparse.Namespace) -> None:
        recipe = load_recipe(None, [*overrides, f"live_target={str(live).lower()}"])
        self.method = KueaMethod(recipe, out)
        self.model = self.method.build_model(recipe.train).to(args.device)
        self.optimizer = torch.optim.AdamW(self.method.param_groups(self.model, recipe.train), lr=1e-5)
        self.loader = torch.utils.data.DataLoader(
            self.method.images, batch_size=args.batch_size, shuffle=True, drop_last=True,
            num_workers=args.workers, persistent_workers=args.workers > 0,
        )  # fmt: skip
        self.iter, self.args, self.times = iter(self.loader), args, []

    def batch(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self.iter)
        except StopIteration:
            self.iter = iter(self.loader)
            batch = next(self.iter)
        return {k: v.to(self.args.device, non_blocking=True) for k, v in batch.items()}

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        device_type = torch.device(self.args.device).type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.args.bf16):
            out = self.model(batch["pixels"], batch.get("target"), batch.get("target_pixels"))
        out["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> None:
        start = time.perf_counter()
        self.step(self.batch())
        if self.args.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - start)


VARIANT_OPTIONS = {"fp32", "bf16", "sdpa", "eager", "compile", "ckpt"}


def random_student(hub_id: str, device: str, attn: str, shrink: int = 1, layers: int | None = None):
    """The CLIP image tower of ``hub_id`` at its shipped config with random weights on ``device``
    (``shrink``/``layers``: narrower and shallower, for dry runs)."""
    from common import random_model, shrink_config

    from align.model_configs import meta_vision_encoder

    encoder = meta_vision_encoder(hub_id)  # the real config and image processor, on the meta device
    config = shrink_config(encoder.model.config, shrink, layers)
    encoder.model = random_model(config, type(encoder.model), device, attn=attn)
    return encoder.train()


def real_step(
    hub_id: str, options: set[str], batch: int, device: str, shrink: int = 1, layers: int | None = None
):
    """A zero-argument KUEA training step (cached target) for one variant, and its student's size."""
    from align.methods.kuea.recipe import KueaModel, KueaRecipe

    torch.manual_seed(0)
    student = random_student(hub_id, device, "eager" if "eager" in options else "sdpa", shrink, layers)
    if "ckpt" in options:
        student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = KueaModel(student, None, KueaRecipe(), target_dim=1024).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    forward = torch.compile(model) if "compile" in options else model
    size = student.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)
    target = torch.randn(batch, 1024, device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled="bf16" in options)

    def step() -> None:
        with autocast:
            loss = forward(pixels, target)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in student.parameters())


def run_real(args: argparse.Namespace) -> None:
    from common import (
        count_flops,
        datasheet_peak,
        fmt_bytes,
        machine_info,
        matmul_tflops,
        measure,
        print_table,
        rates,
        write_results,
    )

    peak = datasheet_peak(args.device)
    matmul = {}
    rows = []
    for hub_id in args.students.split(","):
        for variant in args.variants.split(","):
            options = set(variant.split("+"))
            row = {"student": hub_id.split("/")[-1], "variant": variant, "batch": args.batch_size}
            try:
                unknown = options - VARIANT_OPTIONS
                if unknown:
                    raise ValueError(
                        f"unknown option(s) {sorted(unknown)} in variant {variant!r}; known: {sorted(VARIANT_OPTIONS)}"
                    )
                dtype = torch.bfloat16 if "bf16" in options else torch.float32
                if dtype not in matmul:
                    matmul[dtype] = matmul_tflops(dtype=dtype, device=args.device)
                step, params = real_step(
                    hub_id, options, args.batch_size, args.device, args.shrink, args.layers
                )
                result = measure(step, repeats=args.steps, warmup=args.warmup, device=args.device)
                row.update(student_params_m=round(params / 1e6, 1), step_s=round(result["seconds"], 4))
                row["images_per_s"] = round(args.batch_size / result["seconds"], 2)
                row.update(rates(count_flops(step), result["seconds"], matmul[dtype], peak))
                row["peak_mem"] = fmt_bytes(result["peak_bytes"])
            except Exception as err:  # one variant's failure (e.g. out of memory) is a row, not the end
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            finally:
                step = None
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
    columns = ["student", "variant", "batch", "step_s", "images_per_s", "achieved_tflops", "matmul_tflops"]
    columns += ["fraction_of_matmul"] + (["fraction_of_peak"] if peak else []) + ["peak_mem", "error"]
    print_table(rows, columns)
    payload = {
        "benchmark": "kuea_step",
        "machine": machine_info(args.device),
        "settings": vars(args),
        "rows": rows,
    }
    write_results(args.out, payload, columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", default=None, help="hub ids with shipped configs (real-size mode)")
    parser.add_argument(
        "--variants", default="fp32+sdpa", help="real-size mode: e.g. bf16+sdpa,bf16+eager+ckpt"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (12 tiny, 3 real)")
    parser.add_argument("--warmup", type=int, default=1, help="real-size mode: untimed steps first")
    parser.add_argument("--block", type=int, default=3, help="steps per mode before switching")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument(
        "--shrink", type=int, default=1, help="real-size mode: divide widths by this (dry runs)"
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="real-size mode: at most this many layers (dry runs)"
    )
    parser.add_argument(
        "--out", default="runs/bench/kuea_step.json", help="real-size mode: JSON (+ .md) path"
    )
    args = parser.parse_args()
    args.batch_size = args.batch_size or (64 if args.students else 32)
    args.steps = args.steps or (3 if args.students else 12)
    if args.students:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        run_real(args)
        return
    args.bf16 = False
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-kuea-") as tmp:
        root = Path(tmp)
        overrides, batch = _setup(args, root)
        modes = {
            "cached": Mode(overrides, False, root / "cached", args),
            "live": Mode(overrides, True, root / "live", args),
        }
        for mode in modes.values():  # warm-up (allocator, kernels, page cache)
            mode.step(mode.batch())
        while any(len(m.times) < args.steps for m in modes.values()):
            for mode in modes.values():
                for _ in range(min(args.block, args.steps - len(mode.times))):
                    mode.timed_step()
        result = {"setting": "tiny-clip + tiny-dinov2-random", "device": args.device, "batch_size": batch,
                  "steps_per_mode": args.steps}  # fmt: skip
        for name, mode in modes.items():
            median = statistics.median(mode.times)
            result[name] = {"median_step_s": median, "samples_per_s": batch / median}
        result["live_over_cached_step_time"] = (
            result["live"]["median_step_s"] / result["cached"]["median_step_s"]
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
