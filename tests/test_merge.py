"""Adapter -> merge -> plain from_pretrained gives the unmerged peft model's outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config import TrainConfig
from align.integrity import CorruptFileError, record_checksums
from mllm_swap.cli import main
from mllm_swap.merge import merge_adapter
from mllm_swap.tune import INFO_FILE, NON_LORA_FILE, TuneConfig, load_non_lora


@pytest.fixture(scope="module")
def lora_run(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllm_swap.tune_run import run_tune

    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = TuneConfig(
        model="tiny-llava",
        data=shapes_dir / "instruct.json",
        image_folder=shapes_dir,
        stage="lora",
        lora_r=4,
        lora_alpha=8,
        modules_to_save=["lm_head"],
        connector_lr=2e-2,
        max_length=256,
        train=TrainConfig(steps=3, batch_size=4, lr=2e-2, save_every=0, report_to=["jsonl"]),
    )
    run_tune(cfg, out, resume=False)
    return out


@pytest.fixture(scope="module")
def batch(shapes_dir: Path, lora_run: Path) -> dict:
    from transformers import AutoProcessor

    from mllm_swap.conversations import ConversationCollator, ConversationDataset

    processor = AutoProcessor.from_pretrained(lora_run)
    ds = ConversationDataset(shapes_dir / "instruct.json", shapes_dir, processor, max_length=256)
    return ConversationCollator(processor.tokenizer.pad_token_id)([ds[0], ds[5]])


def _logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_merged_checkpoint_reloads_with_same_outputs(lora_run: Path, batch: dict, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = json.loads((lora_run / "adapter_config.json").read_text())
    base_dir = config["base_model_name_or_path"]
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    before = _logits(base, batch)
    copied = load_non_lora(base, lora_run / NON_LORA_FILE)
    assert copied and all(".multi_modal_projector." in n for n in copied)
    unmerged = PeftModel.from_pretrained(base, str(lora_run))
    expected = _logits(unmerged, batch)
    assert (expected - before).abs().max() > 1e-3  # the adapter changes the model: the check below has teeth

    out = merge_adapter(lora_run, tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(out)  # the family's plain loader, no peft
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, batch), expected, atol=1e-5, rtol=1e-4)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.eos_token == "</s>" and processor.chat_template


def test_merge_cli_and_errors(lora_run: Path, batch: dict, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForImageTextToText

    assert main(["merge", "--adapter", str(lora_run), "--out", str(tmp_path / "m")]) == 0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    assert _logits(model, batch).shape[:2] == batch["input_ids"].shape
    # a finished output is refused like swap's, replaced with --overwrite
    assert main(["merge", "--adapter", str(lora_run), "--out", str(tmp_path / "m")]) == 2
    assert "holds a finished run of `mllm-swap merge`" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(lora_run), "--out", str(tmp_path / "m"), "--overwrite"]) == 0
    assert main(["merge", "--adapter", str(tmp_path / "absent"), "--out", str(tmp_path / "x")]) == 2
    assert main(["merge", "--adapter", str(lora_run), "--out", str(lora_run)]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="expected adapter_config.json"):
        merge_adapter(empty, tmp_path / "y")


def test_non_lora_only_output_is_applied_to_its_base(lora_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    stage = tmp_path / "connector_only"
    stage.mkdir()
    shutil.copy(lora_run / NON_LORA_FILE, stage / NON_LORA_FILE)
    base = json.loads((lora_run / "adapter_config.json").read_text())["base_model_name_or_path"]
    (stage / INFO_FILE).write_text(json.dumps({"stage": "connector", "base_model": base}))
    with pytest.raises(CorruptFileError, match="connector_only: adapter has no checksums.json"):
        merge_adapter(stage, tmp_path / "merged")  # a stage output of ours without its record
    record_checksums(stage)
    out = merge_adapter(stage, tmp_path / "merged")
    model = AutoModelForImageTextToText.from_pretrained(out)
    for key, value in load_file(stage / NON_LORA_FILE).items():
        assert torch.equal(model.get_parameter(key), value)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", NON_LORA_FILE])
def test_corrupt_adapter_is_named_not_merged(lora_run: Path, tmp_path: Path, capsys, name: str) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run, adapter)
    data = bytearray((adapter / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size
    (adapter / name).write_bytes(bytes(data))
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 2
    assert f"{adapter / name}: adapter file is corrupt: expected sha256" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
