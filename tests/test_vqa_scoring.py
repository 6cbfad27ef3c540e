"""Shapes VQA scoring on hand-made answers: the normaliser, the lmms-eval task's scorer, the in-process
evaluator (``mllm_swap.tune.quick_vqa``) with an oracle model, and the installed lmms-eval CLI replaying
hand-written answers with its own ``from_log`` model, so every score is known in advance and above 0."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.io import read_jsonl
from mllm_swap.fixtures import ensure_tiny_mllm
from mllm_swap.tune.quick_vqa import evaluate_vqa, normalize

REPO = Path(__file__).resolve().parent.parent
DIGITS = {"one": "1", "two": "2", "three": "3", "four": "4"}

# (prediction, ground truth, match?) written by hand.
CASES = [
    ("orange", "orange", True),
    ("Orange", "orange", True),  # case
    ("ORANGE!", "orange", True),  # punctuation
    ("  orange .", "orange", True),
    ("The triangle.", "triangle", True),  # article
    ("an orange", "orange", True),
    ("a circle", "circle", True),
    ("3", "three", True),  # numbers as words
    ("Three", "3", True),
    ("two.", "two", True),
    ("Bottom-Left", "bottom-left", True),
    ("bottom left", "bottom-left", True),
    ("circle\nbecause it is round", "circle", True),  # first line only
    ("", "one", False),  # an empty answer never matches
    ("two", "three", False),
    ("2", "3", False),
    ("top", "top-right", False),
    ("orange triangle", "orange", False),
    ("2.5", "25", False),  # a decimal point is kept
]


def _task_utils():
    spec = importlib.util.spec_from_file_location("shapes_task_utils", REPO / "eval_configs/tasks/utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("prediction, truth, match", CASES)
def test_normalised_exact_match_on_hand_made_answers(prediction: str, truth: str, match: bool) -> None:
    assert (normalize(prediction) == normalize(truth)) is match
    scored = _task_utils().vqa_process_results({"answer": truth}, [prediction])
    assert scored == {"exact_match": float(match)}


def test_normalise_examples() -> None:
    assert normalize("The Three.") == normalize("3") == "3"
    assert normalize(" Bottom-Left! ") == "bottom left"
    assert _task_utils().vqa_process_results({"answer": "red"}, []) == {"exact_match": 0.0}


def _replies(rows: list[dict]) -> tuple[list[str], float]:
    """Hand-made answers in five styles, every fifth one wrong; and the accuracy they must get."""
    styles = [
        lambda a: f"The {a.title()}.",
        lambda a: a.upper() + "!",
        lambda a: f"an {a}",
        lambda a: DIGITS.get(a, a.replace("-", " ")),
    ]
    replies, right = [], 0
    for i, row in enumerate(rows):
        if i % 5 == 4:
            replies.append(next(o for o in row["options"] if o != row["answer"]))
        else:
            replies.append(styles[i % 5](row["answer"]))
            right += 1
    return replies, right / len(rows)


class _Oracle(torch.nn.Module):
    """A model whose ``generate`` appends hand-written replies (in order) after the prompt."""

    def __init__(self, tokenizer, replies: list[str]) -> None:
        super().__init__()
        self.tokenizer, self.replies, self.weight = (
            tokenizer,
            iter(replies),
            torch.nn.Parameter(torch.zeros(1)),
        )
        self.batches: list[tuple[int, ...]] = []

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def generate(self, input_ids, pixel_values, attention_mask, max_new_tokens, **kwargs) -> torch.Tensor:
        assert pixel_values.shape[0] == input_ids.shape[0] == attention_mask.shape[0]
        self.batches.append(tuple(input_ids.shape))
        tok = self.tokenizer
        new = [
            tok(next(self.replies), add_special_tokens=False).input_ids + [tok.eos_token_id]
            for _ in input_ids
        ]
        width = max(len(n) for n in new)
        new = [n + [tok.pad_token_id] * (width - len(n)) for n in new]
        return torch.cat([input_ids, torch.tensor(new, dtype=input_ids.dtype)], dim=1)


def test_evaluate_vqa_scores_an_oracle(shapes_dir: Path) -> None:
    from transformers import AutoProcessor

    rows = read_jsonl(shapes_dir / "vqa_test.jsonl")[:20]
    replies, expected = _replies(rows)
    processor = AutoProcessor.from_pretrained(ensure_tiny_mllm("tiny-llava"))
    oracle = _Oracle(processor.tokenizer, replies)
    result = evaluate_vqa(
        oracle, processor, shapes_dir / "vqa_test.jsonl", limit=20, batch_size=6, progress=False
    )
    assert [b[0] for b in oracle.batches] == [6, 6, 6, 2]
    assert result["n"] == 20 and result["accuracy"] == pytest.approx(expected) and expected == 0.8
    kinds = {}
    for row, reply in zip(rows, replies, strict=True):
        kinds.setdefault(row["kind"], []).append(normalize(reply) == normalize(row["answer"]))
    assert result["per_kind"] == pytest.approx({k: sum(v) / len(v) for k, v in kinds.items()})
    assert [e["prediction"].strip() for e in result["examples"]] == replies[:8]


@pytest.mark.slow
def test_lmms_eval_cli_scores_hand_written_answers(shapes_dir: Path, tmp_path: Path) -> None:
    """lmms-eval's own ``from_log`` model replays our answers through the installed CLI and our task."""
    limit = 15
    rows = read_jsonl(shapes_dir / "vqa_test.jsonl")[:limit]
    replies, expected = _replies(rows)
    logs = tmp_path / "logs"
    logs.mkdir()
    record = {
        "args": {},
        "model_configs": {"task": "shapes_vqa"},
        "time": "0101_0000",
        "logs": [{"doc_id": i, "resps": [[reply]]} for i, reply in enumerate(replies)],
    }
    (logs / "oracle.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    script = Path(sys.executable).with_name("lmms-eval")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lmms_eval"]
    command += ["--model", "from_log", "--model_args", f"logs={logs},have_limits=True",
                "--include_path", "eval_configs/tasks", "--tasks", "shapes_vqa", "--limit", str(limit),
                "--output_path", str(out), "--log_samples"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MLLM_SWAP_SHAPES_DIR=str(shapes_dir))
    env["HF_HOME"] = str(tmp_path / "hf")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    results = json.loads(Path(path).read_text())["results"]["shapes_vqa"]
    assert expected == 0.8 and results["exact_match,none"] == pytest.approx(expected)
    (samples,) = glob.glob(str(out / "**" / "*_samples_shapes_vqa.jsonl"), recursive=True)
    scored = {s["doc_id"]: s["exact_match"] for s in read_jsonl(samples)}
    assert scored == {i: float(i % 5 != 4) for i in range(limit)}
