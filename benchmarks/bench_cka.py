"""Linear CKA, feature-space form vs Gram-matrix form: time and peak memory (one run, ratios).

    python benchmarks/bench_cka.py [--n 20000] [--d 1024] [--out runs/bench/cka.json]

Each form runs in its own fresh process (peak memory method: see ``common.py``). Inputs are
float32 features ``[N, d]`` as an encoder would give; both forms accumulate in float64. The Gram
form needs two ``N x N`` float64 matrices (6.4 GB at N = 20,000); it is skipped, and said so, when
the machine has less memory available than that.
"""

from __future__ import annotations

import argparse

import torch
from common import fmt_bytes, machine_info, mem_available_bytes, print_table, run_isolated, write_results


def variant(method: str, n: int, d: int, seed: int = 0):
    """Inputs for one form; returns the measured call and its device."""
    from align.metrics.cka import linear_cka

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = x @ torch.randn(d, d, generator=gen) / d**0.5 + torch.randn(n, d, generator=gen)
    return (lambda: linear_cka(x, y, method=method)), "cpu"


def value(method: str, n: int, d: int) -> float:
    """The CKA itself (to show both forms agree)."""
    work, _ = variant(method, n, d)
    return work()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant (0: default)")
    parser.add_argument("--out", default="runs/bench/cka.json")
    args = parser.parse_args()

    rows = []
    for method in ("feature", "gram"):
        need = 2 * args.n * args.n * 8 if method == "gram" else 0
        if need and mem_available_bytes() < 1.2 * need:
            row = {
                "error": f"skipped: needs ~{fmt_bytes(need)}, available {fmt_bytes(mem_available_bytes())}"
            }
        else:
            row = run_isolated(
                __file__,
                "variant",
                {"method": method, "n": args.n, "d": args.d},
                repeats=args.repeats,
                threads=args.threads,
            )
        rows.append({"method": method, **row})
    feature, gram = rows
    table = [
        {
            "form": r["method"],
            "time_s": f"{r['seconds']:.2f}" if "seconds" in r else "-",
            "peak_mem": fmt_bytes(r.get("peak_bytes")),
            "note": r.get("error", ""),
        }
        for r in rows
    ]
    print(f"linear CKA, N={args.n}, d={args.d}, float32 inputs, float64 accumulation")
    print_table(table, ["form", "time_s", "peak_mem", "note"])
    ratios = {}
    if "seconds" in feature and "seconds" in gram:
        ratios = {
            "gram_over_feature_time": gram["seconds"] / feature["seconds"],
            "gram_over_feature_peak_memory": gram["peak_bytes"] / max(feature["peak_bytes"], 1),
        }
        check = {"n": min(args.n, 4000), "d": args.d}
        ratios[f"abs_difference_of_values_at_n_{check['n']}"] = abs(
            value("feature", **check) - value("gram", **check)
        )
        print(
            f"Gram / feature: time x{ratios['gram_over_feature_time']:.1f}, "
            f"peak memory x{ratios['gram_over_feature_peak_memory']:.1f}"
        )
    write_results(
        args.out,
        {
            "benchmark": "linear_cka",
            "n": args.n,
            "d": args.d,
            "machine": machine_info(),
            "rows": rows,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
