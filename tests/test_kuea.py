"""KUEA: loss terms against direct formulas, kernel parameters that really train and resume, anchor
behaviour, outputs (artifact, HF CLIP, open_clip) that agree, the compatibility report, bad inputs."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPModel, CLIPVisionModelWithProjection

from align.data.shapes import load_shapes
from align.fixtures import ensure_tiny
from align.io import read_json, read_jsonl
from align.kernels import PolynomialKernel
from align.load import load_vision_encoder
from align.methods import run_method
from align.methods.kuea.recipe import KueaMethod, load_recipe
from align.methods.kuea.report import compatibility_report, kernel_discrepancy, knn_accuracy, spread
from align.recipes import ConfigError

SMALL = ["train.batch_size=8", "train.warmup=1", "train.lr=1e-3", "train.log_every=1", "eval.limit=24"]


def _overrides(shapes_dir: Path, *extra: str) -> list[str]:
    return [
        "student=tiny-clip",
        "target=tiny-dinov2-random",
        f"data.train={shapes_dir}",
        "train.steps=4",
        *SMALL,
        *extra,
    ]


def _recipe(shapes_dir: Path, *extra: str):
    return load_recipe(None, _overrides(shapes_dir, *extra))


def _batch(method: KueaMethod, n: int = 8) -> dict[str, torch.Tensor]:
    items = [method.images[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _poly(x: torch.Tensor, gamma: float, coef0: float) -> torch.Tensor:
    """Normalized cubic polynomial kernel, entry by entry."""
    n = x.shape[0]
    k = torch.empty(n, n, dtype=torch.float64)
    x = x.double()
    for i, j in itertools.product(range(n), range(n)):
        num = (gamma * x[i] @ x[j] + coef0) ** 3
        k[i, j] = num / torch.sqrt((gamma * x[i] @ x[i] + coef0) ** 3 * (gamma * x[j] @ x[j] + coef0) ** 3)
    return k


def assert_optimizer_owns_kernel(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The student kernel's parameters are the very objects the optimizer updates."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.student_kernel.named_parameters():
        assert id(param) in owned, f"student_kernel.{name} is not the optimizer's parameter"


@pytest.fixture(scope="module")
def live(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> KueaMethod:
    return KueaMethod(_recipe(shapes_dir, "live_target=true"), tmp_path_factory.mktemp("live"))


def test_step0_anchor_is_zero_and_loss_matches_direct_formula(live: KueaMethod) -> None:
    model = live.build_model(live.recipe.train)
    batch = _batch(live)
    out = model(batch["pixels"], target_pixels=batch["target_pixels"])
    assert out["anchor"].item() == 0.0
    with torch.no_grad():
        student = CLIPVisionModelWithProjection.from_pretrained(ensure_tiny("tiny-clip"))
        emb = student(pixel_values=batch["pixels"]).image_embeds
        target = load_vision_encoder("tiny-dinov2-random").model(pixel_values=batch["target_pixels"])
        cls = target.last_hidden_state[:, 0]  # HF Dinov2: final LayerNorm already applied
    k_student = _poly(emb, 0.0032, 0.191623)
    k_target = _poly(cls, 1.0 / cls.shape[1], 1.0)
    expected = ((k_student - k_target) ** 2).mean()
    torch.testing.assert_close(out["kernel"].double(), expected, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(out["loss"].double(), 0.5 * expected, rtol=1e-4, atol=1e-9)


def test_kernel_params_are_the_optimizers_and_they_train(live: KueaMethod) -> None:
    cfg = live.recipe.train
    model = live.build_model(cfg)
    groups = live.param_groups(model, cfg)
    kernel_group = groups[-1]
    assert kernel_group["weight_decay"] == 0.0
    assert kernel_group["params"][0] is model.student_kernel.gamma
    assert groups[0]["weight_decay"] == cfg.weight_decay
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    model.to("cpu")  # moving the module must not rebind the parameters
    start = model.student_kernel.values()
    batch = _batch(live)
    for _ in range(3):
        out = model(batch["pixels"], target_pixels=batch["target_pixels"])
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_optimizer_owns_kernel(model, optimizer)
    now = model.student_kernel.values()
    assert now["gamma"] != start["gamma"] and now["coef0"] != start["coef0"]
    assert "student_kernel.gamma" in model.state_dict()
    assert not any(k.startswith("frozen") for k in model.state_dict())  # frozen parts stay out


def test_loss_terms_after_real_steps_match_an_independent_computation(live: KueaMethod) -> None:
    """After optimizer steps (student moved, kernel parameters moved), anchor and kernel terms equal
    the spec's formulas computed here from plain HF models: the anchor on unnormalized projected
    embeddings, the kernel with the student kernel's current gamma and c."""
    model = live.build_model(live.recipe.train)
    optimizer = torch.optim.AdamW(live.param_groups(model, live.recipe.train), lr=1e-3)
    batch = _batch(live)
    for _ in range(3):
        live.loss(model, batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        out = model(batch["pixels"], target_pixels=batch["target_pixels"])
        moved = CLIPVisionModelWithProjection.from_pretrained(ensure_tiny("tiny-clip")).eval()
        moved.load_state_dict(model.student.model.state_dict())
        emb = moved(pixel_values=batch["pixels"]).image_embeds
        original = CLIPVisionModelWithProjection.from_pretrained(ensure_tiny("tiny-clip")).eval()
        emb0 = original(pixel_values=batch["pixels"]).image_embeds
        cls = (
            load_vision_encoder("tiny-dinov2-random")
            .model(pixel_values=batch["target_pixels"])
            .last_hidden_state[:, 0]
        )
    anchor = sum(float(((emb[i] - emb0[i]) ** 2).sum()) for i in range(len(emb))) / len(emb)
    assert anchor > 1e-4  # the student really moved, so the anchor is not trivially 0
    kernel = model.student_kernel.values()
    assert kernel["gamma"] != 0.0032 and kernel["coef0"] != 0.191623
    k_student = _poly(emb, kernel["gamma"], kernel["coef0"])
    expected_kernel = ((k_student - _poly(cls, 1.0 / cls.shape[1], 1.0)) ** 2).mean()
    torch.testing.assert_close(
        out["anchor"].double(), torch.tensor(anchor, dtype=torch.float64), rtol=1e-4, atol=1e-9
    )
    torch.testing.assert_close(out["kernel"].double(), expected_kernel, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(out["loss"].double(), anchor + 0.5 * expected_kernel, rtol=1e-4, atol=1e-9)


class _ReferenceBugKernel(PolynomialKernel):
    """The reference implementation's bug: rebinding the parameters to a device copy in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gamma = nn.Parameter(self.gamma.detach().to(x.device))
        self.coef0 = nn.Parameter(self.coef0.detach().to(x.device))
        return super().forward(x)


def test_the_ownership_check_catches_the_reference_bug(live: KueaMethod) -> None:
    model = live.build_model(live.recipe.train)
    model.student_kernel = _ReferenceBugKernel(0.0032, 0.191623, trainable=True)
    optimizer = torch.optim.AdamW(live.param_groups(model, live.recipe.train), lr=1e-3)
    batch = _batch(live)
    model(batch["pixels"], target_pixels=batch["target_pixels"])["loss"].backward()
    optimizer.step()
    with pytest.raises(AssertionError, match="not the optimizer's parameter"):
        assert_optimizer_owns_kernel(model, optimizer)


def _movement(method: KueaMethod, anchor_weight: float, steps: int = 5) -> float:
    method.recipe.loss.anchor_weight = anchor_weight
    torch.manual_seed(0)
    model = method.build_model(method.recipe.train)
    optimizer = torch.optim.AdamW(method.param_groups(model, method.recipe.train), lr=1e-3)
    batch = _batch(method)
    for _ in range(steps):
        model(batch["pixels"], target_pixels=batch["target_pixels"])["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return float(model(batch["pixels"], target_pixels=batch["target_pixels"])["anchor"])


def test_huge_anchor_weight_keeps_embeddings_in_place(live: KueaMethod) -> None:
    free, anchored = _movement(live, 0.0), _movement(live, 1e4)
    live.recipe.loss.anchor_weight = 1.0
    assert free > 0
    assert anchored < 0.05 * free


def test_patch_anchor_is_the_l2_of_layer_minus_2_patch_tokens(shapes_dir: Path, tmp_path: Path) -> None:
    method = KueaMethod(_recipe(shapes_dir, "live_target=true", "loss.patch_anchor_weight=2.0"), tmp_path)
    model = method.build_model(method.recipe.train)
    batch = _batch(method, 4)
    assert model(batch["pixels"], target_pixels=batch["target_pixels"])["patch_anchor"].item() == 0.0
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = model(batch["pixels"], target_pixels=batch["target_pixels"])
    with torch.no_grad():
        mine = model.student.model(pixel_values=batch["pixels"], output_hidden_states=True).hidden_states[-2]
        orig = model.frozen["original"].model(pixel_values=batch["pixels"], output_hidden_states=True)
        diff = mine[:, 1:] - orig.hidden_states[-2][:, 1:]
    expected = diff.pow(2).sum(-1).mean()
    torch.testing.assert_close(out["patch_anchor"], expected, rtol=1e-5, atol=1e-8)
    total = out["anchor"] + 0.5 * out["kernel"] + 2.0 * out["patch_anchor"]
    torch.testing.assert_close(out["loss"], total)


def test_freeze_blocks_freezes_embeddings_and_early_blocks(shapes_dir: Path, tmp_path: Path) -> None:
    method = KueaMethod(_recipe(shapes_dir, "live_target=true", "freeze_blocks=2"), tmp_path)
    model = method.build_model(method.recipe.train)
    trainable = {n for n, p in model.student.named_parameters() if p.requires_grad}
    assert not any("embeddings" in n or ".layers.0." in n or ".layers.1." in n for n in trainable)
    assert any(".layers.3." in n for n in trainable)
    assert (
        sum(len(g["params"]) for g in method.param_groups(model, method.recipe.train)) == len(trainable) + 2
    )


def test_cached_and_live_targets_agree(shapes_dir: Path, live: KueaMethod, tmp_path: Path) -> None:
    cached = KueaMethod(_recipe(shapes_dir, "data.cache_dtype=fp32"), tmp_path)
    assert (tmp_path / "cache" / "target-cls" / "manifest.json").is_file()
    a, b = _batch(cached), _batch(live)
    live_emb = live.build_model(live.recipe.train).frozen["target"].pooled(b["target_pixels"], "cls")
    torch.testing.assert_close(a["target"], live_emb, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def finished(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kuea") / "run"
    run_method("kuea", None, _overrides(shapes_dir, "train.save_every=2"), out, resume=False)
    return out


def test_kernel_params_saved_in_checkpoint_and_artifact(finished: Path) -> None:
    ckpt = load_file(str(finished / "checkpoints" / "step-2" / "model.safetensors"))
    assert float(ckpt["student_kernel.gamma"]) != pytest.approx(0.0032, abs=1e-9)
    record = read_json(finished / "artifact" / "aligned_encoder.json")["training"]["kernel"]
    assert record["initial"]["gamma"] == pytest.approx(0.0032)
    assert record["final"]["gamma"] != record["initial"]["gamma"]
    rows = read_jsonl(finished / "metrics.jsonl")
    assert {"kernel_gamma", "kernel_coef0", "anchor", "kernel"} <= set(rows[-1])
    # logged at loss time, before each step's update (the first update has lr 0: one warmup step)
    logged = [r["kernel_gamma"] for r in rows]
    assert logged[0] == pytest.approx(0.0032) and logged[2] != logged[1] != logged[3]
    assert float(ckpt["student_kernel.gamma"]) == pytest.approx(logged[2])


def test_resume_after_a_kill_equals_the_uninterrupted_run(
    shapes_dir: Path, finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = _overrides(shapes_dir, "train.save_every=2")
    calls = {"n": 0}
    original_loss = KueaMethod.loss

    def dying_loss(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during step 3, after the step-2 checkpoint
        return original_loss(self, model, batch)

    monkeypatch.setattr(KueaMethod, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        run_method("kuea", None, overrides, tmp_path / "run", resume=False)
    monkeypatch.setattr(KueaMethod, "loss", original_loss)
    run_method("kuea", None, overrides, tmp_path / "run", resume="auto")
    a = load_file(str(finished / "artifact" / "backbone" / "model.safetensors"))  # the fine-tuned CLIP
    b = load_file(str(tmp_path / "run" / "artifact" / "backbone" / "model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    ka = read_json(finished / "artifact" / "aligned_encoder.json")["training"]["kernel"]["final"]
    kb = read_json(tmp_path / "run" / "artifact" / "aligned_encoder.json")["training"]["kernel"]["final"]
    assert ka == pytest.approx(kb, rel=1e-6)


def test_outputs_agree_artifact_hf_clip_open_clip(finished: Path) -> None:
    artifact = load_vision_encoder(finished / "artifact")
    pixels = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        from_artifact = artifact.projected(pixels)
        hf_vision = CLIPVisionModelWithProjection.from_pretrained(finished / "hf_clip").eval()
        from_hf = hf_vision(pixel_values=pixels).image_embeds
        oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{finished / 'open_clip'}")
        from_oc = oc.eval().encode_image(pixels)
    torch.testing.assert_close(from_hf, from_artifact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_oc, from_artifact, rtol=1e-5, atol=1e-5)
    # the text tower is the original one, untouched
    original = CLIPModel.from_pretrained(ensure_tiny("tiny-clip"))
    exported = CLIPModel.from_pretrained(finished / "hf_clip")
    text_a, text_b = original.text_model.state_dict(), exported.text_model.state_dict()
    assert text_a.keys() == text_b.keys()
    assert all(torch.equal(text_a[k], text_b[k]) for k in text_a)
    assert torch.equal(original.text_projection.weight, exported.text_projection.weight)
    assert not torch.equal(original.visual_projection.weight, exported.visual_projection.weight)


def test_compat_report_written_and_consistent(finished: Path, shapes_dir: Path) -> None:
    report = read_json(finished / "compat_report.json")
    assert report["n_images"] == min(24, len(load_shapes(shapes_dir, split="test")))
    kd = report["kernel_discrepancy"]
    assert kd["before"] > 0 and kd["after"] > 0
    assert set(report["zeroshot"]) == {"color", "shape"}
    for task in report["zeroshot"].values():
        assert 0.0 <= task["agreement"] <= 1.0
    assert set(report["knn_probe"]) == {"color", "shape", "count", "position"}


def test_report_before_equals_a_direct_recomputation(finished: Path, shapes_dir: Path) -> None:
    """The report's "before" kernel discrepancy, recomputed from the original models on the same images."""
    from align.data.images import open_image

    report = read_json(finished / "compat_report.json")
    rows = spread(load_shapes(shapes_dir, split="test"), report["n_images"])
    images = [open_image(Path(r["image"])) for r in rows]
    clip, dino = load_vision_encoder("tiny-clip"), load_vision_encoder("tiny-dinov2-random")
    with torch.no_grad():
        emb = clip.pooled(clip.preprocess(images), "projected")
        cls = dino.pooled(dino.preprocess(images), "cls")
    expected = ((_poly(emb, 0.0032, 0.191623) - _poly(cls, 1.0 / cls.shape[1], 1.0)) ** 2).mean()
    assert report["kernel_discrepancy"]["before"] == pytest.approx(float(expected), rel=1e-4)


def test_report_functions_against_naive_versions() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=gen), torch.randn(7, 3, generator=gen)
    ks = PolynomialKernel(0.3, 0.5, trainable=True)
    kt = PolynomialKernel(1 / 3, 1.0)
    naive = ((_poly(x, 0.3, 0.5) - _poly(y, 1 / 3, 1.0)) ** 2).mean()
    assert kernel_discrepancy(x, y, ks, kt) == pytest.approx(float(naive), rel=1e-5)

    emb = torch.randn(12, 4, generator=gen)
    labels = torch.randint(0, 3, (12,), generator=gen)
    unit = torch.nn.functional.normalize(emb, dim=-1)
    hits = 0
    for i in range(12):
        sims = [(float(unit[i] @ unit[j]), j) for j in range(12) if j != i]
        top = [j for _, j in sorted(sims, reverse=True)[:3]]
        votes = [sum(int(labels[j]) == c for j in top) for c in range(3)]
        best = max(votes)
        winners = [c for c in range(3) if votes[c] == best]
        pred = int(labels[top[0]]) if int(labels[top[0]]) in winners else winners[0]
        hits += pred == int(labels[i])
    assert knn_accuracy(emb, labels, k=3) == pytest.approx(hits / 12)

    # zero-shot agreement: classifier rows = two axes; flipping one image's embedding flips one prediction
    weights = torch.eye(2)
    original = torch.tensor([[2.0, 0.1], [0.1, 2.0], [3.0, 0.0], [0.0, 1.0]])
    aligned = original.clone()
    aligned[3] = torch.tensor([1.0, 0.0])
    labels = torch.tensor([0, 1, 0, 1])
    report = compatibility_report(original, aligned, y[:4], ks, ks, kt, {"toy": (weights, labels)})
    assert report["zeroshot"]["toy"] == pytest.approx(
        {
            "acc1": 0.75,
            "acc_before": 1.0,
            "acc_after": 0.75,
            "agreement": 0.75,
            "chance": 0.5,
            "majority": 0.5,
            "n": 4,
        }
    )
    assert report["cosine_to_original"]["min"] == pytest.approx(0.0, abs=1e-6)


def test_open_clip_student_trains_and_exports(shapes_dir: Path, tmp_path: Path) -> None:
    from align.methods.kuea.export import export_student

    method = KueaMethod(_recipe(shapes_dir, "student=tiny-openclip", "live_target=true"), tmp_path)
    model = method.build_model(method.recipe.train)
    batch = _batch(method, 4)
    out = model(batch["pixels"], target_pixels=batch["target_pixels"])
    # open_clip's attention takes a different (fused) path in eval mode: equal up to rounding
    assert out["anchor"].item() < 1e-9 and out["kernel"].item() > 0
    out["loss"].backward()
    assert model.student_kernel.gamma.grad is not None
    assert model.student.visual.transformer.resblocks[0].attn.in_proj_weight.grad is not None
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    paths = export_student(model.student, method.student_source, tmp_path / "exports", "kuea-tiny-oc")
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = model.student.projected(pixels)
        hf = CLIPVisionModelWithProjection.from_pretrained(paths["hf_clip"]).eval()
        oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{paths['open_clip']}")
        torch.testing.assert_close(hf(pixel_values=pixels).image_embeds, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(oc.eval().encode_image(pixels), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (["student=no-such-model"], KeyError, "student 'no-such-model'"),
        (["target=no-such-model"], KeyError, "target 'no-such-model'"),
        (["target_pool=projected"], ValueError, "target 'tiny-dinov2-random' has no pooling 'projected'"),
        (["student=tiny-dinov2-random"], ValueError, "student 'tiny-dinov2-random' is a 'dinov2' model"),
        (["loss.anchor_weight=-1"], ValueError, "loss weights must be >= 0"),
        (["data.train=''"], ValueError, "data.train: no training images"),
        (["kernel.name=laplace"], ConfigError, "kernel.name"),
        (["kernel.student.bandwith=2.0", "kernel.name=gaussian"], ValueError, "unknown option"),
        (["freeze_blocks=9"], ValueError, "only 4 blocks"),
        (["anchor_weight=2"], ConfigError, "did you mean 'loss.anchor_weight'"),
    ],
)
def test_bad_inputs_fail_clearly(shapes_dir: Path, tmp_path: Path, extra, error, match) -> None:
    with pytest.raises(error, match=match):
        method = KueaMethod(_recipe(shapes_dir, "live_target=true", *extra), tmp_path)
        method.build_model(method.recipe.train)


def test_target_cache_of_other_settings_is_refused(shapes_dir: Path, tmp_path: Path) -> None:
    from align.data.cache import write_cache
    from align.data.readers import open_data

    cache = write_cache("tiny-dinov2-random", open_data(shapes_dir, split="train"), tmp_path / "c", "image", "mean")
    with pytest.raises(ValueError, match="target cache made with"):
        KueaMethod(_recipe(shapes_dir, f"data.target_cache={cache}"), tmp_path / "run")


def test_gradient_checkpointing_gives_the_same_gradients(live: KueaMethod) -> None:
    grads = []
    for flag in (False, True):
        cfg = dataclasses.replace(live.recipe.train, gradient_checkpointing=flag)
        model = live.build_model(cfg)
        batch = _batch(live, 4)
        model(batch["pixels"], target_pixels=batch["target_pixels"])["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["kuea_vitl14_336", "kuea_vitl14", "kuea_vitb16", "tiny_kuea"])
def test_recipes_load_with_the_paper_settings(name: str) -> None:
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / f"{name}.yaml")
    assert recipe.kernel.name == "polynomial" and recipe.loss.kernel_weight == 0.5
    assert recipe.kernel.student["gamma"] == 0.0032 and recipe.kernel.student["coef0"] == 0.191623
    if name.startswith("kuea_"):
        t = recipe.train
        assert (t.steps, t.batch_size, t.lr, t.weight_decay, t.warmup) == (40000, 64, 1e-5, 1e-4, 2800)
        assert recipe.loss.anchor_weight == 1.0 and recipe.student.startswith("openai/clip-vit-")
        assert recipe.kernel.student.get("trainable", True) and recipe.target.startswith("facebook/dinov2-")


def test_cli_align_kuea_runs_the_tiny_recipe(shapes_dir: Path, tmp_path: Path, capsys) -> None:
    from mllm_swap.cli import main

    recipe = Path(__file__).parents[1] / "recipes" / "tiny_kuea.yaml"
    sets = [
        "student=tiny-clip",
        "target=tiny-dinov2-random",
        f"data.train={shapes_dir}",
        "train.steps=2",
        "train.batch_size=8",
        "eval.limit=16",
    ]
    argv = ["align", "kuea", "--config", str(recipe), "--out", str(tmp_path / "run")]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert "KUEA compatibility report" in out and "zero-shot color: acc1" in out
    assert (tmp_path / "run" / "hf_clip" / "config.json").is_file()
    assert (
        main(
            ["align", "kuea", "--config", str(recipe), "--out", str(tmp_path / "x"), "--set", "target=nope"]
        )
        == 2
    )
    assert "target 'nope'" in capsys.readouterr().err


def test_clip_pretraining_builds_a_loadable_clip(tmp_path: Path) -> None:
    from align.load import load_text_encoder
    from align.pretrain.clip import PretrainSettings, pretrain_clip_on_shapes

    record = pretrain_clip_on_shapes(
        tmp_path / "clip", PretrainSettings(shapes=80, steps=3, batch_size=16, warmup=1)
    )
    assert set(record["zeroshot_test_after"]) == {"color_acc1", "shape_acc1"}
    assert read_json(tmp_path / "clip" / "pretrain.json")["final_loss"] == pytest.approx(record["final_loss"])
    vision, text = load_vision_encoder(tmp_path / "clip"), load_text_encoder(tmp_path / "clip")
    before = CLIPModel.from_pretrained(ensure_tiny("tiny-clip")).state_dict()
    after = CLIPModel.from_pretrained(tmp_path / "clip").state_dict()
    assert not torch.equal(before["visual_projection.weight"], after["visual_projection.weight"])
    assert vision.projection_dim == text.embed_dim == 64
