"""The lmms-eval model ``mllm_swap``: scores any checkpoint this project writes.

``lmms-eval --model mllm_swap --model_args pretrained=DIR[,dtype=bfloat16,device=cuda,batch_size=8]``
finds this class through the ``lmms_eval.models`` entry point (``manifest`` below). Prompts use the
family's own format (the processor's chat template for HF Llava, ``User:``/``Assistant:`` turns for
IDEFICS). ``loglikelihood`` returns the continuation's negative log-likelihood summed over its tokens,
the quantity lmms-eval 0.7.3 ranks with ``argmin``. A failed generation raises; nothing is silently
scored as an empty answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from align.io import read_json
from mllm_swap.conversations import chat_template, expand2square, pad_colour

MODEL_ID = "mllm_swap"
_HARNESS_KWARGS = {"max_batch_size"}  # passed by lmms-eval's CLI to every model; unused here


def manifest():
    """Entry-point payload for ``lmms_eval.models``: where lmms-eval finds the ``mllm_swap`` model.

    A callable, so that importing this module never imports ``lmms_eval.models`` (whose own import
    loads the entry points, i.e. this module).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MllmSwap")


class MllmSwap(lmms):
    """lmms-eval model over HF Llava, IDEFICS and converted original-LLaVA checkpoints."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 32,
        image_aspect_ratio: str = "pad",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - _HARNESS_KWARGS)
        if unknown:
            raise ValueError(
                f"mllm_swap: unknown model_args {unknown}; expected pretrained, device, dtype, "
                "batch_size, max_new_tokens, image_aspect_ratio"
            )
        if str(batch_size).startswith("auto"):
            raise ValueError(f"mllm_swap: batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size_per_gpu < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"mllm_swap: batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}"
            )
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > 1:  # data parallel under `accelerate launch`: one replica per rank
            device = f"cuda:{state.local_process_index}"
            self.accelerator = state
            self._rank, self._world_size = state.process_index, state.num_processes
        self.pretrained = str(pretrained)
        self._model, processor, self.family = load_mllm(self.pretrained, dtype=dtype, device=device)
        self.prompter = Prompter(processor, self.family, image_aspect_ratio)
        self._device = next(self._model.parameters()).device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MllmSwap:
        """Build from ``--model_args``; keys given there win over the CLI's (``--batch_size``, ``--device``)."""
        from lmms_eval.utils import simple_parse_args_string

        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.update(simple_parse_args_string(arg_string or ""))
        return cls(**args)

    @property
    def model(self) -> torch.nn.Module:
        """The loaded multimodal model (eval mode)."""
        return self._model

    @property
    def device(self) -> torch.device:
        """Device holding the model."""
        return self._device

    @property
    def batch_size(self) -> int:
        """Requests per forward pass."""
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ helpers
    def _visuals(self, doc_to_visual: Callable, doc_id: int, task: str, split: str) -> list[Image.Image]:
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
        return _as_images(visuals, task, doc_id)

    def _to_device(self, inputs: dict) -> dict:
        dtype = self._model.dtype
        return {
            k: v.to(self._device, dtype=dtype if v.is_floating_point() else None)
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }

    def _batches(self, requests: list[Instance], key: Callable[[tuple], str]) -> list[list[int]]:
        """Indices of requests grouped by ``key``, longest context first, in batch_size chunks."""
        order = sorted(range(len(requests)), key=lambda i: -len(str(requests[i].args[0])))
        groups: dict[str, list[int]] = {}
        for i in order:
            groups.setdefault(key(requests[i].args), []).append(i)
        n = self.batch_size
        return [idx[s : s + n] for idx in groups.values() for s in range(0, len(idx), n)]

    @torch.inference_mode()
    def _generate(self, contexts: list[str], images: list[list[Image.Image]], gen_kwargs: dict) -> list[str]:
        """Generate one continuation per context with lmms-eval's ``gen_kwargs`` semantics."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0
        options: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            "do_sample": do_sample,
            "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
            "pad_token_id": self.prompter.pad_token_id,
        }
        if do_sample:
            options["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        if until:
            options.update(stop_strings=until, tokenizer=self.prompter.tokenizer)
        prompts = [self.prompter.prompt(c, len(ims)) for c, ims in zip(contexts, images, strict=True)]
        inputs = self._to_device(self.prompter.encode(prompts, images, padding_side="left"))
        output = self._model.generate(**inputs, **options)
        texts = self.prompter.tokenizer.batch_decode(
            output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        return [_cut(text, until) for text in texts]

    # ------------------------------------------------------------ lmms interface
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched generation; requests with the same ``gen_kwargs`` share a batch."""
        results: list[str | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="mllm_swap generate")
        for batch in self._batches(requests, key=lambda a: json.dumps(a[1], sort_keys=True, default=str)):
            args = [requests[i].args for i in batch]
            images = [self._visuals(a[2], a[3], a[4], a[5]) for a in args]
            try:
                texts = self._generate([a[0] for a in args], images, args[0][1])
            except Exception as err:
                docs = ", ".join(f"{a[4]}/{a[3]}" for a in args)
                raise RuntimeError(
                    f"mllm_swap: generation failed for {docs} ({self.pretrained}): {err}"
                ) from err
            for i, text in zip(batch, texts, strict=True):
                results[i] = text
            pbar.update(len(batch))
        pbar.close()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round generation: later rounds come from the task's ``doc_to_text`` callback.

        The callback gets ``previous_output``, ``round_idx`` and ``previous_round_info`` and returns
        ``(visuals, context, terminal, round_outputs, round_info)``; each request's answer is its list
        of per-round outputs.
        """
        results = []
        for req in tqdm(requests, disable=self.rank != 0, desc="mllm_swap multi-round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            images = self._visuals(doc_to_visual, doc_id, task, split)
            outputs: list[str] = []
            info = None
            for round_idx in range(10_000):
                if round_idx > 0:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc, previous_output=outputs, round_idx=round_idx, previous_round_info=info
                    )
                    outputs = list(outputs or [])
                    if terminal:
                        break
                    images = _as_images(visuals, task, doc_id)
                try:
                    outputs.append(self._generate([context], [images], gen_kwargs)[0])
                except Exception as err:
                    raise RuntimeError(
                        f"mllm_swap: round {round_idx} failed for {task}/{doc_id} ({self.pretrained}): {err}"
                    ) from err
            results.append(outputs)
        return results

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Negative log-likelihood of each continuation given its context and images.

        Returned as ``GenerationResult(text=(nll, is_greedy))``: lmms-eval 0.7.3 passes that pair
        through unchanged (a bare tuple would be stringified) and picks the ``argmin`` choice.
        """
        results: list[GenerationResult | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="mllm_swap loglikelihood")
        for batch in self._batches(requests, key=lambda a: ""):
            args = [requests[i].args for i in batch]
            images = [self._visuals(a[2], a[3], a[4], a[5]) for a in args]
            conts = [a[1] if isinstance(a[1], str) else a[1](self.task_dict[a[4]][a[5]][a[3]]) for a in args]
            scored = self._score([a[0] for a in args], conts, images)
            for i, pair in zip(batch, scored, strict=True):
                results[i] = GenerationResult(text=pair)
            pbar.update(len(batch))
        pbar.close()
        return results

    def _score(self, contexts: list[str], conts: list[str], images: list[list]) -> list[tuple[float, bool]]:
        pairs = [
            self.prompter.prompt_and_full(c, str(t), len(ims))
            for c, t, ims in zip(contexts, conts, images, strict=True)
        ]
        prompt_in = self.prompter.encode([p for p, _ in pairs], images, padding_side="right")
        full_in = self._to_device(self.prompter.encode([f for _, f in pairs], images, padding_side="right"))
        ids, mask = full_in["input_ids"], full_in["attention_mask"]
        logits = self._model(**full_in).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        out = []
        for row, n_prompt in enumerate(prompt_in["attention_mask"].sum(1).tolist()):
            n_full = int(mask[row].sum())
            prompt_ids = prompt_in["input_ids"][row, :n_prompt].to(ids.device)
            if n_full < n_prompt or not torch.equal(ids[row, :n_prompt], prompt_ids):
                raise RuntimeError(
                    f"mllm_swap: the tokens of context+continuation do not start with the context's "
                    f"tokens (continuation {conts[row]!r}); cannot score it"
                )
            target = ids[row, n_prompt:n_full]
            pred = logprobs[row, n_prompt - 1 : n_full - 1]
            nll = -pred.gather(-1, target[:, None]).sum().item()
            out.append((float(nll), bool((pred.argmax(-1) == target).all())))
        return out


