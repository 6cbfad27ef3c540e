"""Shared helpers for every benchmark: timing, peak memory of a variant in a fresh process, the
machine's own matmul throughput, tables and JSON output.

Benchmarks run as ``python benchmarks/<name>.py``; the script's directory is on ``sys.path``, so
they ``import common``.

How peak memory is measured. CPU: every variant runs in its own fresh Python process
(:func:`run_isolated`). After its inputs are built, the child resets the kernel's peak-RSS counter
(writes ``5`` to ``/proc/self/clear_refs``, Linux) and reads ``VmRSS``; after the measured calls it
reads ``VmHWM``. Peak = ``VmHWM - VmRSS at reset``: every byte the work touched above its inputs,
torch CPU tensors included (``tracemalloc`` misses those). Large torch buffers are mmap'ed and
returned to the OS when freed, so successive repeats do not inflate the number. CUDA: torch's
``max_memory_allocated`` above the allocation at reset.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "fmt_bytes",
    "machine_info",
    "matmul_tflops",
    "measure",
    "mem_available_bytes",
    "print_table",
    "run_isolated",
    "write_results",
]


def _proc_status(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes (0 where /proc is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_available_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` (0 if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(work: Callable[[], Any], repeats: int = 3, warmup: int = 1, device: str = "cpu") -> dict:
    """Median wall time of ``work()`` over ``repeats`` calls after ``warmup``, and its peak memory."""
    for _ in range(warmup):
        work()
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        exact = _reset_peak_rss()
        base = _proc_status("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak, method = torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated"
    else:
        peak = _proc_status("VmHWM") - base
        method = "VmHWM after clear_refs" if exact else "VmHWM since process start (reset unsupported)"
    return {
        "seconds": statistics.median(times),
        "all_seconds": times,
        "peak_bytes": peak,
        "memory_method": method,
    }


def run_isolated(
    script: str | os.PathLike,
    func: str,
    kwargs: dict,
    repeats: int = 3,
    warmup: int = 1,
    timeout: float = 1800,
    threads: int | None = None,
) -> dict:
    """Run ``script.func(**kwargs)`` in a fresh interpreter and :func:`measure` what it returns.

    ``threads``: torch intra-op threads in the child (``None`` or 0: torch's default).

    ``func`` builds its inputs and returns ``(work, device)`` with ``work`` a zero-argument callable
    (the measured part). A killed or failed child gives ``{"error": ...}`` (e.g. out of memory).
    """
    payload = json.dumps({"kwargs": kwargs, "repeats": repeats, "warmup": warmup, "threads": threads})
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(Path(script).resolve()),
        func,
        payload,
    ]
    # A fixed mmap threshold makes glibc return every large buffer to the OS on free, so the warm-up
    # call cannot leave pre-touched heap behind that would hide the measured call's peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        why = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else "failed"
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        return {"error": f"{why}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(script: str, func: str, payload: str) -> None:
    spec = importlib.util.spec_from_file_location("bench_variant", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = json.loads(payload)
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    work, device = getattr(module, func)(**args["kwargs"])
    result = measure(work, repeats=args["repeats"], warmup=args["warmup"], device=device)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


def matmul_tflops(
    n: int = 2048, dtype: torch.dtype = torch.float32, device: str = "cpu", repeats: int = 5
) -> float:
    """The machine's own dense matmul throughput (TFLOP/s) on ``n x n`` operands, median of repeats."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = measure(lambda: a @ b, repeats=repeats, warmup=1, device=device)["seconds"]
    return 2 * n**3 / seconds / 1e12


def machine_info(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "mem_available_gb": round(mem_available_bytes() / 2**30, 1),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def fmt_bytes(n: float | None) -> str:
    """``1.5 GB`` style."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Left-aligned plain-text table of ``rows`` (missing cells print as ``-``)."""
    cells = [[str(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*columns))
    for row in cells:
        print(fmt.format(*row))


def write_results(path: str | os.PathLike, payload: dict) -> None:
    """Write the benchmark's JSON atomically (parent directories created)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from align.io import write_json

    write_json(path, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: run one benchmark variant in this process")
    parser.add_argument("--child", nargs=3, metavar=("SCRIPT", "FUNC", "JSON"), required=True)
    _child(*parser.parse_args().child)
