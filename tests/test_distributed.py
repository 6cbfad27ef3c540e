"""Real launches: two CPU processes (gloo) against one, and the shipped DeepSpeed configs as shipped.

Every launch goes through ``accelerate launch`` in a subprocess, as a user runs it. Two processes at
batch B each must give the weights one process gives at batch 2B (accelerate hands rank r the
batches r, r+2, ... of the same order, and the contrastive losses gather features), one
``metrics.jsonl`` row per step, and caches where each process encoded its own shards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.io import read_json, read_jsonl
from mllm_swap.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

pytestmark = pytest.mark.slow


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    args: list[str],
    *,
    processes: int = 2,
    config_file: Path | None = None,
    program: tuple[str, ...] = ("-m", "mllm_swap"),
) -> str:
    """``accelerate launch [...] -m mllm_swap ARGS`` (or another ``program``) on CPU; returns stdout, fails
    with the log tail."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is None:  # DDP over gloo: the working multi-process CPU form (`--cpu` runs one process)
        env["ACCELERATE_USE_CPU"] = "true"
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        env.pop("ACCELERATE_USE_CPU", None)
        cmd += ["--config_file", str(config_file)]
    cmd += ["--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(free_port())]
    proc = subprocess.run(
        [*cmd, *program, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def start_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("train start:")]
    assert len(lines) == 1, stdout[-2000:]  # printed once, by the main process
    return lines[0]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


# The tiny recipes name the pretrained tiny-dinov2 (a build of minutes); these runs take the random tower.
RANDOM_TOWER = {"sail": "vision=tiny-dinov2-random", "freeze_align": "vision=tiny-dinov2-random",
                "kuea": "target=tiny-dinov2-random"}  # fmt: skip


def two_against_one(
    method: str, recipe: str, shapes_dir: Path, tmp_path: Path, *extra: str
) -> tuple[Path, Path, str]:
    """``align METHOD`` with in-run caches: 2 processes at batch 16 and 1 process at batch 32."""
    common = sets(
        RANDOM_TOWER[method],
        f"data.train={shapes_dir}",
        "train.steps=4",  # 77 train pairs, 32 a step: the run crosses an epoch boundary
        "train.log_every=1",
        "train.save_every=0",
        "train.report_to=[jsonl]",
        "eval.limit=8",
        *extra,
    )
    recipe = str(RECIPES / recipe)
    two, one = tmp_path / "two", tmp_path / "one"
    stdout = launch(
        ["align", method, "--config", recipe, *common, *sets("train.batch_size=16"), "--out", str(two)]
    )
    assert (
        main(["align", method, "--config", recipe, *common, *sets("train.batch_size=32"), "--out", str(one)])
        == 0
    )
    return two, one, stdout


def check_two_process_run(
    two: Path, one: Path, stdout: str, caches: tuple[str, ...] = ("image", "text")
) -> None:
    line = start_line(stdout)
    assert "world size 2 (MULTI_CPU), batch 16 per process x 1 accumulation = 32 global" in line, line
    assert "mixed precision no, DeepSpeed none, from step 0" in line, line
    launched = read_json(two / "result.json")["launch"]
    assert (launched["world_size"], launched["global_batch"]) == (2, 32)
    assert launched["engine"] == "DistributedDataParallel" and launched["zero_stage"] is None
    # one row per step, written by one process; the same logged losses as the one-process run
    rows, single = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row, ref in zip(rows, single, strict=True):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    # each process encoded its own shards of the in-run caches (one shard each here: process 1 none)
    for cache in caches:
        found = re.findall(rf"encode {cache} \S+: process (\d) of 2 encodes shards \[(\d*)\]", stdout)
        assert sorted(found) == [("0", "0"), ("1", "")], stdout[-2000:]


def test_sail_two_processes_equal_one_process(shapes_dir: Path, tmp_path: Path) -> None:
    """SAIL: sigmoid loss over the gathered batch, Lion.

    Tolerance 1e-6 absolute on the weights: both runs see the same 32 pairs per step and the same
    gathered loss, but the two-process gradient is a sum of two partial gradients averaged by
    DDP's all-reduce, so it can differ from the one-process gradient in the last float bits; Lion
    steps by the gradient's sign, so that rounding reaches the weights only as a rare flipped sign.
    """
    two, one, stdout = two_against_one("sail", "tiny_sail.yaml", shapes_dir, tmp_path)
    check_two_process_run(two, one, stdout)
    weights = [load_file(run / "artifact" / "model.safetensors") for run in (two, one)]
    assert_same_tensors(*weights, atol=1e-6)


def test_projector_two_processes_equal_one_process(shapes_dir: Path, tmp_path: Path) -> None:
    """freeze-align: InfoNCE over the gathered batch, AdamW, gradient clipping at 1.0.

    Dropout off (each process draws its own masks, so with dropout the runs differ by design).
    Clipping scales by the global gradient norm, which is only right when the gathered features'
    gradient is the one-process gradient, not half of it. Tolerance 1e-5 absolute: AdamW divides
    by the root of a second moment, which magnifies the float rounding of the all-reduce (see the
    SAIL test) more than Lion's sign.
    """
    two, one, stdout = two_against_one(
        "freeze_align", "tiny_freeze_align.yaml", shapes_dir, tmp_path, "head.dropout=0.0"
    )
    check_two_process_run(two, one, stdout)
    rows, single = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in single], rel=1e-4)
    weights = [load_file(run / "artifact" / "model.safetensors") for run in (two, one)]
    assert_same_tensors(*weights, atol=1e-5)


