"""A family's prompt format: (context, images) -> prompt text -> batched model inputs.

:class:`Prompter` is the chat-template format (HF Llava, original LLaVA: the processor's chat template,
else LLaVA-1.5's); a family with another format subclasses it (``families.idefics.IdeficsPrompter``)
and names it as its ``prompter_class``. Used by the lmms-eval model and by the swap's drift check.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from mllm_swap.chat_templates import chat_template


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad to a square canvas of ``background`` colour, image centred (LLaVA-1.5's ``pad``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def pad_colour(processor: Any) -> tuple[int, int, int]:
    """The image processor's mean as an RGB colour (the padding LLaVA-1.5 uses)."""
    mean = getattr(processor.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    if isinstance(mean, (int, float)):
        mean = [mean] * 3
    return tuple(int(x * 255) for x in mean)


class Prompter:
    """Turns (context, images) into the family's prompt text and batched model inputs."""

    def __init__(self, processor: Any, image_aspect_ratio: str = "pad") -> None:
        if image_aspect_ratio not in ("pad", "none"):
            raise ValueError(
                f"mllm_swap: image_aspect_ratio must be 'pad' or 'none', got {image_aspect_ratio!r}"
            )
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_token_id = self.tokenizer.pad_token_id
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self.pad = image_aspect_ratio == "pad" and hasattr(processor, "image_processor")

    def placeholders(self, context: str, n_images: int) -> int:
        """How many image placeholders to add before ``context`` (none when it places them itself)."""
        return 0 if self.image_token in context else n_images

    def prompt(self, context: str, n_images: int, reply: str | None = None) -> str:
        """The text before the answer (or, with ``reply``, the whole exchange) with image placeholders."""
        content = [{"type": "image"}] * self.placeholders(context, n_images)
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": context}]}]
        if reply is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        return self.processor.apply_chat_template(
            messages,
            chat_template=chat_template(self.processor),
            add_generation_prompt=reply is None,
            tokenize=False,
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
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, padding_side
        try:
            return self._tokenize(texts, images)
        finally:
            self.tokenizer.padding_side = side

    def _tokenize(self, texts: list[str], images: list[list[Image.Image]]) -> dict:
        flat = [im for ims in images for im in ims]
        bos = self.tokenizer.bos_token
        return self.processor(
            text=texts,
            images=flat or None,
            padding=True,
            return_tensors="pt",
            add_special_tokens=not (bos and all(t.startswith(bos) for t in texts)),
        )
