"""Hub models at their shipped configs with random weights, written as ``save_pretrained`` directories,
and a folder of random images: real-size training runs on a machine without network or weights.

    python benchmarks/random_weights.py OUT --models openai/clip-vit-large-patch14-336,facebook/dinov2-large \
        [--images 256 --image-size 384] [--shrink 1] [--layers N]

Writes ``OUT/<org>/<name>/`` (config, random weights, the shipped preprocessor config; a CLIP also gets
a byte-level BPE tokenizer, as its exports need one) and ``OUT/images/class<k>/<i>.png``. ``--shrink``
and ``--layers`` make them narrower and shallower (dry runs of the same commands).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from common import random_model, shrink_config
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_model(hub_id: str, out: Path, shrink: int = 1, layers: int | None = None) -> Path:
    """``hub_id``'s shipped config with random weights (``AutoModel``) saved to ``out/hub_id``."""
    from transformers import AutoModel

    from align.encoders.tokenizer import build_bpe_tokenizer
    from align.model_configs import config_dir, shipped_config

    torch.manual_seed(0)
    config = shrink_config(shipped_config(hub_id), shrink, layers)
    folder = out / hub_id
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random initialisation is quicker on a GPU
    random_model(config, AutoModel, device).save_pretrained(folder)
    for extra in config_dir(hub_id).glob("preprocessor_config.json"):
        shutil.copy(extra, folder / extra.name)
    if config.model_type == "clip":
        text = config.text_config
        build_bpe_tokenizer(add_eos=True, model_max_length=text.max_position_embeddings).save_pretrained(
            folder
        )
    return folder


def write_images(out: Path, n: int, size: int, classes: int = 4) -> Path:
    """``n`` random RGB images (``size`` px) in ``classes`` class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = out / "images" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return out / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--models", default="", help="hub ids with shipped configs, comma-separated")
    parser.add_argument("--images", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--shrink", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None)
    args = parser.parse_args()
    for hub_id in filter(None, args.models.split(",")):
        print(f"wrote {write_model(hub_id, args.out, args.shrink, args.layers)}", flush=True)
    if args.images:
        print(f"wrote {write_images(args.out, args.images, args.image_size)}")


if __name__ == "__main__":
    main()