def test_kernel_two_processes_equal_one_process(shapes_dir: Path, tmp_path: Path) -> None:
    """KUEA: the kernel term pairs every sample of the global batch (gathered), AdamW.

    Tolerance 1e-5 absolute, as for freeze-align (AdamW, all-reduce rounding).
    """
    two, one, stdout = two_against_one("kuea", "tiny_kuea.yaml", shapes_dir, tmp_path, "student=tiny-clip")
    check_two_process_run(two, one, stdout, caches=("image",))
    weights = [load_file(run / "artifact" / "model.safetensors") for run in (two, one)]
    assert_same_tensors(*weights, atol=1e-5)


def test_encode_two_processes_split_the_shards(shapes_dir: Path, tmp_path: Path) -> None:
    """``encode`` under 2 processes: rank r encodes shards r, r+2, ...; the cache equals one process's."""
    args = ["encode", "--encoder", "tiny-dinov2-random", "--data", str(shapes_dir), "--shard-size", "20"]
    args += ["--dtype", "fp32"]
    stdout = launch([*args, "--out", str(tmp_path / "two")])
    found = dict(re.findall(r"encode image two: process (\d) of 2 encodes shards (\[[\d, ]*\])", stdout))
    assert found == {"0": "[0, 2, 4]", "1": "[1, 3]"}, stdout[-2000:]
    assert stdout.count("rows x") == 1  # the summary comes from one process
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    manifests = [read_json(tmp_path / run / "manifest.json") for run in ("two", "one")]
    assert [m["shards"] for m in manifests][0] == manifests[1]["shards"]  # same rows, ids and sha256
    for k in range(5):
        shard = f"shard-{k:05d}.safetensors"
        assert_same_tensors(*(load_file(tmp_path / run / shard) for run in ("two", "one")), atol=0)


