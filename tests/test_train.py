"""The shared training loop: outputs, exact resume, atomic checkpoints, failures, optimizers, schedules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from align.io import read_json, read_jsonl
from align.recipes import load_config
from align.train.batches import epoch_seed
from align.train.checkpoints import list_checkpoints
from align.train.config import TrainConfig
from align.train.guard import NonFiniteLossError
from align.train.loop import train
from align.train.optim import check_param_groups, default_param_groups, lr_multiplier

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class Regression:
    """A toy method: y = x w + noise, fitted by a linear model or a small MLP with dropout."""

    def __init__(self, n=64, d=4, hidden=0, dropout=0.0, kill_at=None, nan_at=None):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, d, generator=g)
        self.y = self.x @ torch.randn(d, 1, generator=g) + 0.05 * torch.randn(n, 1, generator=g)
        self.hidden, self.dropout = hidden, dropout
        self.kill_at, self.nan_at = kill_at, nan_at
        self.calls = 0

    def build_model(self, cfg):
        d = self.x.shape[1]
        if not self.hidden:
            return nn.Linear(d, 1)
        return nn.Sequential(
            nn.Linear(d, self.hidden), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(self.hidden, 1)
        )

    def train_dataset(self):
        return TensorDataset(self.x, self.y)

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt  # a simulated kill in the middle of a run
        x, y = batch
        err = model(x) - y
        loss = (err**2).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"abs_err": err.abs().mean().detach()}

    def evaluate(self, model):
        return {"mse": float(((model(self.x) - self.y) ** 2).mean())}

    def save(self, model, out_dir, state_dict):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out_dir / "model.safetensors"))


class LoaderRegression(Regression):
    """The same toy, giving its own per-epoch DataLoader and recording the seeds it was asked for."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seeds = []

    def dataloader(self, batch_size, seed):
        self.seeds.append(seed)
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(
            self.train_dataset(), batch_size=batch_size, shuffle=True, generator=gen, drop_last=True
        )


def tcfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=8, lr=0.05, warmup=2, save_every=4, log_every=2, report_to=["jsonl"])
    base.update(kw)
    return TrainConfig(**base)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=atol, rtol=0), key


# A run that crosses epoch boundaries, accumulates gradients, uses dropout, warmup and cosine.
RESUME_CFG = dict(steps=13, grad_accum=2, save_every=3, warmup=0.2, log_every=2)
MLP = dict(hidden=16, dropout=0.2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the resume scenario."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(Regression(**MLP), tcfg(**RESUME_CFG), out)
    return out


def killed_run(out: Path) -> None:
    # Micro-batch 17 is the first of step 9; the newest checkpoints are step-3 and step-6.
    with pytest.raises(KeyboardInterrupt):
        train(Regression(**MLP, kill_at=17), tcfg(**RESUME_CFG), out)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3, 6]
    assert not (out / "result.json").exists()


