"""A LoRA stage's output is a standard peft adapter; merge folds it into a plain checkpoint.

The reference is the trained model itself (its logits at the end of training, captured in memory), so a
part that trained but is missing from the adapter (the connector) shows up in every loader below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from align.integrity import CorruptFileError, record_checksums
from align.train.config import TrainConfig
from mllm_swap.cli import main
from mllm_swap.tune.config import TuneConfig
from mllm_swap.tune.merge import merge_adapter
from mllm_swap.tune.model import INFO_FILE, NON_LORA_FILE

# Run in a fresh interpreter from the adapter directory (transformers resolves the recorded relative base
# path against it); imports only torch, transformers, peft and safetensors.
REAL_CLIENT = """
import json, sys
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

adapter, alone, merged, batch_file, out = sys.argv[1:]
batch = {k: v for k, v in load_file(batch_file).items() if k not in ("labels", "trained")}
base_path = json.load(open(f"{adapter}/adapter_config.json"))["base_model_name_or_path"]

def logits(model):
    with torch.no_grad():
        return model.eval()(**batch).logits

base = AutoModelForImageTextToText.from_pretrained(base_path)
res = {
    "base": logits(base),
    "peft": logits(PeftModel.from_pretrained(base, alone)),
    "autopeft": logits(AutoPeftModelForCausalLM.from_pretrained(adapter)),
    "merged": logits(AutoModelForImageTextToText.from_pretrained(merged)),
}
save_file(res, out)
print(json.dumps(sorted(m for m in ("mllm_swap", "align") if m in sys.modules)))
"""


@pytest.fixture(scope="module")
def lora_run(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step LoRA run from a local base (``work/base``) into ``work/lora``, with the trained logits."""
    from mllm_swap.fixtures import ensure_tiny_mllm
    from mllm_swap.tune.batches import ConversationCollator
    from mllm_swap.tune.stage import TuneMethod, run_tune

    work = tmp_path_factory.mktemp("work")
    shutil.copytree(ensure_tiny_mllm("tiny-llava"), work / "base")
    cfg = TuneConfig(
        model=str(work / "base"),
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

    class Captured(TuneMethod):
        def evaluate(self, model):  # the trained model, in memory, before anything is saved
            batch = ConversationCollator(self.processor.tokenizer.pad_token_id)(
                [self.dataset[0], self.dataset[5]]
            )
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            save_file({**batch, "trained": logits.contiguous()}, str(work / "trained.safetensors"))
            return {}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mllm_swap.tune.stage.TuneMethod", Captured)
        run_tune(cfg, work / "lora", resume=False)
    return work / "lora"


@pytest.fixture(scope="module")
def trained(lora_run: Path) -> dict[str, torch.Tensor]:
    """The probe batch and the trained model's logits on it (``trained``)."""
    return load_file(lora_run.parent / "trained.safetensors")


def _logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k not in ("labels", "trained")}).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_adapter_loads_with_plain_peft_anywhere(lora_run: Path, trained: dict, tmp_path: Path) -> None:
    """PeftModel, AutoPeftModelForCausalLM and the merged checkpoint all give the trained model's logits."""
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "../base"  # relative to the adapter, not to the cwd
    assert config["auto_mapping"]["base_model_class"] == "LlavaForConditionalGeneration"
    assert config["modules_to_save"] == ["model.multi_modal_projector", "lm_head"]
    assert not (lora_run / NON_LORA_FILE).exists()  # everything trained is inside the adapter
    card = (lora_run / "README.md").read_text()
    for needle in ("`model.multi_modal_projector`, `lm_head`", "modules_to_save", "r=4, alpha=8", "../base"):
        assert needle in card, needle
    assert "AutoPeftModelForCausalLM" in card and "mllm-swap merge" in card
    machine = (str(lora_run.parent), os.environ["MLLM_SWAP_HOME"])
    for name in ("adapter_config.json", INFO_FILE, "README.md"):
        assert not any(m in (lora_run / name).read_text() for m in machine), name

    moved = tmp_path / "moved"  # adapter and base move together: the relative record still points right
    shutil.copytree(lora_run.parent, moved)
    alone = tmp_path / "elsewhere" / "adapter"  # the adapter alone, for PeftModel with an explicit base
    shutil.copytree(lora_run, alone)
    shutil.move(lora_run.parent / "base", tmp_path / "hidden")  # nothing may read the original location
    try:
        assert main(["merge", "--adapter", str(moved / "lora"), "--out", str(tmp_path / "merged")]) == 0
        info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
        assert info["base_model"] == "../moved/base" and info["adapter"] == "../moved/lora"
        script = tmp_path / "client.py"
        script.write_text(REAL_CLIENT)
        args = [str(moved / "lora"), str(alone), str(tmp_path / "merged"), str(moved / "trained.safetensors")]
        proc = subprocess.run(
            [sys.executable, str(script), *args, str(tmp_path / "out.safetensors")],
            cwd=moved / "lora",
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        shutil.move(tmp_path / "hidden", lora_run.parent / "base")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []  # the project was never imported
    out = load_file(tmp_path / "out.safetensors")
    assert _max_diff(out["base"], trained["trained"]) > 1e-2  # the run changed the model: the check has teeth
    diffs = {loader: _max_diff(out[loader], trained["trained"]) for loader in ("peft", "autopeft", "merged")}
    assert max(diffs.values()) <= 1e-4, diffs


def test_merge_cli_and_errors(lora_run: Path, trained: dict, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = merge_adapter(lora_run, tmp_path / "m")
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(out)  # the family's plain loader, no peft
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    assert _max_diff(_logits(merged, trained), trained["trained"]) <= 1e-4
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.eos_token == "</s>" and processor.chat_template
    assert main(["merge", "--adapter", str(lora_run), "--out", str(tmp_path / "m2")]) == 0
    # a finished output is refused like swap's, replaced with --overwrite
    assert main(["merge", "--adapter", str(lora_run), "--out", str(tmp_path / "m2")]) == 2
    assert "holds a finished run of `mllm-swap merge`" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(lora_run), "--out", str(tmp_path / "m2"), "--overwrite"]) == 0
    assert main(["merge", "--adapter", str(tmp_path / "absent"), "--out", str(tmp_path / "x")]) == 2
    assert main(["merge", "--adapter", str(lora_run), "--out", str(lora_run)]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="expected adapter_config.json"):
        merge_adapter(empty, tmp_path / "y")


