"""lmms-eval questions per second: the real ``lmms-eval`` CLI with this project's model (``mllm_swap``) on
the offline shapes tasks, tiny-llava on CPU.

    python benchmarks/bench_lmms.py [--tasks shapes_vqa] [--limits 8,40] [--batch-sizes 1,8]
        [--out runs/bench/lmms.json]

Every run is a fresh ``python -m lmms_eval`` process (imports, model load, task build, answering,
scoring). After one unmeasured run (caches), two ``--limit`` values per batch size: the start-up is the
same for both, so ``questions_per_s = (n2 - n1) / (t2 - t1)`` is the answering rate alone (``-`` when load
noise hides the difference); ``with_startup_per_s`` = ``n2 / t2``, the larger run whole (a lower bound).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, print_table, write_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_cli(model: Path, shapes: Path, task: str, limit: int, batch: int, out: Path) -> tuple[float, int]:
    """Wall seconds and the number of questions scored of one CLI run; an error names the run's log."""
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "mllm_swap", "--model_args",
           f"pretrained={model},device=cpu,batch_size={batch}", "--tasks", task, "--include_path",
           str(ROOT / "eval_configs/tasks"), "--limit", str(limit), "--batch_size", str(batch),
           "--output_path", str(out)]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(out / "hf"))
    env["MLLM_SWAP_SHAPES_DIR"] = str(shapes)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    found = glob.glob(str(out / "*" / "*_results.json"))
    if proc.returncode != 0 or "Error during evaluation" in log or not found:  # 0.7.3 may exit 0 on failure
        raise RuntimeError(f"lmms-eval (limit {limit}, batch {batch}) failed:\n{log[-3000:]}")
    counts = json.loads(Path(found[0]).read_text())["n-samples"][task]
    return seconds, int(counts["effective"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="shapes_vqa")
    parser.add_argument("--limits", default="8,40")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--out", default="runs/bench/lmms.json")
    args = parser.parse_args()
    from align.data.shapes import generate_shapes
    from mllm_swap.checkpoints import resolve_checkpoint

    small, large = sorted(int(x) for x in args.limits.split(","))
    model = resolve_checkpoint("tiny-llava")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lmms-") as tmp:
        shapes = Path(tmp) / "shapes"
        generate_shapes(shapes, n=4 * large, seed=0, progress=False)
        for task in args.tasks.split(","):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                run_cli(
                    model, shapes, task, small, batch, Path(tmp) / f"{task}-{batch}-warm"
                )  # caches, page cache
                t1, n1 = run_cli(model, shapes, task, small, batch, Path(tmp) / f"{task}-{batch}-{small}")
                t2, n2 = run_cli(model, shapes, task, large, batch, Path(tmp) / f"{task}-{batch}-{large}")
                row = {"task": task, "batch_size": batch, "questions": f"{n1} / {n2}"}
                row.update(first_run_s=round(t1, 1), second_run_s=round(t2, 1))
                row["questions_per_s"] = round((n2 - n1) / (t2 - t1), 2) if t2 > t1 and n2 > n1 else "-"
                row["with_startup_per_s"] = round(n2 / t2, 2)  # the larger run whole: a lower bound
                rows.append(row)
                print(row, flush=True)
    columns = ["task", "batch_size", "questions", "first_run_s", "second_run_s", "questions_per_s"]
    columns.append("with_startup_per_s")
    print_table(rows, columns)
    payload = {"benchmark": "lmms_eval", "machine": machine_info(), "settings": vars(args), "rows": rows}
    write_results(args.out, payload, columns)


if __name__ == "__main__":
    main()
