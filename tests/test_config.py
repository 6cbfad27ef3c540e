"""Recipe configs: YAML + --set overrides into dataclasses, with clear rejections."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest
import yaml

from align.recipes import ConfigError, config_to_dict, load_config, parse_overrides, save_config
from align.train.config import TrainConfig


@dataclasses.dataclass
class Data:
    pairs: Path
    pool: Literal["cls", "mean", "concat"] = "concat"
    extra_captions: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Recipe:
    name: str
    data: Data
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(steps=100))
    head_dim: int = 1024
    init_scale: float | None = None
    tags: dict[str, int] = dataclasses.field(default_factory=dict)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    return write(
        tmp_path / "recipe.yaml",
        "name: sail-tiny\n"
        "data:\n  pairs: data/pairs.jsonl\n  extra_captions: [long]\n"
        "train:\n  steps: 50\n  lr: 1e-5\n  optimizer: lion\n  betas: [0.9, 0.99]\n  warmup: 0.1\n",
    )


def test_yaml_values_land_in_nested_dataclasses(recipe: Path) -> None:
    cfg = load_config(Recipe, recipe)
    assert cfg.name == "sail-tiny"
    assert cfg.data == Data(pairs=Path("data/pairs.jsonl"), extra_captions=["long"])
    # PyYAML reads "1e-5" as a string; float fields accept it.
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.9, 0.99) and isinstance(cfg.train.betas, tuple)
    assert cfg.train.warmup == 0.1 and cfg.train.warmup_steps(50) == 5
    assert cfg.train.batch_size == TrainConfig(steps=1).batch_size  # untouched default


def test_dotted_overrides_win_over_the_file(recipe: Path) -> None:
    cfg = load_config(
        Recipe,
        recipe,
        [
            "train.lr=3e-4",
            "train.grad_accum=4",
            "train.report_to=[jsonl]",
            "data.pool=cls",
            "init_scale=2.5",
            "tags.a=1",
            "train.grad_clip=null",
        ],
    )
    assert cfg.train.lr == 3e-4
    assert cfg.train.grad_accum == 4
    assert cfg.train.report_to == ["jsonl"]
    assert cfg.data.pool == "cls"
    assert cfg.init_scale == 2.5
    assert cfg.tags == {"a": 1}
    assert cfg.train.grad_clip is None
    assert cfg.train.steps == 50  # the file's value where no override touched it


def test_unknown_key_in_file_names_file_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path / "recipe.yaml", "name: x\ndata: {pairs: p}\ntrain:\n  steps: 3\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, path)
    assert str(err.value) == f"{path}: unknown key 'train.lr_rate'; did you mean 'train.lr'?"


def test_unknown_override_suggests_nearest_key(recipe: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"--set train\.bacth_size: unknown key .*did you mean 'train\.batch_size'"
    ):
        load_config(Recipe, recipe, ["train.bacth_size=8"])
    with pytest.raises(ConfigError, match=r"unknown key 'head_dims'; did you mean 'head_dim'"):
        load_config(Recipe, recipe, ["head_dims=8"])
    # A key put at the wrong level is matched against every section's keys.
    with pytest.raises(ConfigError, match=r"unknown key 'seed'; did you mean 'train\.seed'"):
        load_config(Recipe, recipe, ["seed=1"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.steps=ten", r"key 'train\.steps' expects int \| None, found str 'ten'"),
        ("train.steps=2.5", r"key 'train\.steps' expects"),
        ("train.gradient_checkpointing=1", r"key 'train\.gradient_checkpointing' expects bool, found int"),
        ("head_dim=true", r"key 'head_dim' expects int, found bool"),
        (
            "train.optimizer=sgd",
            r"key 'train\.optimizer' expects Literal\['adamw', 'lion'\], found str 'sgd'",
        ),
        ("train.betas=[0.9]", r"key 'train\.betas' expects tuple\[float, float\]"),
        ("data.extra_captions=long", r"key 'data\.extra_captions' expects list\[str\], found str"),
        ("name.first=x", r"key 'name' is a str, not a section"),
    ],
)
def test_wrong_types_are_rejected_naming_the_key(recipe: Path, override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(Recipe, recipe, [override])
    assert str(err.value).startswith(f"--set {override.split('=')[0]}")


def test_wrong_type_in_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "name: x\ndata: {pairs: p}\nhead_dim: wide\n")
    with pytest.raises(ConfigError, match=rf"^{path}: key 'head_dim' expects int, found str 'wide'$"):
        load_config(Recipe, path)


def test_missing_required_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing required key 'data\.pairs'"):
        load_config(Recipe, write(tmp_path / "a.yaml", "name: x\ndata: {pool: cls}\n"))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Recipe, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Recipe, write(tmp_path / "b.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.lr"])


def test_train_config_semantic_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set exactly one of 'steps' or 'epochs'"):
        TrainConfig()
    path = write(tmp_path / "r.yaml", "name: x\ndata: {pairs: p}\ntrain: {steps: 5, epochs: 2}\n")
    with pytest.raises(ConfigError, match=rf"{path} \(section 'train'\): set exactly one of"):
        load_config(Recipe, path)
    with pytest.raises(ConfigError, match="'warmup' must be"):
        TrainConfig(steps=10, warmup=1.5)
    with pytest.raises(ConfigError, match="'batch_size' must be > 0"):
        TrainConfig(steps=10, batch_size=0)
    assert TrainConfig(epochs=1.5).steps is None
    assert TrainConfig(steps=10, warmup=3).warmup_steps(10) == 3


def test_yaml_round_trip(recipe: Path, tmp_path: Path) -> None:
    cfg = load_config(Recipe, recipe, ["tags.b=2", "init_scale=0.5"])
    out = tmp_path / "out" / "config.yaml"
    save_config(cfg, out)
    assert load_config(Recipe, out) == cfg
    # The file is plain YAML holding every resolved value (tuples as lists, paths as strings).
    plain = yaml.safe_load(out.read_text())
    assert plain == config_to_dict(cfg)
    assert plain["train"]["betas"] == [0.9, 0.99]
    assert plain["data"]["pairs"] == "data/pairs.jsonl"
    assert plain["train"]["steps"] == 50 and plain["train"]["epochs"] is None
    assert list(out.parent.iterdir()) == [out]  # atomic write leaves no temporary behind


def test_base_values_sit_between_defaults_and_file(tmp_path: Path) -> None:
    base = {"name": "paper", "data": {"pairs": "x.jsonl"}, "head_dim": 2048, "train": {"lr": 0.5, "steps": 9}}
    path = write(tmp_path / "r.yaml", "head_dim: 512\n")
    cfg = load_config(Recipe, path, ["train.seed=3"], base=base)
    assert cfg.name == "paper" and cfg.head_dim == 512
    assert cfg.train.lr == 0.5 and cfg.train.steps == 9 and cfg.train.seed == 3
    # A dataclass instance works as a base too.
    again = load_config(Recipe, base=cfg)
    assert again == cfg


ACCELERATE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"


@pytest.mark.parametrize(
    ("name", "kind", "ds_json"),
    [
        ("cpu.yaml", "NO", None),
        ("multi_gpu.yaml", "MULTI_GPU", None),
        ("deepspeed_zero2.yaml", "DEEPSPEED", "deepspeed_configs/zero2.json"),
        ("deepspeed_zero3.yaml", "DEEPSPEED", "deepspeed_configs/zero3.json"),
        ("deepspeed_zero3_offload.yaml", "DEEPSPEED", "deepspeed_configs/zero3_offload.json"),
    ],
)
def test_accelerate_configs_load_with_accelerate(name: str, kind: str, ds_json: str | None) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACCELERATE_DIR / name))
    assert cfg.distributed_type.value == kind
    if ds_json is None:
        assert cfg.mixed_precision == "no"  # precision comes from the recipe's train section
        return
    assert cfg.deepspeed_config["deepspeed_config_file"] == ds_json
    # accelerate refuses mixed_precision next to a deepspeed_config_file
    assert cfg.mixed_precision is None
    assert set(cfg.deepspeed_config) == {"deepspeed_config_file", "zero3_init_flag"}
