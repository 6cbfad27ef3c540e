"""The AlignedEncoder artifact: a language-aligned vision encoder saved as a directory.

Interface (stable; :mod:`align.modeling_aligned_tower` wraps it as an HF vision tower)::

    enc = load_aligned(dir)                      # or align.load.load_vision_encoder(dir)
    enc(pixel_values, layer=-1) -> [B, N, D_out] # aligned per-patch tokens by the token rule
    enc.tokens(pixel_values, layer=-1)           # the same
    enc.encode_image(pixel_values) -> [B, D]     # global embedding, L2-normalized
    enc.encode_text(list_of_str) -> [N, D]       # joint-space text embedding, L2-normalized
    enc.backbone, enc.text (loaded on first use), enc.image_head, enc.text_head (or None)
    enc.token_rule, enc.num_tokens (= N), enc.out_dim (= D_out = enc.embed_dim), enc.num_prefix_tokens
    enc.preprocess                               # the backbone's own image preprocessing
    enc.image_head_config                        # JSON config that ``build_token_head`` rebuilds

Token rules: with an image head the prefix tokens are folded in (``num_prefix_tokens == 0``): SAIL gives
``head([CLS ; patch_i])``, freeze_align ``patch_proj(patch_i) + cls_proj(CLS)`` (see
:mod:`align.heads`). Without a head (KUEA: a fine-tuned backbone) the rule is ``patch`` (prefix
tokens dropped) or ``all`` (kept), and the global embedding is the backbone's ``image_pool`` pooling.

Directory: ``aligned_encoder.json`` (method, backbone and text specs, head configs, token rule, logit
scale, training record, metrics), ``model.safetensors`` (``image_head.*``, ``text_head.*`` and, when the
backbone was fine-tuned, ``backbone.*``), ``preprocess.json`` (+ the backbone's own
``preprocessor_config.json`` when it has one), a generated model card ``README.md`` and, for a fine-tuned
backbone saved whole (KUEA), ``backbone/``: a complete checkpoint of the backbone and its text tower.

The directory travels: the backbone and text sources are recorded as ids (tiny ids, hub ids,
``openclip:NAME/TAG``), as ``./backbone``, or as paths relative to the artifact (``align.paths.portable``);
no absolute path of the machine that wrote it is stored.
``checksums.json`` (written last) is verified by :func:`load_aligned` (see :mod:`align.integrity`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from align.artifact_card import model_card
from align.encoders.base import TextEncoder, VisionEncoder
from align.encoders.registry import load_text_backbone, load_vision_backbone, resolve
from align.heads import TOKEN_RULES, build_text_head, build_token_head
from align.integrity import record_checksums, verify_dir
from align.io import atomic_path, read_json, read_tensors, write_json
from align.paths import locate, portable, portable_tree

FORMAT, VERSION = "mllm-swap aligned encoder", 1
CONFIG_FILE, WEIGHTS_FILE, BACKBONE_DIR = "aligned_encoder.json", "model.safetensors", "backbone"
HEADLESS_RULES = ("patch", "all")

__all__ = ["AlignedEncoder", "load_aligned", "patch_drift", "save_aligned"]


class AlignedEncoder(VisionEncoder):
    """A backbone plus optional image/text heads and a token rule (see the module docstring)."""

    kind = "aligned"

    def __init__(
        self,
        backbone: VisionEncoder,
        text: TextEncoder | str | None,
        image_head: nn.Module | None = None,
        text_head: nn.Module | None = None,
        *,
        method: str,
        image_pool: str | None = None,
        token_rule: str = "patch",
        logit_scale: float | None = None,
        logit_bias: float | None = None,
        text_spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone, self.image_head, self.text_head = backbone, image_head, text_head
        self.method = method
        if image_head is None:
            if token_rule not in HEADLESS_RULES:
                raise ValueError(
                    f"token_rule {token_rule!r}: without an image head use one of {HEADLESS_RULES}"
                )
            self.image_pool = image_pool or ("projected" if "projected" in backbone.poolings else "cls")
            self.token_rule = token_rule
        else:
            self.image_pool = None
            self.token_rule = TOKEN_RULES[image_head.config["kind"]]
        self.text_encoder = text if isinstance(text, TextEncoder) else None
        self._text_source = text.source if isinstance(text, TextEncoder) else text
        self._text_spec = text.spec if isinstance(text, TextEncoder) else text_spec
        self.logit_scale, self.logit_bias = logit_scale, logit_bias
        self.source = backbone.source
        self.preprocess = backbone.preprocess
        self.image_size, self.patch_size = backbone.image_size, backbone.patch_size
        self.num_layers = backbone.num_layers
        keep_prefix = image_head is None and token_rule == "all"
        self.num_prefix_tokens = backbone.num_prefix_tokens if keep_prefix else 0
        self.embed_dim = int(image_head.config["out_dim"]) if image_head is not None else backbone.embed_dim
        self.poolings = ("projected", "mean")

    # -- image side ------------------------------------------------------------------------------
    @property
    def out_dim(self) -> int:
        """Width of the aligned tokens an MLLM sees."""
        return self.embed_dim

    @property
    def image_head_config(self) -> dict[str, Any] | None:
        return dict(self.image_head.config) if self.image_head is not None else None

    def forward(self, pixel_values: Tensor, layer: int = -1) -> Tensor:
        """Aligned tokens ``[B, num_tokens, out_dim]`` of backbone layer ``layer`` by the token rule."""
        tokens = self.backbone(pixel_values, layer)
        prefix = self.backbone.num_prefix_tokens
        if self.image_head is not None:
            return self.image_head(tokens, prefix)
        return tokens[:, prefix:] if self.token_rule == "patch" else tokens

    def tokens(self, pixel_values: Tensor, layer: int = -1) -> Tensor:
        """Alias of ``forward``."""
        return self(pixel_values, layer)

    @property
    def projection_dim(self) -> int:
        if self.image_head is not None:
            return self.embed_dim
        return self.backbone.pooled_dim(self.image_pool)

    def projected(self, pixel_values: Tensor) -> Tensor:
        """Global image embedding (unnormalized): the head's pooling, or the backbone's ``image_pool``."""
        if self.image_head is None:
            return self.backbone.pooled(pixel_values, self.image_pool)
        return self.image_head.pool(self.backbone(pixel_values), self.backbone.num_prefix_tokens)

    def cls_token(self, tokens: Tensor) -> Tensor:
        raise ValueError(
            f"{self.source}: aligned encoders have no CLS output; use pool 'projected' or 'mean'"
        )

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Global image embedding ``[B, D]``, L2-normalized."""
        return F.normalize(self.projected(pixel_values), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any], pool: str = "projected") -> Tensor:
        """Preprocess PIL images and return their (normalized, for ``projected``) embeddings."""
        pixels = self.preprocess(images).to(self._device(), self._dtype())
        return self.encode_image(pixels) if pool == "projected" else self.pooled(pixels, pool)

    # -- text side -------------------------------------------------------------------------------
    @property
    def text(self) -> TextEncoder:
        """The text encoder, loaded from its recorded source on first use."""
        if self.text_encoder is None:
            if not self._text_source:
                raise ValueError(f"{self.source}: this aligned encoder has no text side")
            pooling = (self._text_spec or {}).get("pooling")
            loaded = load_text_backbone(self._text_source, pooling=pooling if pooling != "projected" else None)
            self.text_encoder = loaded.to(self._device()).eval().requires_grad_(False)
        return self.text_encoder

    @property
    def text_spec(self) -> dict[str, Any] | None:
        return self.text_encoder.spec if self.text_encoder is not None else self._text_spec

    def text_features(self, texts: Sequence[str]) -> Tensor:
        """Joint-space text embeddings (unnormalized) of one batch of strings."""
        text = self.text
        batch = {k: v.to(self._device()) for k, v in text.tokenize(list(texts)).items()}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.text_head is None:
            return text.sentence_embedding(ids, mask)
        if getattr(self.text_head, "uses_tokens", False):
            return self.text_head(text.token_features(ids, mask), mask)
        return self.text_head(text.sentence_embedding(ids, mask))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Text embeddings ``[N, D]`` in the joint space, L2-normalized (float32, CPU)."""
        if isinstance(texts, str):
            raise TypeError("encode_text() takes a list of strings, not a single string")
        parts = [
            self.text_features(texts[i : i + batch_size]).float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
        out = torch.cat(parts) if parts else torch.empty(0, self.projection_dim)
        return F.normalize(out, dim=-1)

    def _device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def spec(self) -> dict[str, Any]:
        out = super().spec
        out.update(
            method=self.method,
            token_rule=self.token_rule,
            out_dim=self.out_dim,
            backbone=self.backbone.spec,
            text=self.text_spec,
            image_head=self.image_head_config,
            text_head=dict(self.text_head.config) if self.text_head is not None else None,
        )
        return out


@torch.no_grad()
def patch_drift(encoder: AlignedEncoder, pixel_values: Tensor) -> dict[str, float]:
    """How far per-patch outputs sit from the global (trained-on) output, averaged over images.

    ``mean_patch_cosine``: cosine of the mean per-patch output to the global output (SAIL trains the head
    on ``[CLS ; mean(patches)]`` and applies it to ``[CLS ; patch_i]``; freeze_align gives exactly 1).
    ``patch_cosine``: the mean over patches of each patch output's cosine to the global output.
    """
    tokens = encoder(pixel_values).float()
    glob = encoder.projected(pixel_values).float()
    mean_cos = F.cosine_similarity(tokens.mean(dim=1), glob, dim=-1)
    each_cos = F.cosine_similarity(tokens, glob.unsqueeze(1), dim=-1)
    return {"mean_patch_cosine": float(mean_cos.mean()), "patch_cosine": float(each_cos.mean())}


def _state(prefix: str, module: nn.Module | None) -> dict[str, Tensor]:
    if module is None:
        return {}
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_aligned(
    out_dir: str | os.PathLike,
    encoder: AlignedEncoder,
    *,
    include_backbone: bool = False,
    backbone_dir: str | os.PathLike | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``encoder`` as an artifact directory at ``out_dir`` (atomically) and return the path.

    ``include_backbone``: also store the backbone's weights (a fine-tuned backbone), its architecture
    re-loaded from its recorded source. ``backbone_dir``: a complete checkpoint of the (fine-tuned)
    backbone, loadable by ``load_vision_encoder`` (KUEA: its HF CLIP or open_clip export), copied into the
    artifact as ``backbone/`` and loaded from there, as is the text tower when the encoder's text source is
    the backbone's own (CLIP); the artifact then needs nothing outside itself. ``training``: a JSON-able
    record (data, steps, config); ``metrics``: JSON-able scores (zero-shot, patch drift) shown in the card.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_FILE).is_file())):
        raise ValueError(f"{out}: exists and is not an aligned-encoder artifact; refusing to replace it")
    if not encoder.backbone.source:
        raise ValueError(
            "save_aligned: the backbone has no source to reload it from (backbone.source is empty)"
        )
    own = f"./{BACKBONE_DIR}"
    backbone_ref = own if backbone_dir is not None else portable(encoder.backbone.source, out)
    text_ref = None
    if encoder._text_source:
        same = str(resolve(encoder._text_source)) == str(resolve(encoder.backbone.source))
        text_ref = own if same and backbone_dir is not None else portable(encoder._text_source, out)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "method": encoder.method,
        "backbone": {
            "source": backbone_ref,
            "spec": {**encoder.backbone.spec, "source": backbone_ref},
            "weights_included": include_backbone or backbone_dir is not None,
        },
        "text": {"source": text_ref, "spec": {**(encoder.text_spec or {}), "source": text_ref}} if text_ref else None,
        "image_head": encoder.image_head_config,
        "text_head": dict(encoder.text_head.config) if encoder.text_head is not None else None,
        "image_pool": encoder.image_pool,
        "token_rule": encoder.token_rule,
        "num_tokens": encoder.num_tokens,
        "out_dim": encoder.out_dim,
        "logit_scale": encoder.logit_scale,
        "logit_bias": encoder.logit_bias,
        "preprocess": encoder.preprocess.describe(),
        "training": portable_tree(training or {}, out),
        "metrics": portable_tree(metrics or {}, out),
    }
    tensors = {**_state("image_head", encoder.image_head), **_state("text_head", encoder.text_head)}
    if include_backbone:
        tensors.update(_state("backbone", encoder.backbone))
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_json(tmp / CONFIG_FILE, config)
        save_file(tensors or {"empty": torch.zeros(0)}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / "preprocess.json", config["preprocess"])
        if backbone_dir is not None:
            shutil.copytree(backbone_dir, tmp / BACKBONE_DIR)
        src = resolve(encoder.backbone.source)
        if isinstance(src, Path) and (src / "preprocessor_config.json").is_file():
            shutil.copyfile(src / "preprocessor_config.json", tmp / "preprocessor_config.json")
        (tmp / "README.md").write_text(model_card(config))
        record_checksums(tmp)
    return out


def load_aligned(path: str | os.PathLike, device: str | torch.device | None = None) -> AlignedEncoder:
    """Load an artifact written by :func:`save_aligned` (eval mode, frozen, fp32)."""
    root = Path(path)
    config = read_json(root / CONFIG_FILE)
    verify_dir(root, "artifact")
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(
            f"{root / CONFIG_FILE}: expected format {FORMAT!r} version {VERSION}, "
            f"found {config.get('format')!r} version {config.get('version')!r}"
        )
    weights_file = root / WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file}: artifact weights not found")
    state = read_tensors(weights_file)
    backbone = load_vision_backbone(_source(root, "backbone", config["backbone"]))
    want = config["backbone"]["spec"]
    for key in ("embed_dim", "num_prefix_tokens", "num_patches"):
        if want.get(key) != backbone.spec.get(key):
            raise ValueError(
                f"{root / CONFIG_FILE}: backbone '{config['backbone']['source']}' has {key}={backbone.spec.get(key)}, "
                f"but the artifact was trained with {key}={want.get(key)}"
            )
    if config["backbone"].get("weights_included") and config["backbone"]["source"] != f"./{BACKBONE_DIR}":
        _load_part(backbone, state, "backbone", weights_file)
    image_head = build_token_head(config["image_head"]) if config.get("image_head") else None
    text_head = build_text_head(config["text_head"]) if config.get("text_head") else None
    _load_part(image_head, state, "image_head", weights_file)
    _load_part(text_head, state, "text_head", weights_file)
    text = config.get("text") or {}
    encoder = AlignedEncoder(
        backbone,
        str(_source(root, "text", text)) if text.get("source") else None,
        image_head,
        text_head,
        method=config["method"],
        image_pool=config.get("image_pool"),
        token_rule=config["token_rule"] if image_head is None else "patch",
        logit_scale=config.get("logit_scale"),
        logit_bias=config.get("logit_bias"),
        text_spec=text.get("spec"),
    )
    encoder.source = str(root)
    encoder.artifact_config = config
    encoder.eval().requires_grad_(False)
    return encoder.to(device) if device is not None else encoder


def _source(root: Path, part: str, entry: dict[str, Any]) -> str | Path:
    """Where to load a recorded backbone/text source from; a missing relative one says what to provide."""
    source = locate(entry["source"], root)
    if isinstance(source, Path) and not source.exists():
        spec = entry.get("spec") or {}
        raise FileNotFoundError(
            f"{root / CONFIG_FILE}: {part} '{entry['source']}' (a {spec.get('kind') or spec.get('model_type')} "
            f"model recorded relative to the artifact) not found at {source}; put that model directory "
            "there, or copy the artifact together with it"
        )
    return source


def _load_part(module: nn.Module | None, state: dict[str, Tensor], prefix: str, where: Path) -> None:
    if module is None:
        return
    part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    try:
        missing, unexpected = module.load_state_dict(part, strict=False)
    except ValueError as err:  # a head refusing weights of an older formula (e.g. freeze_align's text head)
        raise ValueError(f"{where}: {err}") from None
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights for '{prefix}' do not match its config: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
