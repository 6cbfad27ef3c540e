"""End of a KUEA run: the compatibility report on held-out images, and every output on disk."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align.encoders.base import VisionEncoder
from align.methods.common import recipe_as_run
from align.methods.kuea.data import encode_student, load_target
from align.methods.kuea.report import (
    compatibility_report,
    format_report,
    knn_accuracy,
    write_report,
    zeroshot_tasks,
)

PROBE_ATTRIBUTES = ("color", "shape", "count", "position")


@torch.no_grad()
def _batched(fn: Any, pixels: Tensor, device: torch.device, dtype: torch.dtype, batch: int = 64) -> Tensor:
    parts = [fn(pixels[i : i + batch].to(device, dtype)).float().cpu() for i in range(0, len(pixels), batch)]
    return torch.cat(parts)


def _probe_labels(samples: list[Any]) -> dict[str, Tensor]:
    """Per attribute, integer labels of the held-out images (shapes attributes, or the class label)."""
    out = {}
    attrs = [s.meta.get("attributes") for s in samples]
    names = PROBE_ATTRIBUTES if all(isinstance(a, dict) for a in attrs) else ()
    for name in names:
        values = [a[name] for a in attrs]
        vocab = sorted(set(values), key=str)
        out[name] = torch.tensor([vocab.index(v) for v in values])
    if not out and all(s.label is not None for s in samples):
        vocab = sorted({s.label for s in samples})
        out["label"] = torch.tensor([vocab.index(s.label) for s in samples])
    return out


@torch.no_grad()
def kuea_report(method: Any, model: Any) -> dict[str, Any]:
    """The compatibility report (see :mod:`align.methods.kuea.report`), plus kernel parameters and a k-NN probe
    of what the target's embedding encodes; ``{}`` when no held-out data is configured."""
    from align.data.images import open_image
    from align.encoders import load_text_encoder
    from align.methods.common import eval_data
    from align.metrics.zeroshot import zeroshot_classifier

    recipe = method.recipe
    path = eval_data(recipe.eval, recipe.data)
    if path is None:
        return {}
    samples, tasks = zeroshot_tasks(path, recipe.eval.split, list(recipe.eval.labels), recipe.eval.limit)
    images = [open_image(s.image) for s in samples]
    student: VisionEncoder = model.student
    param = next(student.parameters())
    device, dtype = param.device, param.dtype
    pixels = student.preprocess(images)
    aligned = _batched(lambda x: encode_student(student, x, None)[0], pixels, device, dtype)
    original = _batched(lambda x: encode_student(model.frozen["original"], x, None)[0], pixels, device, dtype)
    target = model.frozen.get("target") or load_target(recipe.target, recipe.target_pool).to(device, dtype)
    target_emb = _batched(
        lambda x: target.pooled(x, recipe.target_pool), target.preprocess(images), device, dtype
    )
    if "target" not in model.frozen:
        target.cpu()
    zeroshot = {}
    if tasks:
        text = load_text_encoder(method.student_source).to(device).eval()
        for name, (classes, templates, labels) in tasks.items():
            weights = zeroshot_classifier(lambda t, text=text: text.encode(t), classes, templates)
            zeroshot[name] = (weights, torch.tensor(labels))
        text.cpu()
    kernels = (method.initial_kernel_module.to(device), model.student_kernel, model.target_kernel)
    report = compatibility_report(original, aligned, target_emb, *kernels, zeroshot=zeroshot)
    method.initial_kernel_module.cpu()
    report["kernel_params"] = {"initial": method.initial_kernel, "final": model.student_kernel.values()}
    report["target"] = {"source": recipe.target, "pool": recipe.target_pool, "dim": int(target_emb.shape[1])}
    probes = _probe_labels(samples)
    if probes and len(samples) > 5:
        report["knn_probe"] = {
            name: {
                "target": knn_accuracy(target_emb, labels),
                "original": knn_accuracy(original, labels),
                "aligned": knn_accuracy(aligned, labels),
            }
            for name, labels in probes.items()
        }
    report["eval_data"], report["eval_split"] = str(path), recipe.eval.split
    return report


def training_record(method: Any, out_dir: Path) -> dict[str, Any]:
    """What the artifact's model card says about training."""
    from align.io import read_jsonl

    recipe = method.recipe
    rows = read_jsonl(out_dir / "metrics.jsonl") if (out_dir / "metrics.jsonl").is_file() else []
    last = rows[-1] if rows else {}
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    used = recipe_as_run(out_dir)
    batch = used["train"]["batch_size"] * used["train"]["grad_accum"] * world
    steps = int(last.get("step", 0))
    return {
        "data": recipe.data.train,
        "images": len(method.images),
        "steps": steps,
        "batch_size": batch,
        "samples_seen": steps * batch,
        "final_loss": last.get("loss"),
        "target": method.target_spec,
        "target_pool": recipe.target_pool,
        "live_target": recipe.live_target,
        "recipe": used,
    }


def save_outputs(method: Any, model: Any, out_dir: Path) -> dict[str, str]:
    """Write the artifact, the HF CLIP and open_clip exports and the report; print the report table."""
    from align.artifact import AlignedEncoder, save_aligned
    from align.methods.kuea.export import export_student

    student = copy.deepcopy(model.student).cpu().float().eval()
    paths = export_student(student, method.student_source, out_dir, method.recipe.export_name)
    record = training_record(method, out_dir)
    record["kernel"] = {
        "name": method.recipe.kernel.name,
        "initial": method.initial_kernel,
        "final": model.student_kernel.values(),
        "state": {k: v.tolist() for k, v in model.student_kernel.state_dict().items()},
    }
    record["exports"] = paths
    encoder = AlignedEncoder(
        student, method.student_source, method="kernel", image_pool="projected", token_rule="patch"
    )
    bundled = paths["hf_clip" if student.kind == "clip" else "open_clip"]  # the student's own format
    paths["artifact"] = str(save_aligned(out_dir / "artifact", encoder, backbone_dir=bundled,
                                         training=record, metrics=method.report))  # fmt: skip
    if method.report:
        paths["report"] = str(write_report(method.report, out_dir / "compat_report.json"))
        print(format_report(method.report))
    return paths
