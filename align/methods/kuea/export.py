"""KUEA's outputs: the artifact, an HF ``CLIPModel`` directory, an open_clip checkpoint and the
compatibility report (:func:`save_outputs`).

The exports hold the *aligned* image tower and the *original* text tower, tokenizer and image processor, so
the result is a drop-in replacement: ``CLIPVisionModel.from_pretrained(OUT/hf_clip)`` is what LLaVA
loads, and ``open_clip.create_model_and_transforms("local-dir:OUT/open_clip")`` (or the named config,
see :mod:`align.clip_convert`) what open_clip and OpenFlamingo users load.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from align.clip_convert import (
    hf_clip_to_openclip_dir,
    openclip_config_from_model,
    openclip_to_hf_dir,
    save_openclip,
)
from align.encoders.base import VisionEncoder
from align.io import atomic_path
from align.methods import training_record
from align.methods.kuea.report import format_report, write_report

__all__ = ["export_student", "save_outputs"]


def _hf_parts(source: str | os.PathLike) -> tuple[Any, Any]:
    """The original tokenizer and image processor of an HF CLIP source."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    return AutoTokenizer.from_pretrained(str(source)), CLIPImageProcessor.from_pretrained(str(source))


def _export_hf_student(
    student: VisionEncoder, source: str | os.PathLike, out: Path, name: str
) -> dict[str, str]:
    from transformers import CLIPModel

    from align.encoders.hf_vision import quiet_transformers

    with quiet_transformers():
        clip = CLIPModel.from_pretrained(str(source))
    vision = {k: v.detach().cpu() for k, v in student.model.state_dict().items()}
    missing, unexpected = clip.load_state_dict(vision, strict=False)
    if unexpected or any(k.startswith(("vision_model.", "visual_projection.")) for k in missing):
        raise ValueError(
            f"{source}: the trained vision tower does not fit the original CLIPModel "
            f"(unexpected {unexpected[:4]}, missing {[k for k in missing if 'vision' in k][:4]})"
        )
    tokenizer, processor = _hf_parts(source)
    with atomic_path(out / "hf_clip") as tmp:
        clip.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    hf_clip_to_openclip_dir(clip, processor, tokenizer, out / "open_clip", name=name)
    return {"hf_clip": str(out / "hf_clip"), "open_clip": str(out / "open_clip")}


def _export_openclip_student(student: VisionEncoder, source: str, out: Path, name: str) -> dict[str, str]:
    from open_clip.model import get_model_preprocess_cfg

    from align.encoders.openclip import load_openclip

    model, _, tokenizer = load_openclip(source)
    model.visual.load_state_dict({k: v.detach().cpu() for k, v in student.visual.state_dict().items()})
    cfg = openclip_config_from_model(model)
    preprocess = dict(get_model_preprocess_cfg(model))
    hf_tokenizer = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps an HF one
    save_openclip(out / "open_clip", cfg, model.state_dict(), preprocess, hf_tokenizer, name=name)
    openclip_to_hf_dir(model, tokenizer, out / "hf_clip")
    return {"hf_clip": str(out / "hf_clip"), "open_clip": str(out / "open_clip")}


def export_student(
    student: VisionEncoder, source: str | os.PathLike, out_dir: str | os.PathLike, name: str
) -> dict[str, str]:
    """Write ``OUT/hf_clip`` and ``OUT/open_clip`` for a trained CLIP image tower; returns their paths.

    ``source`` is the student's original checkpoint (HF CLIP directory/hub id, or an open_clip spec),
    from which the text tower, tokenizer and processor are taken unchanged.
    """
    from align.encoders.registry import resolve

    out, source = Path(out_dir), resolve(str(source))
    if student.kind == "clip":
        return _export_hf_student(student, source, out, name)
    if student.kind == "openclip":
        return _export_openclip_student(student, str(source), out, name)
    raise ValueError(
        f"{source}: cannot export a '{student.kind}' student as CLIP (HF CLIP or open_clip only)"
    )


def save_outputs(method: Any, model: Any, out_dir: Path) -> dict[str, str]:
    """Write the artifact, the HF CLIP and open_clip exports and the report; print the report table."""
    from align.artifact import AlignedEncoder, save_aligned

    recipe = method.recipe
    student = copy.deepcopy(model.student).cpu().float().eval()
    paths = export_student(student, method.student_source, out_dir, recipe.export_name)
    target = {
        "target": method.target_spec,
        "target_pool": recipe.target_pool,
        "live_target": recipe.live_target,
    }
    record = training_record(out_dir, recipe.data.train, {"images": len(method.images)}, target)
    record["kernel"] = {
        "name": recipe.kernel.name,
        "initial": method.initial_kernel,
        "final": model.student_kernel.values(),
        "state": {k: v.tolist() for k, v in model.student_kernel.state_dict().items()},
    }
    record["exports"] = paths
    encoder = AlignedEncoder(
        student, method.student_source, method="kuea", image_pool="projected", token_rule="patch"
    )
    bundled = paths["hf_clip" if student.kind == "clip" else "open_clip"]  # the student's own format
    paths["artifact"] = str(save_aligned(out_dir / "artifact", encoder, backbone_dir=bundled,
                                         training=record, metrics=method.report))  # fmt: skip
    if method.report:
        paths["report"] = str(write_report(method.report, out_dir / "compat_report.json"))
        print(format_report(method.report))
    return paths
