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
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from mllm_swap.checkpoints import load_mllm
from mllm_swap.families.base import to_model

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
        from align.distributed import launch_state

        state = launch_state()
        if state.num_processes > 1:  # data parallel under `accelerate launch`: one replica per rank
            device = str(state.device)  # cuda:<local rank>, or cpu under ACCELERATE_USE_CPU
            self.accelerator = state
            self._rank, self._world_size = state.process_index, state.num_processes
        self.pretrained = str(pretrained)
        loaded = load_mllm(self.pretrained, dtype=dtype, device=device)
        self._model, self.family = loaded.model, loaded.family.name
        self.prompter = loaded.family.prompter(loaded.processor, image_aspect_ratio)
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
        inputs = to_model(self.prompter.encode(prompts, images, padding_side="left"), self._model)
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
        full_in = to_model(self.prompter.encode([f for _, f in pairs], images, padding_side="right"), self._model)
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