def _connector_alone(lora_run: Path) -> dict[str, torch.Tensor]:
    """The adapter's connector under the plain model's names (what non_lora_trainables.safetensors held)."""
    adapter = load_file(lora_run / "adapter_model.safetensors")
    return {
        k.removeprefix("base_model.model."): v for k, v in adapter.items() if ".multi_modal_projector." in k
    }


def test_earlier_outputs_with_a_non_lora_file_still_merge(
    lora_run: Path, trained: dict, tmp_path: Path
) -> None:
    """Outputs of earlier versions kept the connector beside the adapter; merge still applies it."""
    from transformers import AutoModelForImageTextToText

    old = tmp_path / "old"
    shutil.copytree(lora_run, old)
    config = json.loads((old / "adapter_config.json").read_text())
    config.update(modules_to_save=["lm_head"], base_model_name_or_path=str(lora_run.parent / "base"))
    (old / "adapter_config.json").write_text(json.dumps(config))
    adapter = load_file(old / "adapter_model.safetensors")
    save_file(
        {k: v for k, v in adapter.items() if ".multi_modal_projector." not in k},
        old / "adapter_model.safetensors",
    )
    save_file(_connector_alone(lora_run), old / NON_LORA_FILE)
    record_checksums(old)  # intact as written (outputs older still than checksums.json are refused, named)
    model = AutoModelForImageTextToText.from_pretrained(merge_adapter(old, tmp_path / "merged"))
    assert _max_diff(_logits(model, trained), trained["trained"]) <= 1e-4


def test_non_lora_only_output_is_applied_to_its_base(lora_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    stage = tmp_path / "connector_only"
    stage.mkdir()
    save_file(_connector_alone(lora_run), stage / NON_LORA_FILE)
    (stage / INFO_FILE).write_text(
        json.dumps({"stage": "connector", "base_model": str(lora_run.parent / "base")})
    )
    with pytest.raises(CorruptFileError, match="connector_only: adapter has no checksums.json"):
        merge_adapter(stage, tmp_path / "merged")  # a stage output of ours without its record
    record_checksums(stage)
    out = merge_adapter(stage, tmp_path / "merged")
    model = AutoModelForImageTextToText.from_pretrained(out)
    for key, value in load_file(stage / NON_LORA_FILE).items():
        assert torch.equal(model.get_parameter(key), value)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_corrupt_adapter_is_named_not_merged(lora_run: Path, tmp_path: Path, capsys, name: str) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run, adapter)
    data = bytearray((adapter / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size
    (adapter / name).write_bytes(bytes(data))
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 2
    assert f"{adapter / name}: adapter file is corrupt: expected sha256" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
