"""The model card (``README.md``) written into every aligned-encoder artifact, from its config."""

from __future__ import annotations

from typing import Any

__all__ = ["model_card"]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(config: dict[str, Any]) -> str:
    """A short Markdown model card from an artifact's ``aligned_encoder.json`` content."""
    backbone, text = config["backbone"], config.get("text") or {}
    training, metrics = config.get("training") or {}, config.get("metrics") or {}
    tuned = " (fine-tuned weights included)" if backbone.get("weights_included") else " (frozen)"
    lines = [
        f"# Aligned vision encoder ({config['method']})",
        "",
        f"Made with mllm-swap's `{config['method']}` method: a language-aligned vision encoder whose image "
        "embeddings share a space with its text encoder's, loadable with "
        "`align.artifact.load_aligned(<this dir>)` or `align.load.load_vision_encoder(<this dir>)`.",
        "",
        "| | |",
        "|---|---|",
        f"| backbone | `{backbone['source']}`{tuned} |",
        f"| text encoder | `{text.get('source')}` |",
        f"| image head | `{(config.get('image_head') or {}).get('kind')}` |",
        f"| text head | `{(config.get('text_head') or {}).get('kind')}` |",
        f"| token rule | {config['token_rule']} |",
        f"| tokens per image | {config['num_tokens']} x {config['out_dim']} |",
        f"| image size | {config['preprocess']['image_size']} |",
    ]
    for key in ("data", "steps", "samples_seen", "batch_size", "final_loss"):
        if key in training:
            lines.append(f"| {key.replace('_', ' ')} | {_fmt(training[key])} |")
    if metrics:
        lines += ["", "## Scores", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in _flatten(metrics)]
    return "\n".join(lines) + "\n"


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, name + ".")
        elif isinstance(value, (int, float, str)):
            rows.append((name, value))
    return rows
