"""Sigmoid loss, forward + backward: chunked (blockwise gradients) vs direct vs a plain block loop vs
open_clip's ``SigLipLoss``, each as a fraction of the same machine's dense matmul rate.

    python benchmarks/bench_sigmoid_loss.py [--ns 8192,32768] [--d 256] [--chunk 1024]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--out runs/bench/sigmoid_loss.json]

Variants, each in its own fresh process (peak memory method: see ``common.py``):
- ``direct``: ``sigmoid_loss(..., chunk_size=None)``, the full ``N x N`` logits through autograd;
- ``loop``: a plain Python loop over row blocks that adds up each block's loss under autograd, so
  every block's graph (all of ``N x N``) stays alive until backward: what chunking naively gives;
- ``chunked``: ``sigmoid_loss(..., chunk_size=C)``, the custom autograd function that recomputes
  each block in backward: O(C N + N d) memory;
- ``open_clip``: ``open_clip.loss.SigLipLoss`` on the same normalized features (its direct
  ``N x N`` form; ``sum_per_image`` is the same reduction), the reference implementation.
``fraction_of_matmul``: FLOPs counted by ``FlopCounterMode`` over one call (chunked: 8 N^2 d with its
backward recompute; direct/open_clip: 6 N^2 d) per second, over the ``common.matmul_tflops`` rate
measured in the same run with the same threads and dtype: 1.0 is the matmul-bound ideal.
On CPU a variant whose peak, extrapolated (as N^2, or N for ``chunked``) from the previous size,
exceeds ``--mem-fraction`` of the available memory is skipped and reported as such.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import (
    datasheet_peak,
    fmt_bytes,
    machine_info,
    matmul_tflops,
    mem_available_bytes,
    print_table,
    rates,
    run_isolated,
    write_results,
)

VARIANTS = ("direct", "loop", "chunked", "open_clip")


def _loop_loss(img, txt, scale, bias, chunk):
    u, v = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    n = u.shape[0]
    total = 0.0
    for start in range(0, n, chunk):
        logits = scale * (u[start : start + chunk] @ v.T) + bias
        labels = -torch.ones_like(logits)
        labels.diagonal(offset=start).fill_(1.0)
        total = total - F.logsigmoid(labels * logits).sum()
    return total / (n * n)


def _inputs(n: int, d: int, device: str, dtype: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    kind = getattr(torch, dtype)
    img = torch.randn(n, d, device=device, dtype=kind, generator=gen).requires_grad_()
    txt = torch.randn(n, d, device=device, dtype=kind, generator=gen).requires_grad_()
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return img, txt, scale, bias


def variant(kind: str, n: int, d: int, chunk: int, device: str = "cpu", dtype: str = "float32"):
    """Inputs for one variant; returns the measured forward+backward call and its device."""
    from align.losses import sigmoid_loss

    if kind == "open_clip":
        from open_clip.loss import SigLipLoss
    img, txt, scale, bias = _inputs(n, d, device, dtype)

    def work() -> None:
        for t in (img, txt, scale, bias):
            t.grad = None
        if kind == "direct":
            loss = sigmoid_loss(img, txt, scale, bias)
        elif kind == "chunked":
            loss = sigmoid_loss(img, txt, scale, bias, chunk_size=chunk)
        elif kind == "open_clip":
            loss = SigLipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale, bias)
        else:
            loss = _loop_loss(img, txt, scale, bias, chunk)
        loss.backward()

    return work, device


def agreement(n: int = 2048, d: int = 64, chunk: int = 256) -> dict:
    """Relative differences between chunked and direct (loss; largest gradient entry), fp32 CPU."""
    from align.losses import sigmoid_loss

    out = {}
    results = []
    for size in (None, chunk):
        leaves = _inputs(n, d, "cpu", "float32")
        loss = sigmoid_loss(*leaves, chunk_size=size)
        results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    (l0, g0), (l1, g1) = results
    out["loss_rel_diff"] = float((l0 - l1).abs() / l0.abs())
    for name, a, b in zip(("img", "txt", "scale", "bias"), g0, g1, strict=True):
        out[f"grad_{name}_max_rel_diff"] = float((a - b).abs().max() / b.abs().max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="8192,32768", help="batch sizes, comma-separated, ascending")
    parser.add_argument("--d", type=int, default=256, help="embedding width (1024 on a GPU)")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--mem-fraction",
        type=float,
        default=0.5,
        help="CPU: skip a variant whose extrapolated peak exceeds this share of available memory (shared machines)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant (0: default)")
    parser.add_argument("--out", default="runs/bench/sigmoid_loss.json")
    args = parser.parse_args()
    ns = sorted(int(x) for x in args.ns.split(","))
    variants = [v for v in args.variants.split(",") if v]

    if args.threads:
        torch.set_num_threads(args.threads)  # the matmul reference runs with the variants' threads
    kind_dtype = getattr(torch, args.dtype)
    matmul = matmul_tflops(dtype=kind_dtype, device=args.device)
    rows, last_peak = [], {}
    for n in ns:
        for kind in variants:
            cfg = {
                "kind": kind,
                "n": n,
                "d": args.d,
                "chunk": args.chunk,
                "device": args.device,
                "dtype": args.dtype,
            }
            estimate = None
            if kind in last_peak:
                prev_n, prev_peak = last_peak[kind]
                estimate = prev_peak * (n / prev_n) ** 2 if kind != "chunked" else prev_peak * n / prev_n
            if args.device == "cpu" and estimate and estimate > args.mem_fraction * mem_available_bytes():
                result = {
                    "error": f"skipped: would need ~{fmt_bytes(estimate)} (N^2 from N={last_peak[kind][0]}), "
                    f"available {fmt_bytes(mem_available_bytes())}"
                }
            else:
                big = n >= 16384 and args.device == "cpu"
                result = run_isolated(
                    __file__,
                    "variant",
                    cfg,
                    repeats=1 if big else args.repeats,
                    warmup=0 if big else 1,
                    threads=args.threads,
                    flops=True,
                )
            if "peak_bytes" in result:
                last_peak[kind] = (n, result["peak_bytes"])
            rows.append({**cfg, **result})
            print(
                f"  N={n} {kind}: {result.get('seconds', '-')} s, {fmt_bytes(result.get('peak_bytes'))} {result.get('error', '')}",
                flush=True,
            )

    matmul = max(matmul, matmul_tflops(dtype=kind_dtype, device=args.device))  # the better of before/after
    peak = datasheet_peak(args.device)
    table = []
    for row in rows:
        base = next(
            (r for r in rows if r["n"] == row["n"] and r["kind"] == "chunked" and "seconds" in r), None
        )
        ok = "seconds" in row and base is not None
        table.append(
            {
                "N": row["n"],
                "variant": row["kind"],
                "fwd+bwd_s": f"{row['seconds']:.3f}" if "seconds" in row else "-",
                "peak_mem": fmt_bytes(row.get("peak_bytes")),
                "time/chunked": f"{row['seconds'] / base['seconds']:.2f}" if ok else "-",
                "mem/chunked": f"{row['peak_bytes'] / max(base['peak_bytes'], 1):.1f}" if ok else "-",
                **(rates(row["flops"], row["seconds"], matmul, peak) if "flops" in row else {}),
                "note": row.get("error", ""),
            }
        )
    print(f"sigmoid loss forward+backward, d={args.d}, chunk={args.chunk}, {args.device} {args.dtype}")
    columns = ["N", "variant", "fwd+bwd_s", "peak_mem", "time/chunked", "mem/chunked", "achieved_tflops"]
    columns += ["matmul_tflops", "fraction_of_matmul"] + (["fraction_of_peak"] if peak else []) + ["note"]
    print_table(table, columns)
    check = agreement()
    print("chunked vs direct (N=2048, d=64, fp32):", {k: f"{v:.1e}" for k, v in check.items()})
    write_results(
        args.out,
        {
            "benchmark": "sigmoid_loss",
            "machine": machine_info(args.device),
            "settings": vars(args),
            "raw": rows,
            "rows": table,
            "agreement": check,
        },
        columns,
    )


if __name__ == "__main__":
    main()
