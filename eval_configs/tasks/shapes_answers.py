"""The shapes tasks' answer normalisation, shared by the lmms-eval tasks (``utils.py`` beside this file) and
``mllm_swap.tune.quick_vqa``. Self-contained (standard library only), so the shipped tasks run in an lmms-eval
installation without mllm-swap."""

from __future__ import annotations

import re
import string

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBER_WORDS = {word: str(i) for i, word in enumerate(_NUMBERS)} | {"none": "0"}
ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """The VQA answer normalisation: first line, lower case, punctuation dropped (hyphens and slashes
    become spaces, a decimal point stays), articles dropped, number words as digits, whitespace
    collapsed. ``"The Three."``, ``"3"`` and ``"three"`` are all ``"3"``; ``"Bottom-Left"`` is
    ``"bottom left"``."""
    line = text.strip().split("\n")[0].lower() if text.strip() else ""
    line = re.sub(r"[-/]", " ", line)
    line = re.sub(r"(?<!\d)\.|\.(?!\d)", "", line)  # a period, unless inside a number like 2.5
    line = line.translate(str.maketrans("", "", string.punctuation.replace(".", "")))
    return " ".join(NUMBER_WORDS.get(w, w) for w in line.split() if w not in ARTICLES)
