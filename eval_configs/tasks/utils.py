"""Offline lmms-eval tasks on the shapes world (``shapes_vqa``, ``shapes_mc``, ``shapes_mmvp``).

The data folder is the one ``align.data.shapes.generate_shapes`` writes (``vqa_test.jsonl`` with image
paths relative to it; ``mmvp_pairs.jsonl`` from ``mllm-swap data mmvp`` for ``shapes_mmvp``). lmms-eval's YAML cannot read environment variables, so the tasks use
:class:`ShapesTask`, which resolves ``dataset_kwargs.data_files`` against ``$MLLM_SWAP_SHAPES_DIR``
(absolute paths are used as they are). ``mllm-swap eval --shapes DIR`` sets the variable for you.
"""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from lmms_eval.api.metrics import acc_all
from lmms_eval.api.task import ConfigurableTask
from PIL import Image

# shapes_answers.py beside this file: lmms-eval loads task files by path, not as a package
normalize = runpy.run_path(str(Path(__file__).with_name("shapes_answers.py")))["normalize"]

ENV_VAR = "MLLM_SWAP_SHAPES_DIR"
REQUIRED = ("id", "image", "question", "options", "answer")
PAIR_REQUIRED = ("id", "images", "question", "options", "answers")


def shapes_dir() -> Path:
    """The shapes-world folder named by ``$MLLM_SWAP_SHAPES_DIR``."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        raise FileNotFoundError(
            f"{ENV_VAR} is not set; point it at a generated shapes-world folder (one holding vqa_test.jsonl), "
            "or run `mllm-swap eval --shapes DIR`"
        )
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{ENV_VAR}={value}: not a directory")
    return path


def _json_lines(path: Path, required: tuple[str, ...], what: str) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a JSONL file, each row checked for the ``required`` keys."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected {what}")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing keys {missing}; expected {list(required)}")
        rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _image(path: Path, lineno: int, name: str) -> str:
    image = (path.parent / name).resolve()
    if not image.is_file():
        raise FileNotFoundError(f"{path}:{lineno}: image {name} not found at {image}")
    return str(image)


def read_rows(path: Path) -> list[dict]:
    """Rows of a shapes VQA file, checked, with ``image`` made absolute (relative to the file)."""
    rows = []
    for lineno, row in _json_lines(path, REQUIRED, "the shapes world's vqa_test.jsonl"):
        if row["answer"] not in row["options"]:
            raise ValueError(
                f"{path}:{lineno}: answer {row['answer']!r} is not one of options {row['options']}"
            )
        image = _image(path, lineno, row["image"])
        rows.append({**row, "id": str(row["id"]), "image": image, "kind": str(row.get("kind", ""))})
    return rows


def read_pair_rows(path: Path) -> list[dict]:
    """One row per image of a Shapes-MMVP pairs file (``mllm-swap data mmvp``): pair ``p`` gives rows
    ``2p`` and ``2p + 1``, the same question and options, each with its own image and answer."""
    rows = []
    for pair, (lineno, row) in enumerate(_json_lines(path, PAIR_REQUIRED, "mmvp_pairs.jsonl (`mllm-swap data mmvp`)")):
        if len(row["images"]) != 2 or sorted(row["answers"]) != sorted(row["options"]) or len(row["options"]) != 2:
            raise ValueError(
                f"{path}:{lineno}: expected 2 images and 2 distinct answers that are the 2 options; "
                f"found images {row['images']}, answers {row['answers']}, options {row['options']}"
            )
        for k in range(2):
            image = _image(path, lineno, row["images"][k])
            rows.append({"id": f"{row['id']}-{k}", "pair": pair, "image": image, "question": row["question"],
                         "options": list(row["options"]), "answer": row["answers"][k],
                         "kind": str(row.get("kind", ""))})  # fmt: skip
    return rows


class ShapesTask(ConfigurableTask):
    """A ConfigurableTask whose data files are resolved against ``$MLLM_SWAP_SHAPES_DIR``."""

    read = staticmethod(read_rows)  # the rows of one data file

    def __init__(self, *args: Any, config: dict | None = None, **kwargs: Any) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        files = (dataset_kwargs or {}).get("data_files") or {"test": "vqa_test.jsonl"}
        if isinstance(files, str):
            files = {self.config.test_split or "test": files}
        splits = {}
        for split, name in files.items():
            path = Path(name) if os.path.isabs(name) else shapes_dir() / name
            splits[split] = Dataset.from_list(self.read(path))
        self.dataset = DatasetDict(splits)
        if self.config.process_docs is not None:
            for split in self.dataset:
                self.dataset[split] = self.config.process_docs(self.dataset[split])
        self.dataset_no_image = self.dataset


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The row's image, RGB."""
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def _wrap(text: str, kwargs: dict | None) -> str:
    kwargs = kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{text}{kwargs.get('post_prompt', '')}"


def vqa_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question as written (the shapes world's questions already ask for one word)."""
    return _wrap(doc["question"], lmms_eval_specific_kwargs)


def mc_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question followed by its options."""
    return _wrap(f"{doc['question']}\nOptions: {', '.join(doc['options'])}.", lmms_eval_specific_kwargs)


def vqa_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``exact_match``: 1 when the normalized answer equals the normalized ground truth (the VQA
    normalisation of ``shapes_answers.normalize``: case, punctuation, articles, number words)."""
    prediction = results[0] if results else ""
    return {"exact_match": float(normalize(prediction) == normalize(doc["answer"]))}


class ShapesMmvpTask(ShapesTask):
    """``shapes_mmvp``: two rows per pair of ``mmvp_pairs.jsonl``, in pair order."""

    read = staticmethod(read_pair_rows)


# MMVP's pair accuracy is lmms-eval's own ``acc_all`` (a group counts only when all its answers are right),
# so lmms-eval reports its standard error over pairs (``acc_all_stderr``, keyed on the same object).
pair_accuracy = acc_all


def mmvp_process_results(doc: dict, results: list[str]) -> dict:
    """``question_acc``: the normalized answer equals this image's answer; ``pair_acc``: the same
    correctness grouped by pair for ``acc_all`` (a ``(prediction, doc)`` item whose gold label is 1)."""
    prediction = results[0] if results else ""
    correct = normalize(prediction) == normalize(doc["answer"])
    group = {"idx": {"paragraph": 0, "question": int(doc["pair"])}, "label": 1}
    return {"question_acc": float(correct), "pair_acc": (correct, group)}
