"""The METHODS table: one name per method, the older words still accepted on the command line, and run
directories written by earlier versions (recorded under an older name) still resumed and replaced."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from align.io import read_json, write_json
from align.methods import METHODS, method_name
from align.rundir import MARKER

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
OLD_WORDS = {"kernel": "kuea", "projector": "freeze_align", "freeze-align": "freeze_align"}


def test_each_method_has_one_name_and_its_module_and_recipe_exist() -> None:
    assert sorted(METHODS) == ["freeze_align", "kuea", "sail"]
    for name, entry in METHODS.items():
        assert method_name(name) == name
        module = importlib.import_module(entry.module)
        assert callable(module.load_recipe) and callable(getattr(module, entry.method))
        assert (RECIPES / entry.tiny_recipe).is_file()
        assert getattr(module, entry.method).__module__ == entry.module
    for old, name in OLD_WORDS.items():
        assert method_name(old) == name
    with pytest.raises(KeyError, match=r"'nope'.*\['freeze_align', 'kuea', 'sail'\]"):
        method_name("nope")


@pytest.mark.parametrize("old", sorted(OLD_WORDS))
def test_old_cli_words_parse_as_their_method(old: str) -> None:
    from mllm_swap.cli import build_parser

    parse = build_parser().parse_args
    args = parse(["align", old, "--config", "r.yaml", "--out", "o"])
    new = parse(["align", OLD_WORDS[old], "--config", "r.yaml", "--out", "o"])
    assert method_name(args.method) == OLD_WORDS[old] and args.func is new.func


def test_a_run_recorded_under_an_old_name_is_still_replaced(tmp_path: Path, capsys) -> None:
    from align.data.shapes import generate_shapes
    from mllm_swap.cli import main

    shapes = tmp_path / "shapes"
    generate_shapes(shapes, 40, seed=1, progress=False)
    out = tmp_path / "run"
    sets = [f"data.train={shapes}", "vision=tiny-dinov2-random", "text=tiny-text", "eval.drift_images=4", "eval.limit=8",
            "train.steps=1", "train.batch_size=16", "train.report_to=[jsonl]"]  # fmt: skip
    argv = ["align", "freeze_align", "--config", str(RECIPES / "tiny_freeze_align.yaml"), "--out", str(out)]
    argv += [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0
    assert read_json(out / MARKER)["command"] == "align freeze_align"
    marker = read_json(out / MARKER)
    write_json(out / MARKER, {**marker, "command": "align projector"})  # as an earlier version wrote it
    assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    assert read_json(out / MARKER)["command"] == "align projector"  # the directory keeps its record
    write_json(out / MARKER, {**marker, "command": "align sail"})  # another method's run stays refused
    assert main([*argv, "--overwrite"]) == 2
    assert "holds the output of `mllm-swap align sail`" in capsys.readouterr().err