def test_tune_two_processes_equal_one_process(shapes_dir: Path, tmp_path: Path) -> None:
    """``tune`` (LoRA, length-grouped batches): 2 processes at batch 2 each against 1 at batch 4.

    Batches are grouped by length over the global batch, so the same samples meet in a step.
    The two halves of a global batch hold different numbers of answer tokens, so averaging each
    process's own token mean would weigh the tokens differently from one process's mean; the loss
    divides by the global token count instead. Tolerance 1e-5 absolute on the adapter, as for the
    AdamW align runs (the all-reduce's float rounding, magnified by AdamW's normalisation).
    """
    common = ["--config", str(RECIPES / "tiny_llava_lora.yaml")]
    common += sets(
        f"data={shapes_dir / 'instruct.json'}",
        f"image_folder={shapes_dir}",
        "eval_vqa=null",
        "lora_r=4",
        "train.steps=3",
        "train.seed=2",  # an order where grouping by 2 or by 4 samples puts other samples in a global batch
        "train.save_every=0",
        "train.log_every=1",
        "train.report_to=[jsonl]",
    )
    two, one = tmp_path / "two", tmp_path / "one"
    stdout = launch(["tune", *common, *sets("train.batch_size=2"), "--out", str(two)])
    assert main(["tune", *common, *sets("train.batch_size=4"), "--out", str(one)]) == 0
    line = start_line(stdout)
    assert "world size 2 (MULTI_CPU), batch 2 per process x 1 accumulation = 4 global" in line, line
    rows, single = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row, ref in zip(rows, single, strict=True):
        assert (row["tokens"], row["label_tokens"]) == (ref["tokens"], ref["label_tokens"])
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    seen = [read_json(run / "tune_info.json")["tokens_seen"] for run in (two, one)]
    assert seen[0] == seen[1] == sum(r["tokens"] for r in single)
    weights = [load_file(run / "adapter_model.safetensors") for run in (two, one)]
    assert_same_tensors(*weights, atol=1e-5)


def test_lmms_plugin_sees_the_launch(tmp_path: Path) -> None:
    """lmms-eval's data parallelism: under 2 CPU processes each plugin instance knows its rank of 2."""
    from mllm_swap.fixtures import ensure_tiny_mllm

    script = tmp_path / "plugin.py"
    script.write_text(
        "import json, os, sys\n"
        "from mllm_swap.lmms.model import MllmSwap\n"
        "m = MllmSwap(pretrained=sys.argv[1])\n"
        "seen = [m.rank, m.world_size, str(m.device)]\n"
        "open(os.path.join(sys.argv[2], f'{os.getpid()}.json'), 'w').write(json.dumps(seen))\n"
    )
    (tmp_path / "seen").mkdir()
    launch([str(ensure_tiny_mllm("tiny-llava")), str(tmp_path / "seen")], program=(str(script),))
    seen = sorted(read_json(path) for path in (tmp_path / "seen").iterdir())
    assert seen == [[0, 2, "cpu"], [1, 2, "cpu"]]


def deepspeed_run_checks(out: Path, stdout: str, stage: int) -> None:
    """The run went through a real DeepSpeed engine at ``stage``, as its start line and record say."""
    line = start_line(stdout)
    assert "world size 1 (DEEPSPEED)" in line and f"DeepSpeed ZeRO-{stage} (DeepSpeedEngine)" in line, line
    launched = read_json(out / "result.json")["launch"]
    assert (launched["engine"], launched["zero_stage"]) == ("DeepSpeedEngine", stage)


def kuea_args(shapes_dir: Path) -> list[str]:
    """The tiny KUEA recipe for a short DeepSpeed run: tiny-clip student (tiny-clip-shapes needs a minute
    of pretraining on first use), 3 steps, a metrics row per step."""
    args = ["align", "kuea", "--config", str(RECIPES / "tiny_kuea.yaml")]
    return args + sets(
        "student=tiny-clip",
        RANDOM_TOWER["kuea"],
        f"data.train={shapes_dir}",
        "train.steps=3",
        "train.log_every=1",
        "train.report_to=[jsonl]",
        "eval.limit=8",
    )


