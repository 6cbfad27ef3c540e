"""Words of the shapes world: vocabulary, captions, questions, VQA options and prompt templates."""

from __future__ import annotations

import numpy as np

COLOR_NAMES = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "cross"]
# 3x3 grid cells, row-major; names are single words so exact-match answers work.
POSITIONS = [
    "top-left", "top", "top-right",
    "left", "center", "right",
    "bottom-left", "bottom", "bottom-right",
]  # fmt: skip
# Index = number of objects; "four" never occurs but keeps count questions at 4 options.
COUNT_WORDS = ["zero", "one", "two", "three", "four"]

WHERE = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

QUESTIONS = {
    "color": [
        "What color is the largest shape?",
        "What is the color of the biggest shape?",
        "Which color does the main shape have?",
    ],
    "shape": [
        "What shape is the largest object?",
        "Which shape is the biggest object?",
        "What kind of shape is the main object?",
    ],
    "count": [
        "How many shapes are there?",
        "How many objects are in the image?",
        "How many shapes can you see?",
    ],
    "position": [
        "Where is the largest shape?",
        "In which part of the image is the biggest shape?",
        "Where is the main object located?",
    ],
}
ANSWER_HINT = " Answer with one word."
KINDS = list(QUESTIONS)

TEMPLATES = {
    "color": [
        "a photo of a shape colored {}.",
        "a shape in {}.",
        "a drawing of something {}.",
        "the color {} on a plain background.",
    ],
    "shape": [
        "a photo of a {}.",
        "a {}.",
        "a drawing of a {}.",
        "a {} on a plain background.",
    ],
}


def article(word: str) -> str:
    """``"an orange"``, ``"a red"``: the indefinite article joined to ``word``."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def where(position: str) -> str:
    """Phrase for a grid position: ``"in the center"``, ``"at the top-left"``, ..."""
    return WHERE.get(position, f"at the {position}")


def short_caption(attrs: dict) -> str:
    """``"a red circle"``: the main object's colour and shape."""
    return f"{article(attrs['color'])} {attrs['shape']}"


# Web alt-text: the main object named by colour and shape, in a few phrasings; never a count, a position
# or the other objects (what ``tiny-clip-shapes`` learns from; see ``align.pretrain.clip``).
ALT_TEXT = [
    "{a_color} {shape}",
    "{color} {shape}",
    "a photo of {a_color} {shape}",
    "a drawing of {a_color} {shape}",
    "{color} {shape} icon",
    "{color} {shape} on a plain background",
    "simple {color} {shape} illustration",
    "{a_color} {shape} shape",
]


def alt_caption(attrs: dict, variant: int) -> str:
    """Alt-text phrasing ``variant`` (modulo ``len(ALT_TEXT)``) of the main object, e.g. ``"red circle icon"``."""
    template = ALT_TEXT[variant % len(ALT_TEXT)]
    return template.format(a_color=article(attrs["color"]), color=attrs["color"], shape=attrs["shape"])


def long_caption(attrs: dict) -> str:
    """Every object with its position, main first, e.g. ``"two shapes: a large red circle in ..."``."""
    objects = attrs["objects"]
    many = len(objects) > 1
    parts = [
        f"{article(obj['size'] if many else obj['color'])}{' ' + obj['color'] if many else ''} "
        f"{obj['shape']} {where(obj['position'])}"
        for obj in objects
    ]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = "shapes" if many else "shape"
    return f"{COUNT_WORDS[len(objects)]} {noun}: {listed}."


def statement(attrs: dict, kind: str) -> str:
    """A statement about one attribute only (MMVP-VLM style), e.g. ``"three shapes"``,
    ``"the largest shape at the top-left"``, ``"a red shape"``, ``"a circle"``."""
    if kind == "count":
        return f"{COUNT_WORDS[attrs['count']]} {'shape' if attrs['count'] == 1 else 'shapes'}"
    if kind == "position":
        return f"the largest shape {where(attrs['position'])}"
    if kind == "color":
        return f"{article(attrs['color'])} shape"
    if kind == "shape":
        return article(attrs["shape"])
    raise ValueError(f"no statement for kind {kind!r}; expected one of {KINDS}")


def answer(attrs: dict, kind: str) -> str:
    """The single-word answer to a question of ``kind`` about the main object."""
    if kind == "count":
        return COUNT_WORDS[attrs["count"]]
    return attrs[kind]


def _vocab(kind: str) -> list[str]:
    return {"color": COLOR_NAMES, "shape": SHAPES, "count": COUNT_WORDS[1:], "position": POSITIONS}[kind]


def instruct_entry(sid: str, image: str, attrs: dict, rng: np.random.Generator) -> dict:
    """A LLaVA conversation with one question per kind (shuffled), ``<image>`` in the first turn."""
    turns = []
    for k, idx in enumerate(rng.permutation(len(KINDS))):
        kind = KINDS[int(idx)]
        question = QUESTIONS[kind][int(rng.integers(len(QUESTIONS[kind])))] + ANSWER_HINT
        turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer(attrs, kind)})
    return {"id": sid, "image": image, "conversations": turns}


def vqa_rows(sid: str, image: str, attrs: dict, rng: np.random.Generator) -> list[dict]:
    """One multiple-choice row per kind: 4 shuffled options containing the answer."""
    rows = []
    for kind in KINDS:
        truth = answer(attrs, kind)
        others = [v for v in _vocab(kind) if v != truth]
        picks = [others[int(i)] for i in rng.choice(len(others), size=min(3, len(others)), replace=False)]
        options = [truth, *picks]
        options = [options[int(i)] for i in rng.permutation(len(options))]
        question = QUESTIONS[kind][int(rng.integers(len(QUESTIONS[kind])))] + ANSWER_HINT
        rows.append(
            {
                "id": f"{sid}-{kind}",
                "image": image,
                "question": question,
                "options": options,
                "answer": truth,
                "kind": kind,
            }
        )
    return rows


def classes_json() -> dict:
    """Content of ``classes.json``: class names per attribute and CLIP-style templates."""
    return {
        "color": COLOR_NAMES,
        "shape": SHAPES,
        "position": POSITIONS,
        "count": COUNT_WORDS[1:4],
        "templates": TEMPLATES,
    }


def shapes_corpus() -> list[str]:
    """Every kind of sentence the shapes world produces (for building tokenizers offline)."""
    lines = [short_caption({"color": c, "shape": s}) for c in COLOR_NAMES for s in SHAPES]
    lines += [alt_caption({"color": c, "shape": s}, k) for c in COLOR_NAMES for s in SHAPES for k in range(len(ALT_TEXT))]
    for i, (c, s, p) in enumerate((c, s, p) for c in COLOR_NAMES for s in SHAPES for p in POSITIONS):
        main = {"color": c, "shape": s, "position": p, "size": "large"}
        small = {
            "color": COLOR_NAMES[i % 6],
            "shape": SHAPES[i % 4],
            "position": POSITIONS[i % 9],
            "size": "small",
        }
        lines.append(long_caption({"objects": [main]}))
        lines.append(long_caption({"objects": [main, small, small]}))
    lines += [q + ANSWER_HINT for qs in QUESTIONS.values() for q in qs]
    lines += [t.format(c) for t in TEMPLATES["color"] for c in COLOR_NAMES]
    lines += [t.format(s) for t in TEMPLATES["shape"] for s in SHAPES]
    lines += POSITIONS + COUNT_WORDS
    return lines
