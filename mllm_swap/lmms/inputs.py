"""Loading a checkpoint for scoring, and turning (context, images) into the family's model inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mllm_swap.chat_templates import chat_template
from mllm_swap.tune.conversations import expand2square, pad_colour

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) means the first GPU when there is one, else the CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it, else float32; otherwise a name from ``_DTYPES``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"mllm_swap: dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_mllm(
    path: str, dtype: str | torch.dtype = "auto", device: str | None = "auto"
) -> tuple[Any, Any, str]:
    """Load a checkpoint this project writes: ``(model in eval mode, processor, family name)``.

    The family comes from :func:`mllm_swap.families.detect_family`; HF Llava and IDEFICS weights are
    read straight into ``dtype``, original LLaVA checkpoints go through their family's conversion.
    """
    import mllm_swap  # noqa: F401  (registers custom vision towers with transformers' Auto classes)
    from mllm_swap.families import detect_family
    from mllm_swap.families.base import quiet_transformers

    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype, device_)
    family = detect_family(path)
    if family.name == "llava_original":
        loaded = family.load(Path(path))
        model, processor = loaded.model.to(dtype_), loaded.processor
    elif family.name in ("llava_hf", "idefics"):
        from transformers import AutoModelForImageTextToText, AutoProcessor, IdeficsForVisionText2Text

        loader = IdeficsForVisionText2Text if family.name == "idefics" else AutoModelForImageTextToText
        with quiet_transformers():
            model = loader.from_pretrained(path, dtype=dtype_)
            processor = AutoProcessor.from_pretrained(path)
    else:
        raise ValueError(
            f"{path}: {family.name} checkpoints have no transformers generation path to score with lmms-eval; "
            "supported: HF Llava/LlavaNext, original LLaVA-1.5, IDEFICS"
        )
    return model.to(device_).eval(), processor, family.name


class Prompter:
    """Turns (context, images) into the family's prompt text and batched model inputs.

    ``family`` is ``idefics`` (``User:``/``Assistant:`` turns, images interleaved) or any Llava family
    (the processor's chat template, else LLaVA-1.5's).
    """

    def __init__(self, processor: Any, family: str, image_aspect_ratio: str = "pad") -> None:
        if image_aspect_ratio not in ("pad", "none"):
            raise ValueError(
                f"mllm_swap: image_aspect_ratio must be 'pad' or 'none', got {image_aspect_ratio!r}"
            )
        self.processor, self.family = processor, family
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_token_id = self.tokenizer.pad_token_id
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self.template = None if family == "idefics" else chat_template(processor)
        self.pad = image_aspect_ratio == "pad" and hasattr(processor, "image_processor")
        self.eou = "<end_of_utterance>" if "<end_of_utterance>" in self.tokenizer.get_vocab() else ""

    def prompt(self, context: str, n_images: int, reply: str | None = None) -> str:
        """The text before the answer (or, with ``reply``, the whole exchange) with image placeholders."""
        images = "" if self.image_token in context else self.image_token * n_images
        if self.family == "idefics":
            text = f"User:{images}{context}{self.eou}\nAssistant:"
            return text if reply is None else f"{text} {reply}"
        content = [{"type": "image"}] * (0 if self.image_token in context else n_images)
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": context}]}]
        if reply is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        return self.processor.apply_chat_template(
            messages, chat_template=self.template, add_generation_prompt=reply is None, tokenize=False
        )

    def prompt_and_full(self, context: str, continuation: str, n_images: int) -> tuple[str, str]:
        """The prompt, and the prompt followed by the continuation as the family renders a reply."""
        prompt = self.prompt(context, n_images)
        reply = continuation.lstrip()
        rendered = self.prompt(context, n_images, reply)
        at = rendered.find(reply, len(prompt)) if rendered.startswith(prompt) else -1
        if at < 0:
            raise ValueError(
                f"mllm_swap: the chat template does not render the reply {reply!r} after the prompt"
            )
        return prompt, rendered[: at + len(reply)]

    def encode(self, texts: list[str], images: list[list[Image.Image]], padding_side: str) -> dict:
        """Tokenize a batch of prompts (placeholders expanded to image tokens), padded on one side."""
        if self.pad:
            background = pad_colour(self.processor)
            images = [[expand2square(im, background) for im in ims] for ims in images]
        self.tokenizer.padding_side = padding_side
        if self.family == "idefics":
            samples = []
            for text, ims in zip(texts, images, strict=True):
                pieces = text.split(self.image_token)
                sample = [pieces[0]]
                for image, piece in zip(ims, pieces[1:], strict=False):
                    sample += [image, piece]
                samples.append([p for p in sample if not isinstance(p, str) or p])
            return self.processor(
                text=samples, padding=True, return_tensors="pt", add_end_of_utterance_token=False
            )
        flat = [im for ims in images for im in ims]
        bos = self.tokenizer.bos_token
        return self.processor(
            text=texts,
            images=flat or None,
            padding=True,
            return_tensors="pt",
            add_special_tokens=not (bos and all(t.startswith(bos) for t in texts)),
        )