def test_kernel_under_shipped_zero2(shapes_dir: Path, tmp_path: Path) -> None:
    """README's KUEA command with the shipped ZeRO-2 files as shipped ("auto" sizes and all), on CPU."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "kuea"
    args = [*kuea_args(shapes_dir), *sets("train.batch_size=8", "train.save_every=2"), "--out", str(out)]
    stdout = launch(args, processes=1, config_file=RECIPES / "accelerate" / "deepspeed_zero2.yaml")
    deepspeed_run_checks(out, stdout, stage=2)
    assert (out / "checkpoints" / "step-2" / "pytorch_model").is_dir()  # DeepSpeed's checkpoint layout
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "artifact" / "aligned_encoder.json").is_file()


def test_kernel_under_shipped_zero2_two_processes(shapes_dir: Path, tmp_path: Path) -> None:
    """DeepSpeed ZeRO-2 (shipped files) with 2 CPU processes: one run of 2 processes (gloo), not two
    runs of one, equal to a plain process at the same global batch (tolerance 1e-5 as for KUEA's DDP test).
    """
    pytest.importorskip("deepspeed")
    args = [*kuea_args(shapes_dir), *sets("train.save_every=0")]
    two, one = tmp_path / "two", tmp_path / "one"
    stdout = launch(
        [*args, *sets("train.batch_size=8"), "--out", str(two)],
        config_file=RECIPES / "accelerate" / "deepspeed_zero2.yaml",
    )
    line = start_line(stdout)
    assert "world size 2 (DEEPSPEED), batch 8 per process x 1 accumulation = 16 global" in line, line
    assert "DeepSpeed ZeRO-2 (DeepSpeedEngine)" in line, line
    assert main([*args, *sets("train.batch_size=16"), "--out", str(one)]) == 0
    assert [r["step"] for r in read_jsonl(two / "metrics.jsonl")] == [1, 2, 3]
    weights = [load_file(run / "artifact" / "model.safetensors") for run in (two, one)]
    assert_same_tensors(*weights, atol=1e-5)


def test_tune_under_shipped_zero2(shapes_dir: Path, tmp_path: Path) -> None:
    """``tune`` (LoRA) under the shipped ZeRO-2 accelerate config on CPU: a DeepSpeed engine trains."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "tune"
    args = ["tune", "--config", str(RECIPES / "tiny_llava_lora.yaml"), "--out", str(out)]
    args += sets(
        f"data={shapes_dir / 'instruct.json'}",
        f"image_folder={shapes_dir}",
        "eval_vqa=null",
        "lora_r=4",
        "train.steps=2",
        "train.batch_size=4",
        "train.save_every=0",
        "train.log_every=1",
        "train.report_to=[jsonl]",
    )
    stdout = launch(args, processes=1, config_file=RECIPES / "accelerate" / "deepspeed_zero2.yaml")
    deepspeed_run_checks(out, stdout, stage=2)
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("method", "recipe", "extra"),
    [
        ("sail", "tiny_sail.yaml", ()),
        ("freeze_align", "tiny_freeze_align.yaml", ("head.dropout=0.0",)),
        ("kuea", "tiny_kuea.yaml", ("student=tiny-clip",)),
    ],
)
def test_align_under_shipped_zero3(
    method: str, recipe: str, extra: tuple[str, ...], shapes_dir: Path, tmp_path: Path
) -> None:
    """``align METHOD`` under the shipped ZeRO-3 files as shipped, on CPU: the parameters are partitioned,
    yet evaluation and the artifact see them whole (and KUEA's frozen copy of its student is whole).

    The artifact equals a plain one-process run's within 1e-5 absolute (the same steps; DeepSpeed's
    flat fp32 partitions round differently) but for at most 0.1% of the elements, one flipped gradient
    sign apart; it loads and embeds images and texts to finite, distinct vectors.
    """
    pytest.importorskip("deepspeed")
    from PIL import Image

    from align.artifact import load_aligned

    args = ["align", method, "--config", str(RECIPES / recipe)]
    args += sets(
        RANDOM_TOWER[method],
        f"data.train={shapes_dir}",
        "train.steps=2",
        "train.batch_size=8",
        "train.save_every=0",
        "train.log_every=1",
        "train.report_to=[jsonl]",
        "eval.limit=8",
        *extra,
    )
    out, plain = tmp_path / "zero3", tmp_path / "plain"
    stdout = launch(
        [*args, "--out", str(out)], processes=1, config_file=RECIPES / "accelerate" / "deepspeed_zero3.yaml"
    )
    deepspeed_run_checks(out, stdout, stage=3)
    assert main([*args, "--out", str(plain)]) == 0
    zero3, ref = (load_file(run / "artifact" / "model.safetensors") for run in (out, plain))
    # Lion, and AdamW in its first steps, move an element by about lr times its gradient's sign: where a
    # gradient is near zero, rounding can flip it and move that element by up to 2*lr a step.
    lr = yaml.safe_load((plain / "config.yaml").read_text())["train"]["lr"]
    assert_same_tensors(zero3, ref, atol=2 * lr * 2)
    moved = sum(int(((zero3[k] - ref[k]).abs() > 1e-5).sum()) for k in ref)
    assert moved <= 1e-3 * sum(t.numel() for t in ref.values())  # rare flips only
    encoder = load_aligned(out / "artifact")
    images = [Image.open(path).convert("RGB") for path in sorted((shapes_dir / "images").iterdir())[:4]]
    image_emb = encoder.encode_images(images)
    text_emb = encoder.encode_text(["a red circle", "a blue square"])
    for emb in (image_emb, text_emb):
        assert torch.isfinite(emb).all() and emb.norm(dim=-1).min() > 0.5
        assert (emb[0] - emb[1]).abs().max() > 1e-4  # distinct inputs, distinct embeddings