def _as_images(visuals: Any, task: str, doc_id: int) -> list[Image.Image]:
    """The doc's visuals as RGB PIL images; other media (video, audio) is refused by name."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    images = []
    for item in visuals:
        if isinstance(item, (list, tuple)):
            images.extend(_as_images(item, task, doc_id))
        elif isinstance(item, Image.Image):
            images.append(item.convert("RGB"))
        else:
            raise ValueError(
                f"mllm_swap: {task}/{doc_id} gave a visual of type {type(item).__name__}; "
                "only PIL images are supported (no video or audio)"
            )
    return images


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


# ---------------------------------------------------------------------------- loading and prompts
_LLAVA_TYPES = {"llava", "llava_next"}
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


def detect_family(path: str) -> str:
    """``llava`` (HF Llava/LlavaNext), ``idefics`` or ``llava_original`` from the checkpoint's config."""
    config_path = Path(path) / "config.json"
    if Path(path).is_dir():
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: not found; expected a model checkpoint directory")
        config = read_json(config_path)
    else:  # a hub id: let transformers resolve it (fails offline unless cached)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path).to_dict()
    if "mm_vision_tower" in config:
        return "llava_original"
    model_type = config.get("model_type")
    if model_type in _LLAVA_TYPES:
        return "llava"
    if model_type == "idefics":
        return "idefics"
    raise ValueError(
        f"{config_path}: model_type {model_type!r} is not a supported family; expected one of "
        f"{sorted(_LLAVA_TYPES | {'idefics'})} or an original-LLaVA config (mm_vision_tower)"
    )


def load_mllm(
    path: str, dtype: str | torch.dtype = "auto", device: str | None = "auto"
) -> tuple[Any, Any, str]:
    """Load a checkpoint this project writes: ``(model in eval mode, processor, family)``."""
    import mllm_swap  # noqa: F401  (registers custom vision towers with transformers' Auto classes)

    device_, family = resolve_device(device), detect_family(path)
    dtype_ = resolve_dtype(dtype, device_)
    if family == "llava_original":
        from mllm_swap.families.llava_original import load_llava_original

        model, processor = load_llava_original(path)[:2]
        model = model.to(dtype_)
        family = "llava"
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor, IdeficsForVisionText2Text

        loader = IdeficsForVisionText2Text if family == "idefics" else AutoModelForImageTextToText
        model = loader.from_pretrained(path, dtype=dtype_)
        processor = AutoProcessor.from_pretrained(path)
    return model.to(device_).eval(), processor, family


class Prompter:
    """Turns (context, images) into the family's prompt text and batched model inputs."""

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
        self.template = chat_template(processor) if family == "llava" else None
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
