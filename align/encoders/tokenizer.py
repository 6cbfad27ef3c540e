"""Offline tokenizers for the tiny models, trained with ``tokenizers`` on a fixed corpus."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

COLORS = [
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "gray",
    "pink",
    "cyan",
    "brown",
]
SHAPES = [
    "circle",
    "square",
    "triangle",
    "cross",
    "star",
    "rectangle",
    "diamond",
    "shape",
    "shapes",
    "object",
]
WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "to",
    "is",
    "are",
    "there",
    "this",
    "that",
    "what",
    "which",
    "how",
    "many",
    "where",
    "colour",
    "color",
    "shape",
    "photo",
    "picture",
    "image",
    "small",
    "large",
    "big",
    "tiny",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "zero",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "centre",
    "middle",
    "upper",
    "lower",
    "corner",
    "side",
    "and",
    "or",
    "with",
    "without",
    "yes",
    "no",
    "answer",
    "question",
    "describe",
    "show",
    "shows",
    "showing",
    "contains",
    "containing",
    "count",
    "number",
    "position",
    "located",
    "background",
    "plain",
    "drawing",
    "rendering",
    "close",
    "up",
    "view",
    "object",
    "objects",
    "it",
    "its",
    "they",
    "user",
    "assistant",
    "system",
    "please",
    "word",
    "single",
]


def corpus() -> list[str]:
    """A deterministic corpus covering the shapes world's vocabulary plus some generic English."""
    lines = [" ".join(WORDS), " ".join(COLORS), " ".join(SHAPES)]
    for c in COLORS:
        for s in SHAPES:
            lines.append(f"a photo of a {c} {s}. there is one {c} {s} in the center of the image.")
    lines += [f"How many shapes are there? {n}" for n in ("one", "two", "three", "1", "2", "3", "4")]
    lines.append("USER: <image>\nWhat colour is the shape? ASSISTANT: red")
    lines.append("0123456789 .,;:!?'\"()[]{}<>-_/\\|@#$%^&*+=~`")
    return lines


def build_bpe_tokenizer(
    vocab_size: int = 512,
    *,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    unk_token: str = "<unk>",
    pad_token: str = "<pad>",
    extra_special_tokens: dict[str, str] | None = None,
    model_max_length: int = 256,
    add_eos: bool = False,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with Llama/CLIP-style special tokens.

    Ids: unk 0, bos 1, pad 2, eos 3, then ``extra_special_tokens`` in order. ``add_eos`` appends eos to
    every encoded text (CLIP text towers pool at the eos token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    extra = dict(extra_special_tokens or {})
    specials = [unk_token, bos_token, pad_token, eos_token, *extra.values()]
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A" + (f" {eos_token}" if add_eos else ""),
        pair=f"{bos_token} $A {bos_token} $B" + (f" {eos_token}" if add_eos else ""),
        special_tokens=[(t, tok.token_to_id(t)) for t in (bos_token, eos_token)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token=unk_token,
        pad_token=pad_token,
        extra_special_tokens=extra,
        model_max_length=model_max_length,
    )


def build_wordpiece_tokenizer(vocab_size: int = 512, model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP]) for the tiny sentence encoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789"),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
