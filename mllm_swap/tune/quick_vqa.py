"""Quick in-process VQA check: generate an answer per question, exact-match it, compare with chance.

Rows are the shapes world's ``vqa_test.jsonl`` (``{"id", "image", "question", "options", "answer",
"kind"}``, image paths relative to the file). The prompt is the one training uses
(:func:`mllm_swap.tune.conversations.generation_prompt`), images are padded to square like in training, and
decoding is greedy. Two chance levels come with the score: picking uniformly among each row's options,
and always giving each kind's most frequent answer.
"""

from __future__ import annotations

import argparse
import runpy
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from align.io import read_jsonl, write_json
from align.paths import shipped
from mllm_swap.checkpoints import load_mllm
from mllm_swap.families.prompts import expand2square, pad_colour
from mllm_swap.tune.conversations import generation_prompt

# one answer normalisation for the shipped lmms-eval tasks and this evaluation
normalize = runpy.run_path(str(shipped("eval_configs") / "tasks" / "shapes_answers.py"))["normalize"]


def chance_levels(rows: list[dict]) -> dict[str, float]:
    """Expected accuracy of uniform guessing among the options, and of each kind's majority answer."""
    uniform = sum(1.0 / len(r["options"]) for r in rows) / len(rows)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_kind[r["kind"]][normalize(r["answer"])] += 1
    majority = sum(c.most_common(1)[0][1] for c in by_kind.values()) / len(rows)
    return {"uniform_over_options": uniform, "majority_per_kind": majority}


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    questions: list[str],
    images: list[Image.Image],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy answers, one per (question, image), decoded without special tokens."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        model.eval()
        for start in tqdm(range(0, len(questions), batch_size), desc="vqa", disable=not progress):
            prompts = [generation_prompt(processor, q) for q in questions[start : start + batch_size]]
            inputs = processor(
                text=prompts, images=images[start : start + batch_size], return_tensors="pt", padding=True
            ).to(model.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, inputs["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return answers


def evaluate_vqa(
    model: Any,
    processor: Any,
    vqa_jsonl: str | Path,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Exact-match accuracy overall and per kind, chance levels, and the first few predictions."""
    path = Path(vqa_jsonl)
    rows = read_jsonl(path)[:limit]
    if not rows:
        raise ValueError(f"{path}: no questions")
    background = pad_colour(processor)
    images = [expand2square(Image.open(path.parent / r["image"]).convert("RGB"), background) for r in rows]
    answers = generate_answers(
        model, processor, [r["question"] for r in rows], images, batch_size, progress=progress
    )
    hits = [normalize(a) == normalize(r["answer"]) for a, r in zip(answers, rows, strict=True)]
    per_kind: dict[str, list[bool]] = defaultdict(list)
    for hit, r in zip(hits, rows, strict=True):
        per_kind[r["kind"]].append(hit)
    return {
        "n": len(rows),
        "accuracy": sum(hits) / len(rows),
        "per_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
        "chance": chance_levels(rows),
        "examples": [
            {"id": r["id"], "answer": r["answer"], "prediction": a}
            for r, a in zip(rows[:8], answers, strict=False)
        ],
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m mllm_swap.tune.quick_vqa MODEL VQA_JSONL [--limit N] [--out FILE]``: print/write the scores."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="checkpoint directory or tiny MLLM id")
    parser.add_argument("vqa", help="vqa_test.jsonl")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    loaded = load_mllm(args.model, device="cpu")
    result = evaluate_vqa(loaded.model, loaded.processor, args.vqa, args.limit, args.batch_size)
    print(
        f"accuracy {result['accuracy']:.3f} on {result['n']} questions; per kind {result['per_kind']}; "
        f"chance {result['chance']}"
    )
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
