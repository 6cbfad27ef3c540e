"""SAIL head training throughput, as a fraction of the machine's own dense matmul throughput.

    python benchmarks/bench_sail_head.py [--presets tiny,small] [--device cpu|cuda] [--bf16]
        [--repeats 3] [--threads N] [--out runs/bench/sail_head.json]

One measured call = one full SAIL training step on cached features: image GLU head on ``concat``
features, text GLU head on sentence embeddings, chunked sigmoid loss over the whole batch, backward,
a Lion step and the logit-scale clamp (``align.methods.sail.SailModel`` / ``SailMethod.loss``).

FLOPs per step: counted by ``FlopCounterMode`` over one step (``common.count_flops``: the heads'
matmuls forward and backward, and the chunked loss's similarity matmuls with its backward recompute).
``fraction_of_matmul`` = achieved FLOP/s / the dense matmul FLOP/s measured in the same run
(``common.matmul_tflops``, the better of two measurements taken right before and right after the
preset), so the ratio holds on a quiet and on a shared machine alike; on a known GPU also
``fraction_of_peak`` (its datasheet bf16 rate, ``align.cost.DEVICES``).

Presets: ``tiny`` = the tiny recipe (tiny-dinov2 concat 192 -> 128, MiniLM 384, width 4, batch 512);
``small`` = ViT-S-sized (768 / 384 -> 512, width 8, batch 1024); ``large`` = the paper's shapes with a
GTE text side (2048 / 1024 -> 1024, width 8, batch 8192); ``paper`` = DINOv2-L + NV-Embed-v2 at batch
32768 (a GPU-sized run).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PRESETS = {
    "tiny": dict(img_dim=192, txt_dim=384, out=128, width=4, batch=512, chunk=256),
    "small": dict(img_dim=768, txt_dim=384, out=512, width=8, batch=1024, chunk=512),
    "large": dict(img_dim=2048, txt_dim=1024, out=1024, width=8, batch=8192, chunk=2048),
    "paper": dict(img_dim=2048, txt_dim=4096, out=1024, width=8, batch=32768, chunk=4096),
}


def build_step(
    img_dim: int, txt_dim: int, out: int, width: int, batch: int, chunk: int, device: str, bf16: bool
):
    """A zero-argument SAIL training step on random cached features, and its model."""
    from timm.optim import Lion

    from align.heads import SailTextHead, SailTokenHead
    from align.losses import LogitScale, sigmoid_loss
    from align.methods.sail import SailModel

    torch.manual_seed(0)
    common = {"kind": "sail_glu", "out_dim": out, "width_factor": width}
    image_head = SailTokenHead({**common, "in_dim": img_dim // 2, "num_prefix_tokens": 1})
    model = SailModel(image_head, SailTextHead({**common, "in_dim": txt_dim}), LogitScale()).to(device)
    opt = Lion(model.parameters(), lr=1e-5, betas=(0.9, 0.99), weight_decay=1e-4)
    image = torch.randn(batch, img_dim, device=device)
    text = torch.randn(batch, txt_dim, device=device)
    autocast = (
        torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            img, texts, scale, bias = model(image, [text])
            loss = sigmoid_loss(img, texts[0], scale, bias, chunk_size=chunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.logit.clamp_()

    return step, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast the step to bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default="runs/bench/sail_head.json")
    args = parser.parse_args()
    names = [p for p in args.presets.split(",") if p]
    unknown = [p for p in names if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; expected {list(PRESETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    def reference() -> float:
        return matmul_tflops(dtype=dtype, device=args.device, repeats=7)

    device_peak = datasheet_peak(args.device)

    rows = []
    for name in names:
        cfg = PRESETS[name]
        step, model = build_step(**cfg, device=args.device, bf16=args.bf16)
        before = reference()
        result = measure(step, repeats=args.repeats, warmup=1, device=args.device)
        matmul = max(before, reference())  # the machine's best matmul rate around this measurement
        flops = count_flops(step)
        rows.append(
            {
                "preset": name,
                **cfg,
                "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                "step_s": round(result["seconds"], 4),
                "samples_per_s": round(cfg["batch"] / result["seconds"], 1),
                **rates(flops, result["seconds"], matmul, device_peak),
                "peak_mem": fmt_bytes(result["peak_bytes"]),
            }
        )
        del model, step
    print(
        f"dense matmul reference: {dtype} on {args.device}, best of the runs just before and after each preset"
    )
    columns = ["preset", "batch", "params_m", "step_s", "samples_per_s", "achieved_tflops", "matmul_tflops"]
    columns += ["fraction_of_matmul"] + (["fraction_of_peak"] if device_peak else []) + ["peak_mem"]
    print_table(rows, columns)
    payload = {
        "benchmark": "sail_head",
        "machine": machine_info(args.device),
        "dtype": str(dtype),
        "rows": rows,
    }
    write_results(args.out, payload, columns)


if __name__ == "__main__":
    main()
