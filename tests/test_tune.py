"""Tuning stages: what trains, LoRA targets, loss on assistant tokens, QLoRA refusal, resume, CLI chain."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from align.errors import UserError
from align.io import read_json
from align.recipes import load_config
from align.train.config import TrainConfig
from mllm_swap.cli import main
from mllm_swap.tune.config import QLORA_MESSAGE, TuneConfig
from mllm_swap.tune.model import (
    INFO_FILE,
    NON_LORA_FILE,
    add_lora,
    head_param_names,
    load_for_tuning,
    param_groups,
    saved_modules,
    select_trainable,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _cfg(shapes_dir: Path, **kw) -> TuneConfig:
    train = kw.pop("train", TrainConfig(steps=2, batch_size=4, lr=1e-3, report_to=["jsonl"], save_every=0))
    return TuneConfig(
        model="tiny-llava",
        data=shapes_dir / "instruct.json",
        image_folder=shapes_dir,
        max_length=256,
        train=train,
        **kw,
    )


@pytest.fixture(scope="module")
def loaded(shapes_dir: Path):
    loaded = load_for_tuning(_cfg(shapes_dir, stage="connector"))
    assert loaded.family.name == "llava_hf"
    return loaded


def _fresh(loaded) -> nn.Module:
    from copy import deepcopy

    return deepcopy(loaded.model)


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _names(module: nn.Module, prefix: str) -> set[str]:
    return {f"{prefix}.{n}" for n, _ in module.named_parameters()}


def test_connector_stage_trains_only_the_projector(loaded, shapes_dir: Path) -> None:
    model = _fresh(loaded)
    groups = select_trainable(model, _cfg(shapes_dir, stage="connector"), loaded.family)
    projector = model.model.multi_modal_projector
    expected = _names(projector, "model.multi_modal_projector")
    assert _trainable(model) == expected == set(groups["connector"])
    assert len(expected) == 4  # linear_1/linear_2 weight + bias
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in projector.parameters()
    )


def test_lora_stage_targets_every_llm_linear_only(loaded, shapes_dir: Path) -> None:
    model = _fresh(loaded)
    llm = model.model.language_model
    linears = {f"model.language_model.{n}": m for n, m in llm.named_modules() if isinstance(m, nn.Linear)}
    assert set(loaded.family.lora_target_modules(model)) == set(linears)
    assert len(linears) == 2 * 7  # 2 Llama layers x (q, k, v, o, gate, up, down)
    cfg = _cfg(shapes_dir, stage="lora", lora_r=4, lora_alpha=8)
    wrapped = add_lora(model, cfg, loaded.family)
    groups = select_trainable(wrapped, cfg, loaded.family)
    lora = {n for n in _trainable(wrapped) if "lora_" in n}
    assert lora == set(groups["lora"]) and len(lora) == 2 * len(linears)  # lora_A and lora_B per target
    for name in lora:
        assert ".language_model." in name and "vision_tower" not in name and "lm_head" not in name
    # Independent count: r * (in + out) per adapted linear.
    assert sum(wrapped.get_parameter(n).numel() for n in lora) == sum(
        4 * (m.in_features + m.out_features) for m in linears.values()
    )
    # The connector trains as peft's modules_to_save copy (saved in the adapter); its original stays frozen.
    connector = {n for n in _trainable(wrapped) if "lora_" not in n}
    copy = wrapped.base_model.model.model.multi_modal_projector.modules_to_save["default"]
    assert (
        connector
        == set(groups["connector"])
        == _names(copy, "base_model.model.model.multi_modal_projector.modules_to_save.default")
    )
    assert not any("vision_tower" in n or "lm_head" in n for n in _trainable(wrapped))


def test_full_stage_and_tower_options(loaded, shapes_dir: Path) -> None:
    model = _fresh(loaded)
    select_trainable(model, _cfg(shapes_dir, stage="full"), loaded.family)
    llm_and_head = _names(model.model.language_model, "model.language_model") | _names(
        model.lm_head, "lm_head"
    )
    assert _trainable(model) == llm_and_head | _names(
        model.model.multi_modal_projector, "model.multi_modal_projector"
    )
    select_trainable(model, _cfg(shapes_dir, stage="connector", unfreeze_tower=True), loaded.family)
    tower = _names(model.model.vision_tower, "model.vision_tower")
    assert tower <= _trainable(model) and not (_trainable(model) & llm_and_head)
    with pytest.raises(ValueError, match="no head parameters"):
        select_trainable(model, _cfg(shapes_dir, stage="connector", unfreeze_head=True), loaded.family)


def test_unfreeze_head_selects_the_towers_head(loaded, shapes_dir: Path) -> None:
    model = _fresh(loaded)
    model.model.vision_tower.head = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64))  # an alignment head
    cfg = _cfg(shapes_dir, stage="connector", unfreeze_head=True, tower_lr=1e-5, connector_lr=1e-3)
    groups = select_trainable(model, cfg, loaded.family)
    head = _names(model.model.vision_tower.head, "model.vision_tower.head")
    assert set(head_param_names(model, loaded.family)) == head == set(groups["head"])
    assert _trainable(model) == head | set(groups["connector"])
    by_lr = {}
    for group in param_groups(model, groups, cfg):
        by_lr.setdefault(group["lr"], 0)
        by_lr[group["lr"]] += sum(p.numel() for p in group["params"])
    assert by_lr == {
        1e-5: sum(p.numel() for p in model.model.vision_tower.head.parameters()),
        1e-3: sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
    }
    # LoRA stage: the head is kept in full in the adapter too; its peft copy trains at tower_lr.
    cfg = _cfg(
        shapes_dir, stage="lora", unfreeze_head=True, lora_r=4, lora_alpha=8, modules_to_save=["lm_head"]
    )
    assert saved_modules(model, cfg, loaded.family) == ["model.multi_modal_projector", "model.vision_tower.head", "lm_head"]
    wrapped = add_lora(model, cfg, loaded.family)
    groups = select_trainable(wrapped, cfg, loaded.family)
    copy = "base_model.model.model.vision_tower.head.modules_to_save.default"
    assert set(groups["head"]) == _names(wrapped.get_submodule(copy), copy)
    assert {n for n in _trainable(wrapped) if "lora_" not in n} == {
        n for part in ("connector", "head", "saved") for n in groups[part]
    }
    assert all(".modules_to_save." in n for part in ("connector", "head", "saved") for n in groups[part])


def test_model_loss_is_cross_entropy_over_assistant_tokens(loaded, shapes_dir: Path) -> None:
    from mllm_swap.tune.batches import ConversationCollator, ConversationDataset
    from mllm_swap.tune.conversations import IGNORE_INDEX

    model, processor = loaded.model, loaded.processor
    ds = ConversationDataset(shapes_dir / "instruct.json", shapes_dir, processor, max_length=256)
    batch = ConversationCollator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    manual = -torch.log_softmax(logits.float(), -1)[keep].gather(-1, labels[keep][:, None]).mean()
    assert torch.allclose(out.loss, manual, atol=1e-5)
    answers = processor.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX])
    turns = ds.records[0]["conversations"]
    assert answers.split() == [t["value"] + "</s>" for t in turns[1::2]]


def test_qlora_on_cpu_fails_before_loading(shapes_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)
    with pytest.raises(UserError) as err:
        load_for_tuning(_cfg(shapes_dir, stage="lora", qlora=True))
    assert str(err.value).startswith(QLORA_MESSAGE.split("(")[0])
    assert "QLoRA needs a CUDA GPU with bitsandbytes" in str(err.value)
    with pytest.raises(ValueError, match="qlora applies to the 'lora' stage only"):
        _cfg(shapes_dir, stage="connector", qlora=True)


class _Interrupt(Exception):
    pass


def test_lora_resume_matches_uninterrupted_run(shapes_dir: Path, tmp_path: Path) -> None:
    from align.io import read_json
    from align.rundir import OutDir
    from align.train.loop import train
    from mllm_swap.tune.stage import TuneMethod, run_tune

    train_cfg = TrainConfig(steps=4, batch_size=4, lr=5e-3, save_every=2, log_every=1, report_to=["jsonl"])
    cfg = _cfg(shapes_dir, stage="lora", lora_r=4, lora_alpha=8, lora_dropout=0.1, train=train_cfg)
    run_tune(cfg, tmp_path / "a", resume=False)

    class Interrupted(TuneMethod):
        calls = 0

        def loss(self, model, batch):
            Interrupted.calls += 1
            if Interrupted.calls == 3:  # during step 3, after the step-2 checkpoint
                raise _Interrupt
            return super().loss(model, batch)

    with pytest.raises(_Interrupt), OutDir(tmp_path / "b", "tune"):  # as `run_tune` claims it
        train(Interrupted(cfg), cfg.train, tmp_path / "b", resume=False, config_to_save=cfg)
    assert (tmp_path / "b/checkpoints/step-2").is_dir() and not (tmp_path / "b/result.json").exists()
    asked = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-2))  # ignored on resume
    result = run_tune(asked, tmp_path / "b", resume="auto")
    recorded = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert recorded["train"]["lr"] == 5e-3  # the recipe as really run, and what was asked
    assert recorded["resumed"][0]["ignored"] == {"lr": {"requested": 1e-2, "used": 5e-3}}
    assert result.resumed_from == tmp_path / "b/checkpoints/step-2" and result.steps == 4
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert any("lora_B" in k and a[k].abs().max() > 0 for k in a)  # it really trained
    assert any(".multi_modal_projector." in k for k in a) and not (tmp_path / "a" / NON_LORA_FILE).exists()
    # A tiny model is recorded by its id (never its directory on this machine); merge finds it by that id.
    assert (
        json.loads((tmp_path / "a/adapter_config.json").read_text())["base_model_name_or_path"]
        == "tiny-llava"
    )
    assert main(["merge", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "merged")]) == 0
    # counters continue across the resume: the tokens seen equal the uninterrupted run's
    assert (
        read_json(tmp_path / "b" / INFO_FILE)["tokens_seen"]
        == read_json(tmp_path / "a" / INFO_FILE)["tokens_seen"]
    )


def test_cli_connector_stage_chains_into_lora(shapes_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    common = [f"data={shapes_dir / 'instruct.json'}", f"image_folder={shapes_dir}", "eval_vqa=null"]
    common += ["train.steps=2", "train.batch_size=4", "train.save_every=0", "train.report_to=[jsonl]"]
    sets = [x for item in common for x in ("--set", item)]
    stage1 = tmp_path / "stage1"
    assert (
        main(["tune", "--config", str(RECIPES / "tiny_llava_connector.yaml"), *sets, "--out", str(stage1)])
        == 0
    )
    assert load_config(TuneConfig, stage1 / "config.yaml").stage == "connector"
    model = AutoModelForImageTextToText.from_pretrained(stage1)  # a full checkpoint: next stage loads by path
    saved = load_file(stage1 / NON_LORA_FILE)
    assert set(saved) == {
        f"model.multi_modal_projector.{n}" for n, _ in model.model.multi_modal_projector.named_parameters()
    }
    for key, value in saved.items():
        assert torch.equal(model.get_parameter(key), value)
    stage2 = tmp_path / "stage2"
    lora_sets = [*sets, "--set", f"model={stage1}", "--set", "lora_r=4", "--set", "lora_alpha=8"]
    assert (
        main(["tune", "--config", str(RECIPES / "tiny_llava_lora.yaml"), *lora_sets, "--out", str(stage2)])
        == 0
    )
    assert (stage2 / "adapter_model.safetensors").is_file() and (stage2 / "adapter_config.json").is_file()
    assert (stage2 / "tune_info.json").is_file() and (stage2 / "result.json").is_file()
    # A local base is recorded relative to the adapter; each output has a model card.
    assert json.loads((stage2 / "adapter_config.json").read_text())["base_model_name_or_path"] == "../stage1"
    assert "stage `connector`" in (stage1 / "README.md").read_text()
    assert "LoRA r=4, alpha=8" in (stage2 / "README.md").read_text()
    # A LoRA output is not a checkpoint to tune from: the error says to merge it first (exit code 2).
    assert main(["tune", "--config", str(RECIPES / "tiny_llava_lora.yaml"), *sets, "--set", f"model={stage2}",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*llava*.yaml")), ids=lambda p: p.name)
def test_recipes_are_valid_tune_configs(recipe: Path) -> None:
    cfg = load_config(TuneConfig, recipe)
    if cfg.deepspeed is not None:
        assert (RECIPES.parent / cfg.deepspeed).is_file()
    if cfg.stage == "lora" and not recipe.name.startswith("tiny"):
        assert (cfg.lora_r, cfg.lora_alpha, cfg.train.lr, cfg.connector_lr) == (128, 256, 2e-4, 2e-5)
        assert cfg.train.mixed_precision == "bf16" and cfg.deepspeed.name == "zero3.json"


@pytest.mark.slow
def test_lora_under_deepspeed_zero3_on_cpu(shapes_dir: Path, tmp_path: Path) -> None:
    """One process, gloo: ZeRO-3 shards, then gathers the adapter for saving; the merge loads."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    out = tmp_path / "ds"
    sets = [f"data={shapes_dir / 'instruct.json'}", f"image_folder={shapes_dir}", "eval_vqa=null", "lora_r=4"]
    sets += [
        f"deepspeed={RECIPES.parent / 'deepspeed_configs/zero3.json'}",
        "train.steps=2",
        "train.batch_size=4",
    ]
    sets += ["train.save_every=0", "train.report_to=[jsonl]"]
    cmd = [
        sys.executable,
        "-m",
        "mllm_swap",
        "tune",
        "--config",
        str(RECIPES / "tiny_llava_lora.yaml"),
        "--out",
        str(out),
    ]
    for item in sets:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a DeepSpeed engine at ZeRO-3 really trained (the recipe's `deepspeed` file, no launcher involved)
    launched = read_json(out / "result.json")["launch"]
    assert (launched["engine"], launched["zero_stage"]) == ("DeepSpeedEngine", 3), launched
    assert "DeepSpeed ZeRO-3 (DeepSpeedEngine)" in proc.stdout
    adapter = load_file(out / "adapter_model.safetensors")
    a_weights = [k for k in adapter if "lora_A" in k]
    assert len(a_weights) == 14 and all(
        adapter[k].shape[0] == 4 and adapter[k].numel() > 0 for k in a_weights
    )
    assert adapter["base_model.model.lm_head.weight"].shape == (512, 64)  # modules_to_save, gathered
    assert main(["merge", "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0


@pytest.mark.parametrize("recipe", ["llava15_pretrain.yaml", "llava15_lora.yaml"])
def test_deepspeed_recipe_without_launcher_names_the_launch(
    recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A recipe's `deepspeed` file outside a launcher: exit 2 before loading anything, naming the shipped
    accelerate config that launches that same DeepSpeed file."""
    from mllm_swap.tune.stage import PROCESS_GROUP_VARIABLES

    for name in (*PROCESS_GROUP_VARIABLES, "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(RECIPES.parent)  # the recipes name their DeepSpeed file from the repository root
    out = tmp_path / "out"
    assert main(["tune", "--config", str(RECIPES / recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "accelerate launch --config_file " in err, err
    accelerate = err.split("accelerate launch --config_file ", 1)[1].split()[0]
    launcher = yaml.safe_load((RECIPES.parent / accelerate).read_text())
    assert (
        launcher["deepspeed_config"]["deepspeed_config_file"]
        == yaml.safe_load((RECIPES / recipe).read_text())["deepspeed"]
    )
    assert "RANK" in err and "--set deepspeed=null" in err and not out.exists()