def test_outputs_and_loss_decreases(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tcfg(steps=40, lr=0.1, log_every=5, report_to=["jsonl", "tensorboard"])
    result = train(Regression(), cfg, out)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert rows[-1]["loss"] < 0.2 * rows[0]["loss"]
    assert {"loss", "lr", "abs_err", "samples_per_s", "epoch"} <= rows[0].keys()
    assert load_config(TrainConfig, out / "config.yaml") == cfg
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(out.glob("tensorboard/**/events.out.tfevents*"))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [32, 36]  # keep_checkpoints=2
    assert result.steps == 40 and result.final_loss == rows[-1]["loss"]
    # The final evaluation equals the MSE recomputed by hand from the saved weights.
    w = weights(out)
    m = Regression()
    mse = float(((m.x @ w["weight"].T + w["bias"] - m.y) ** 2).mean())
    assert result.eval["mse"] == pytest.approx(mse, rel=1e-5)
    saved = read_json(out / "result.json")
    assert saved["steps"] == 40 and saved["eval"]["mse"] == pytest.approx(mse, rel=1e-5)


def test_resume_after_kill_equals_uninterrupted(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "run"
    killed_run(out)
    resumed = train(Regression(**MLP), tcfg(**RESUME_CFG), out)
    assert resumed.resumed_from == out / "checkpoints" / "step-6"
    assert resumed.steps == 13
    assert_same_weights(reference, out)
    # The metrics file holds one row per log step, as if the run had never stopped.
    ref_rows, rows = read_jsonl(reference / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12, 13]
    for a, b in zip(ref_rows, rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["lr"] == pytest.approx(b["lr"])


def test_resume_inside_a_log_window_writes_the_same_metrics(tmp_path: Path) -> None:
    """The newest checkpoint (step 6) falls inside a log window (log_every=4: rows at 4, 8, 12, 13), so
    the row at step 8 averages steps 5-6 from before the kill with 7-8 after it: metrics.jsonl must be
    the uninterrupted run's, row for row and key for key (timing aside)."""
    cfg = tcfg(**{**RESUME_CFG, "log_every": 4})
    ref = tmp_path / "reference"
    train(Regression(**MLP), cfg, ref)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(Regression(**MLP, kill_at=17), cfg, out)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3, 6]
    assert train(Regression(**MLP), cfg, out).resumed_from == out / "checkpoints" / "step-6"
    ref_rows, rows = read_jsonl(ref / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [4, 8, 12, 13]
    for a, b in zip(ref_rows, rows, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"samples_per_s"}:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-12), (a["step"], key)


def test_half_written_checkpoints_are_ignored(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "run"
    killed_run(out)
    ckpts = out / "checkpoints"
    # A save killed before its rename, and a step directory without its trainer state.
    shutil.copytree(ckpts / "step-6", ckpts / ".tmp-step-9")
    (ckpts / "step-12").mkdir()
    shutil.copy(ckpts / "step-6" / "model.safetensors", ckpts / "step-12" / "model.safetensors")
    assert [s for s, _ in list_checkpoints(ckpts)] == [3, 6]
    resumed = train(Regression(**MLP), tcfg(**RESUME_CFG), out)
    assert resumed.resumed_from == ckpts / "step-6"
    assert_same_weights(reference, out)
    assert not list(ckpts.glob(".tmp-*"))
    assert (ckpts / "step-12" / "trainer_state.json").is_file()  # re-saved for real


def test_resume_from_an_explicit_checkpoint(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "run"
    killed_run(out)
    resumed = train(Regression(**MLP), tcfg(**RESUME_CFG), out, resume=str(out / "checkpoints" / "step-3"))
    assert resumed.resumed_from == out / "checkpoints" / "step-3"
    assert_same_weights(reference, out)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        train(Regression(), tcfg(), tmp_path / "other", resume=str(tmp_path / "nowhere"))


def test_resume_false_starts_over(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "run"
    killed_run(out)
    again = train(Regression(**MLP), tcfg(**RESUME_CFG), out, resume=False)
    assert again.resumed_from is None
    assert_same_weights(reference, out)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [2, 4, 6, 8, 10, 12, 13]


def test_finished_run_is_not_trained_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(Regression(), tcfg(steps=4), out)
    for resume in ("auto", False, str(out)):
        with pytest.raises(FileExistsError, match="holds a finished run"):
            train(Regression(), tcfg(steps=8), out, resume=resume)
    redo = train(Regression(), tcfg(steps=6), out, overwrite=True)
    assert redo.steps == 6 and redo.resumed_from is None
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [2, 4, 6]


def test_training_inside_no_grad_still_learns(tmp_path: Path, reference: Path) -> None:
    # e.g. a tiny model built on first use from inside an embedding cache's no-grad loop
    with torch.no_grad():
        train(Regression(**MLP), tcfg(**RESUME_CFG), tmp_path / "run")
    assert_same_weights(tmp_path / "run", reference)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tcfg(steps=12, save_every=3)
    with pytest.raises(NonFiniteLossError) as err:
        train(Regression(nan_at=8), cfg, out)
    message = str(err.value)
    assert "non-finite loss" in message and "at step 8 " in message
    assert str(out / "checkpoints" / "step-6") in message
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3, 6]
    assert not (out / "result.json").exists()
    # The kept checkpoint is good: a healthy method resumes from it and finishes.
    result = train(Regression(), cfg, out)
    assert result.resumed_from == out / "checkpoints" / "step-6" and result.steps == 12
    assert all(torch.isfinite(t).all() for t in weights(out).values())


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path: Path) -> None:
    small = train(Regression(), tcfg(steps=10, batch_size=4, grad_accum=4), tmp_path / "accum")
    big = train(Regression(), tcfg(steps=10, batch_size=16, grad_accum=1), tmp_path / "big")
    assert small.steps == big.steps == 10
    assert_same_weights(tmp_path / "accum", tmp_path / "big", atol=1e-6)


def test_lion_step_follows_its_update_rule(tmp_path: Path) -> None:
    # One full-batch step: Lion's first update is -lr * (sign(grad) + wd * w) (m starts at 0).
    lr, wd = 0.01, 0.1
    cfg = tcfg(
        steps=1, batch_size=16, optimizer="lion", lr=lr, weight_decay=wd, warmup=0, schedule="constant"
    )
    cfg.grad_clip, cfg.betas = None, (0.9, 0.99)
    method = Regression(n=16)
    train(method, cfg, tmp_path / "run")
    set_seed(cfg.seed)
    ref = nn.Linear(4, 1)  # the same initialisation as the loop's seeded build_model
    ((ref(method.x) - method.y) ** 2).mean().backward()
    expect_w = ref.weight.detach() * (1 - lr * wd) - lr * ref.weight.grad.sign()
    expect_b = ref.bias.detach() - lr * ref.bias.grad.sign()  # bias: no weight decay
    got = weights(tmp_path / "run")
    assert torch.allclose(got["weight"], expect_w, atol=1e-7)
    assert torch.allclose(got["bias"], expect_b, atol=1e-7)
    # And it trains: a longer Lion run more than halves the full-data error of the initial model.
    initial = float(((ref(method.x) - method.y) ** 2).mean().detach())
    result = train(method, tcfg(steps=40, batch_size=8, optimizer="lion", lr=0.05), tmp_path / "long")
    assert result.eval["mse"] < 0.5 * initial


def test_epochs_set_the_number_of_steps(tmp_path: Path) -> None:
    # 64 samples / batch 8 = 8 micro-batches per epoch; 1.5 epochs = 12 micro-batches = 6 steps of 2.
    result = train(Regression(), tcfg(steps=None, epochs=1.5, grad_accum=2), tmp_path / "run")
    assert result.steps == 6


def test_method_dataloader_gets_a_seed_per_epoch_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = tcfg(steps=20, save_every=5)  # 8 batches per epoch: epochs 0, 1, 2
    full = LoaderRegression()
    train(full, cfg, tmp_path / "full")
    assert full.seeds == [epoch_seed(cfg.seed, e) for e in range(3)]
    assert len(set(full.seeds)) == 3
    with pytest.raises(KeyboardInterrupt):
        train(LoaderRegression(kill_at=14), cfg, tmp_path / "cut")
    part = LoaderRegression()
    result = train(part, cfg, tmp_path / "cut")
    assert result.resumed_from.name == "step-10"
    assert part.seeds == full.seeds[1:]  # resumed inside epoch 1
    assert_same_weights(tmp_path / "full", tmp_path / "cut")


def test_logged_lr_follows_transformers_schedule(tmp_path: Path) -> None:
    cfg = tcfg(steps=12, warmup=3, log_every=1, lr=0.2)
    train(Regression(), cfg, tmp_path / "run")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=12)
    expected = []
    for _ in range(12):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [r["lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("schedule", "min_ratio", "hf"),
    [
        ("cosine", 0.0, lambda o: transformers.get_cosine_schedule_with_warmup(o, 5, 40)),
        ("linear", 0.0, lambda o: transformers.get_linear_schedule_with_warmup(o, 5, 40)),
        ("constant", 0.0, lambda o: transformers.get_constant_schedule_with_warmup(o, 5)),
        (
            "cosine",
            0.1,
            lambda o: transformers.optimization.get_cosine_with_min_lr_schedule_with_warmup(
                o, 5, 40, min_lr_rate=0.1
            ),
        ),
    ],
)
def test_schedules_match_transformers(schedule, min_ratio, hf) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = hf(opt)
    for step in range(40):
        assert lr_multiplier(step, 40, 5, schedule, min_ratio) == pytest.approx(
            opt.param_groups[0]["lr"], abs=1e-12
        )
        opt.step()
        sched.step()


class ChannelNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, dim))  # 2-D, but a norm's scale

    def forward(self, x):
        return x * self.weight


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.cnorm = ChannelNorm(8)
        self.proj = nn.Linear(8, 4, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.coef0 = nn.Parameter(torch.ones(2, 2))  # kernel parameter, named in the no-decay list
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_default_param_groups_split_decay_from_no_decay() -> None:
    model = Tower()
    groups = default_param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by_decay == {
        0.05: ["emb.weight", "lin.weight", "proj.weight"],
        0.0: ["cnorm.weight", "coef0", "lin.bias", "logit_scale", "norm.bias", "norm.weight"],
    }


def test_param_groups_are_checked(tmp_path: Path) -> None:
    model = Tower()
    trainable = [p for p in model.parameters() if p.requires_grad]
    without_proj = [p for p in trainable if p is not model.proj.weight]
    with pytest.raises(ValueError, match="missing from every group: \\['proj.weight'\\]"):
        check_param_groups([{"params": without_proj}], model)
    with pytest.raises(ValueError, match="appears in more than one group"):
        check_param_groups([{"params": trainable}, {"params": trainable[:1]}], model)
    with pytest.raises(ValueError, match="'frozen.weight' is frozen"):
        check_param_groups([{"params": [*trainable, model.frozen.weight]}], model)

    class Forgetful(Regression):
        def param_groups(self, model, cfg):
            return [{"params": [model.weight]}]

    with pytest.raises(ValueError, match="missing from every group: \\['bias'\\]"):
        train(Forgetful(), tcfg(), tmp_path / "run")


def test_per_group_learning_rates_follow_the_schedule(tmp_path: Path) -> None:
    class TwoRates(Regression):
        def param_groups(self, model, cfg):
            return [
                {"params": [model.weight]},
                {"params": [model.bias], "lr": 10 * cfg.lr, "weight_decay": 0.0},
            ]

        def after_step(self, model):
            self.seen = [g for g in model.parameters()]

    method = TwoRates()
    cfg = tcfg(steps=6, warmup=2, log_every=1)
    train(method, cfg, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step-4" / "optimizer.bin", weights_only=True)
    lrs = [g["lr"] for g in ckpt["param_groups"]]
    factor = lr_multiplier(4, 6, 2, "cosine")
    assert lrs == pytest.approx([cfg.lr * factor, 10 * cfg.lr * factor])
    assert len(method.seen) == 2  # after_step got the unwrapped model


class DtypeSpy(Regression):
    """Records the dtype of the first layer's output in every training forward (a forward hook)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.dtypes: list[torch.dtype] = []

    def build_model(self, cfg):
        model = super().build_model(cfg)
        model[0].register_forward_hook(
            lambda module, args, out: self.dtypes.append(out.dtype) if module.training else None
        )
        return model


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_mixed_precision_really_computes_in_its_dtype(
    tmp_path: Path, precision: str, dtype: torch.dtype
) -> None:
    spy = DtypeSpy(hidden=8)
    result = train(spy, tcfg(steps=4, mixed_precision=precision, save_every=2), tmp_path / "run")
    assert result.steps == 4 and result.final_loss is not None and result.final_loss == result.final_loss
    # 4 training steps, then one forward pass that checks the final weights before they are saved
    assert spy.calls == 5 and spy.dtypes[:4] == [dtype] * 4 and set(spy.dtypes) == {dtype}
    assert weights(tmp_path / "run")["0.weight"].dtype == torch.float32  # master weights stay fp32


JOB = """
import sys
sys.path.insert(0, {tests!r})
from test_train import Regression, tcfg, RESUME_CFG
from align.train.loop import train
out = sys.argv[1]
try:  # killed at the first micro-batch of step 5 (each process sees 2 per step)
    train(Regression(kill_at=9), tcfg(**RESUME_CFG, batch_size=4), out)
except KeyboardInterrupt:
    pass
train(Regression(), tcfg(**RESUME_CFG, batch_size=4), out)
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_with_resume_equals_one_process(tmp_path: Path) -> None:
    """``accelerate launch`` with 2 CPU processes (gloo), killed and resumed; batch 4 each = batch 8 in one."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(JOB.format(tests=str(HERE))))
    # ACCELERATE_USE_CPU makes accelerate pick MULTI_CPU (gloo) for the torchrun-style launch.
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(free_port())]
    proc = subprocess.run(
        [*launcher, str(script), str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = tmp_path / "ddp"
    assert read_json(ddp / "result.json")["resumed_from"] == "./checkpoints/step-3"  # relative: it travels
    ckpt = ddp / "checkpoints" / "step-12"
    assert sorted(p.name for p in ckpt.glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    # Each process sees different batches: per epoch 4 batches of 4 each, the 8 batches of one process.
    assert read_jsonl(ddp / "metrics.jsonl")[0]["epoch"] == pytest.approx(
        read_jsonl(ddp / "metrics.jsonl")[0]["step"] * 2 / 8
    )
    single = tmp_path / "single"
    train(Regression(), tcfg(**RESUME_CFG), single)  # one process, batch 8: the same samples per step
    assert_same_weights(ddp, single, atol=1e-6)


DS_JOB = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from accelerate.utils import DeepSpeedPlugin
from test_train import Regression, tcfg, assert_same_weights
from align.train.loop import train

root, cfg = Path(sys.argv[1]), tcfg(steps=8, grad_accum=2, save_every=3)
train(Regression(), cfg, root / "plain")
for name in ("zero2", "zero3"):
    conf = json.loads(Path({configs!r}, name + ".json").read_text())  # as shipped, "auto" sizes and all
    def run(out, **kw):
        plugin = DeepSpeedPlugin(hf_ds_config=json.loads(json.dumps(conf)))
        return train(Regression(**kw), cfg, root / name / out, accelerator_kwargs={{"deepspeed_plugin": plugin}})
    launched = run("full").launch
    assert (launched["engine"], launched["zero_stage"]) == ("DeepSpeedEngine", int(name[-1])), launched
    try:
        run("cut", kill_at=10)
    except KeyboardInterrupt:
        pass
    assert run("cut").resumed_from.name == "step-3"
    assert (root / name / "cut" / "checkpoints" / "step-6" / "pytorch_model").is_dir()
    assert_same_weights(root / name / "full", root / name / "cut")
    assert_same_weights(root / name / "full", root / "plain", atol=1e-5)
    conf["optimizer"] = {{"type": "AdamW", "params": {{"lr": "auto"}}}}
    try:
        run("refused")
    except ValueError as err:
        assert "remove the 'optimizer' section" in str(err), err
    else:
        raise AssertionError("a DeepSpeed optimizer section was accepted")
print("DS-OK")
"""


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_resume_and_match_plain_training(tmp_path: Path) -> None:
    """The project's DeepSpeed configs through the loop on CPU: exact resume, same weights as plain."""
    pytest.importorskip("deepspeed")
    configs = ROOT / "deepspeed_configs"
    if not (configs / "zero2.json").is_file() or not (configs / "zero3.json").is_file():
        pytest.skip("deepspeed_configs/zero2.json and zero3.json are not in this checkout yet")
    script = tmp_path / "ds_job.py"
    script.write_text(textwrap.dedent(DS_JOB.format(tests=str(HERE), configs=str(configs))))
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_DEEPSPEED="true", RANK="0", LOCAL_RANK="0")
    env.update(WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.pop("ACCELERATE_USE_CPU", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0 and "DS-OK" in proc.stdout, proc.stderr[-3000:]
