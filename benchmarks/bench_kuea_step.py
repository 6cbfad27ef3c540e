"""KUEA training-step throughput with a cached vs a live target, measured in one run (a ratio).

A step here is what the loop does per batch: read the batch (decode each image, run the student's
preprocessing, and either read the cached target embedding or run the target's preprocessing), then
forward (student, frozen original, live target), backward and an AdamW step. Both modes run in the
same process, interleaved in blocks so that load from other processes hits them alike; the
per-step times are medians.

    python benchmarks/bench_kuea_step.py                 # tiny-clip + tiny-dinov2 on a shapes world (CPU)
    python benchmarks/bench_kuea_step.py --vit-b --device cuda   # random ViT-B/16 CLIP + DINOv2-B, bf16

``--vit-b`` also reports the achieved FLOP/s (``torch.utils.flop_counter`` over one step) as a
fraction of the device's own bf16 matmul throughput, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from align.methods.kuea.recipe import KueaMethod, load_recipe


def _write_vit_b(root: Path) -> tuple[str, str]:
    """Random ViT-B/16 CLIP (224 px, projection 512) and DINOv2-B/14 directories in HF format."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
    )

    clip_dir, dino_dir = root / "clip-vit-b16", root / "dinov2-b14"
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16, projection_dim=512)  # fmt: skip
    text = dict(vocab_size=1000, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=64,
                intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                projection_dim=512)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).save_pretrained(
        clip_dir
    )
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        clip_dir
    )
    Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                             patch_size=14)).save_pretrained(dino_dir)  # fmt: skip
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(dino_dir)  # fmt: skip
    return str(clip_dir), str(dino_dir)


def _image_folder(root: Path, n: int, size: int) -> str:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "images" / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return str(root / "images")


def _setup(args: argparse.Namespace, root: Path) -> tuple[list[str], int]:
    if args.vit_b:
        student, target = _write_vit_b(root)
        data = _image_folder(root, args.batch_size * 4, 256)
    else:
        from align.data.shapes import generate_shapes

        student, target, data = "tiny-clip", "tiny-dinov2", str(root / "shapes")
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


def matmul_peak(device: str, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """FLOP/s of a large square matmul on ``device`` (the machine's own peak, measured)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def step_flops(mode: Mode) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    batch = mode.batch()
    with FlopCounterMode(display=False) as counter:
        mode.step(batch)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit-b", action="store_true", help="random ViT-B/16 student + DINOv2-B target")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode")
    parser.add_argument("--block", type=int, default=3, help="steps per mode before switching")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    args.batch_size = args.batch_size or (64 if args.vit_b else 32)
    args.bf16 = args.vit_b and args.device.startswith("cuda")
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
        result = {"setting": "vit-b16 (random) + dinov2-b14" if args.vit_b else "tiny-clip + tiny-dinov2",
                  "device": args.device, "batch_size": batch, "bf16": args.bf16, "steps_per_mode": args.steps}  # fmt: skip
        for name, mode in modes.items():
            median = statistics.median(mode.times)
            result[name] = {"median_step_s": median, "samples_per_s": batch / median}
        result["live_over_cached_step_time"] = (
            result["live"]["median_step_s"] / result["cached"]["median_step_s"]
        )
        if args.vit_b and args.device.startswith("cuda"):
            peak = matmul_peak(args.device, torch.bfloat16)
            for name, mode in modes.items():
                flops = step_flops(mode)
                achieved = flops / result[name]["median_step_s"]
                result[name].update(
                    flops_per_step=flops, tflops=achieved / 1e12, fraction_of_peak=achieved / peak
                )
            result["bf16_matmul_peak_tflops"] = peak / 1e12
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
