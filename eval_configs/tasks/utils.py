"""Offline lmms-eval tasks on the shapes world (``shapes_vqa``, ``shapes_mc``).

The data folder is the one ``align.data.shapes.generate_shapes`` writes (``vqa_test.jsonl`` with image
paths relative to it). lmms-eval's YAML cannot read environment variables, so the tasks use
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
from lmms_eval.api.task import ConfigurableTask
from PIL import Image

# shapes_answers.py beside this file: lmms-eval loads task files by path, not as a package
normalize = runpy.run_path(str(Path(__file__).with_name("shapes_answers.py")))["normalize"]

ENV_VAR = "MLLM_SWAP_SHAPES_DIR"
REQUIRED = ("id", "image", "question", "options", "answer")


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


def read_rows(path: Path) -> list[dict]:
    """Rows of a shapes VQA file, checked, with ``image`` made absolute (relative to the file)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected the shapes world's vqa_test.jsonl")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
        missing = [key for key in REQUIRED if key not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing keys {missing}; expected {list(REQUIRED)}")
        if row["answer"] not in row["options"]:
            raise ValueError(
                f"{path}:{lineno}: answer {row['answer']!r} is not one of options {row['options']}"
            )
        image = (path.parent / row["image"]).resolve()
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{lineno}: image {row['image']} not found at {image}")
        rows.append({**row, "id": str(row["id"]), "image": str(image), "kind": str(row.get("kind", ""))})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


class ShapesTask(ConfigurableTask):
    """A ConfigurableTask whose data files are resolved against ``$MLLM_SWAP_SHAPES_DIR``."""

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
            splits[split] = Dataset.from_list(read_rows(path))
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
