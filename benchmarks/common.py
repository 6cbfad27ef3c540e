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
    "count_flops",
    "datasheet_peak",
    "fmt_bytes",
    "machine_info",
    "markdown_table",
    "matmul_tflops",
    "measure",
    "mem_available_bytes",
    "print_table",
    "random_model",
    "rates",
    "run_isolated",
    "shrink_config",
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
    flops: bool = False,
) -> dict:
    """Run ``script.func(**kwargs)`` in a fresh interpreter and :func:`measure` what it returns.

    ``threads``: torch intra-op threads in the child (``None`` or 0: torch's default); ``flops``: also
    count one call's FLOPs (:func:`count_flops`, after the measured calls).

    ``func`` builds its inputs and returns ``(work, device)`` with ``work`` a zero-argument callable
    (the measured part). A killed or failed child gives ``{"error": ...}`` (e.g. out of memory).
    """
    payload = json.dumps(
        {"kwargs": kwargs, "repeats": repeats, "warmup": warmup, "threads": threads, "flops": flops}
    )
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
    if args.get("flops"):
        result["flops"] = count_flops(work)
    print(json.dumps(result))


def matmul_tflops(
    n: int | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu", repeats: int = 5
) -> float:
    """The machine's own dense matmul throughput (TFLOP/s) on ``n x n`` operands (default 2048 on CPU,
    8192 on a GPU), median of repeats: the reference every benchmark's rate is a fraction of."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = measure(lambda: a @ b, repeats=repeats, warmup=2, device=device)["seconds"]
    return 2 * n**3 / seconds / 1e12


def count_flops(work: Callable[[], Any]) -> int:
    """FLOPs of one ``work()`` call (forward and any backward run inside), by ``FlopCounterMode``:
    the one way benchmarks count (matmuls, convolutions, attention; elementwise work is free)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def datasheet_peak(device: str) -> tuple[str, float] | None:
    """(device name, dense bf16 datasheet FLOP/s) of a known GPU (``align.cost.DEVICES``), else None."""
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from align.cost import device_for_gpu

    found = device_for_gpu(
        torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory
    )
    return found


def rates(flops: float, seconds: float, matmul_tflops: float, peak: tuple[str, float] | None = None) -> dict:
    """Achieved TFLOP/s and its fractions of the measured matmul rate and of the datasheet peak."""
    achieved = flops / seconds
    out = {
        "tflop_per_step": round(flops / 1e12, 4),
        "achieved_tflops": round(achieved / 1e12, 4),
        "matmul_tflops": round(matmul_tflops, 4),
        "fraction_of_matmul": round(achieved / (matmul_tflops * 1e12), 3),
    }
    if peak is not None:
        out["fraction_of_peak"] = round(achieved / peak[1], 3)
    return out


def shrink_config(config: Any, divisor: int = 1, layers: int | None = None) -> Any:
    """``config`` (and its ``text_config``/``vision_config``) with widths and head counts divided by
    ``divisor`` and at most ``layers`` layers, in place: the same code paths at small shapes (dry runs).
    Token counts (image and patch sizes, vocabularies) stay."""
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "projection_dim",
    )
    for part in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if part is None:
            continue
        for key in keys:
            value = getattr(part, key, None)
            if isinstance(value, int) and divisor > 1:
                setattr(part, key, max(1, value // divisor))
        if layers and isinstance(getattr(part, "num_hidden_layers", None), int):
            part.num_hidden_layers = min(part.num_hidden_layers, layers)
            if getattr(part, "stage_names", None):  # a backbone config (DINOv2) names its last stage
                part.stage_names = ["stem"] + [f"stage{i}" for i in range(1, part.num_hidden_layers + 1)]
                part.out_features = [part.stage_names[-1]]
    return config


def random_model(
    config: Any, model_class: Any, device: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa"
):
    """``model_class`` at ``config`` with random weights, built on ``device`` (no weights read)."""
    build = getattr(model_class, "from_config", None) or model_class._from_config
    with torch.device(device):
        return build(config, dtype=dtype, attn_implementation=attn)


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


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (missing cells print as ``-``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "-")).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(path: str | os.PathLike, payload: dict, columns: Sequence[str] | None = None) -> None:
    """Write the benchmark's JSON atomically (parent directories created); with ``columns``, also
    ``payload["rows"]`` as a markdown table beside it (same name, ``.md``), headed by the machine."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from align.io import write_json

    write_json(path, payload)
    print(f"wrote {path}")
    if columns:
        machine = payload.get("machine", {})
        where = (
            machine.get("gpu")
            or f"CPU, {machine.get('torch_threads')} thread(s), load {machine.get('load_average_1m')}"
        )
        head = f"### {Path(path).stem} ({where}, torch {machine.get('torch')})\n\n"
        md = Path(path).with_suffix(".md")
        md.write_text(head + markdown_table(payload.get("rows", []), columns))
        print(f"wrote {md}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: run one benchmark variant in this process")
    parser.add_argument("--child", nargs=3, metavar=("SCRIPT", "FUNC", "JSON"), required=True)
    _child(*parser.parse_args().child)