def test_first_use_build_runs_outside_the_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``build_once`` inside a (DeepSpeed) launch: local rank 0 builds as a plain process, others wait."""
    import threading

    from accelerate.state import PartialState

    from align.embedded import build_once

    monkeypatch.setenv("MLLM_SWAP_HOME", str(tmp_path))
    launch_env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "ACCELERATE_USE_DEEPSPEED": "true"}
    for key, value in launch_env.items():
        monkeypatch.setenv(key, value)
    seen: dict = {}

    def builder(out: Path) -> None:  # what a training builder (tiny-clip-shapes) would run under
        from accelerate import Accelerator

        seen["env"] = {k: os.environ.get(k) for k in launch_env}
        accelerator = Accelerator(cpu=True)
        seen["state"] = (accelerator.num_processes, accelerator.state.deepspeed_plugin is None)
        out.mkdir(exist_ok=True)
        (out / "weights.json").write_text(json.dumps([1, 2]))

    PartialState._shared_state.setdefault("sentinel", "the run's state")
    try:
        # local rank 1 waits for local rank 0's build (it never builds itself)
        waiter: dict = {}
        monkeypatch.setattr(
            "align.distributed.local_rank",
            lambda: 0 if threading.current_thread() is threading.main_thread() else 1,
        )
        thread = threading.Thread(target=lambda: waiter.update(path=build_once("x", lambda out: None)))
        thread.start()
        target = build_once("x", builder)
        thread.join(timeout=30)
    finally:
        run_state = PartialState._shared_state.pop("sentinel", None)
    assert seen["env"] == dict.fromkeys(launch_env)  # no launcher variables inside the build
    assert seen["state"] == (1, True)  # one process, no DeepSpeed
    assert run_state == "the run's state" and os.environ["ACCELERATE_USE_DEEPSPEED"] == "true"  # put back
    assert waiter["path"] == target and json.loads((target / "weights.json").read_text()) == [1, 2]


def test_concurrent_first_use_builds_once(tmp_path: Path) -> None:
    """Two processes asking for one unbuilt model at once (two terminals, two test workers): one builds, the
    other waits for it under the build lock and gets the same directory, never a second build over the first."""
    code = """
import json, os, sys, time
from pathlib import Path
from align.embedded import build_once
def builder(out):
    with open(os.environ["CALLS"], "a") as calls:
        calls.write(sys.argv[1] + "\\n")
    time.sleep(2.0)
    out.mkdir(exist_ok=True)
    (out / "weights.json").write_text(json.dumps(sys.argv[1]))
print(build_once("slow-model", builder))
"""
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "MLLM_SWAP_HOME": str(tmp_path / "home"), "CALLS": str(calls)}
    runs = [
        subprocess.Popen([sys.executable, "-c", code, name], env=env, stdout=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    outputs = [run.communicate(timeout=120)[0].strip() for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert calls.read_text().splitlines() in (["a"], ["b"])  # built once
    assert outputs[0] == outputs[1] == str(tmp_path / "home" / "models" / "slow-model")
    built = json.loads((Path(outputs[0]) / "weights.json").read_text())
    assert built == calls.read_text().strip()
