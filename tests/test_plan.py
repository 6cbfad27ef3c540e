"""Shipped real configs and ``mllm-swap plan``: parameter counts against the published figures, FLOPs
against torch's own FLOP counter, ZeRO division and the fit advice, and the command's JSON/errors.

Everything is built on the meta device: no weights, no network, seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from align.cost import GIB, Hardware, Part, Stage, estimate, memory
from align.model_configs import build_meta, meta_vision_encoder, shipped_config, shipped_ids
from mllm_swap.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("hub_id", "low", "high"),
    [
        ("openai/clip-vit-large-patch14-336", 303e6, 304e6),  # vision tower without projection
        ("facebook/dinov2-large", 304e6, 305e6),
        ("google/siglip-so400m-patch14-384", 427e6, 429e6),
    ],
)
def test_vision_towers_have_published_sizes(hub_id: str, low: float, high: float) -> None:
    config = shipped_config(hub_id)
    assert low <= count(build_meta(getattr(config, "vision_config", config))) <= high


def test_text_models_and_llava_have_published_sizes() -> None:
    from transformers import LlavaForConditionalGeneration

    assert 355e6 <= count(build_meta(shipped_config("sentence-transformers/all-roberta-large-v1"))) <= 356e6
    assert 109e6 <= count(build_meta(shipped_config("sentence-transformers/all-mpnet-base-v2"))) <= 110e6
    llava = build_meta(shipped_config("llava-hf/llava-1.5-7b-hf"), LlavaForConditionalGeneration)
    assert 7.05e9 <= count(llava) <= 7.07e9
    assert all(p.device.type == "meta" for p in llava.parameters())
    vicuna = shipped_config("lmsys/vicuna-7b-v1.5")
    assert shipped_config("liuhaotian/llava-v1.5-7b").to_dict()["hidden_size"] == vicuna.hidden_size == 4096


def test_every_recipe_and_registry_id_is_shipped() -> None:
    import yaml

    from align.encoders.registry import KNOWN_HUB_TEXT, KNOWN_HUB_VISION

    named = {k for k in [*KNOWN_HUB_VISION, *KNOWN_HUB_TEXT] if not k.startswith("openclip:")}
    for path in RECIPES.glob("*.yaml"):
        recipe = yaml.safe_load(path.read_text())
        named |= {recipe[k] for k in ("student", "target", "vision", "text", "model") if k in recipe}
    hub = {n for n in named if n.count("/") == 1 and not n.startswith(("runs/", "tiny"))}
    assert hub <= set(shipped_ids()), hub - set(shipped_ids())
    for hub_id in KNOWN_HUB_VISION.keys() & set(shipped_ids()):
        enc, facts = meta_vision_encoder(hub_id), KNOWN_HUB_VISION[hub_id]
        assert (enc.embed_dim, enc.patch_size, enc.num_prefix_tokens) == (
            facts["embed_dim"], facts["patch_size"], facts["prefix"]
        )


def test_forward_flops_match_torch_flop_counter() -> None:
    """The formula against FlopCounterMode on the same ViT-L/14-336 tower (meta tensors: no compute)."""
    encoder = meta_vision_encoder("openai/clip-vit-large-patch14-336")
    part = Part("tower", encoder, 577, encoder.num_layers, encoder.embed_dim)
    with FlopCounterMode(display=False) as counter:
        encoder.model(pixel_values=torch.empty(1, 3, 336, 336, device="meta"))
    measured = counter.get_total_flops()
    assert abs(part.forward_flops() - measured) / measured < 0.10
    assert 3.7e11 < measured < 3.9e11


def _linear_stage(trainable: bool, micro_batch: int = 8) -> Stage:
    with torch.device("meta"):
        module = nn.Linear(1000, 1000, bias=False).requires_grad_(trainable)
    return Stage("s", [Part("lin", module, 10, grad_flows=trainable)], micro_batch, steps=100)


def test_training_flops_and_memory_by_zero_stage() -> None:
    trained, frozen = _linear_stage(True), _linear_stage(False)
    assert trained.parts[0].trainable == 10**6 and frozen.parts[0].frozen == 10**6
    # forward 2*W*T; backward 2*W*T for the input gradients + 2*W*T for the weight gradients
    assert trained.parts[0].training_flops(False) == 3 * trained.parts[0].forward_flops() == 6 * 10**7
    assert frozen.parts[0].training_flops(False) == frozen.parts[0].forward_flops()
    z0, z2, z3 = (memory(trained, z, 4, False, 8) for z in ("0", "2", "3"))
    assert (z0["weights"], z0["gradients"], z0["optimizer"]) == (2 * 10**6, 2 * 10**6, 12 * 10**6)
    assert (z2["weights"], z2["gradients"], z2["optimizer"]) == (2 * 10**6, 10**6 // 2, 3 * 10**6)
    assert z3["weights"] == 10**6 // 2
    offload = memory(trained, "3-offload", 4, False, 8)
    assert offload["optimizer"] == offload["weights"] == 0 and offload["cpu"] == 10**6 // 2 + 3 * 10**6
    assert memory(frozen, "0", 4, False, 8)["optimizer"] == 0
    # 8 samples x 2 bytes x 10 tokens x (1000 in + 1000 out)
    assert z0["activations"] == 8 * 2 * 10 * 2000


def test_llava_pretrain_plan_and_fit_advice() -> None:
    from align.recipes import load_config
    from mllm_swap.tune.config import TuneConfig
    from mllm_swap.tune.plan import tune_stage

    stage = tune_stage(load_config(TuneConfig, RECIPES / "llava15_pretrain.yaml", []))
    assert stage.image_tokens == 576
    parts = {p.name: p for p in stage.parts}
    assert parts["connector"].trainable == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # linear_1, linear_2
    assert sum(p.trainable for p in stage.parts) == parts["connector"].trainable
    assert 7.05e9 <= sum(p.frozen + p.trainable for p in stage.parts) <= 7.07e9
    big = estimate(stage, Hardware(8, "A100-80GB"), "2", 0.4)
    assert big["fits"] and big["samples"] == 558_128
    small = estimate(stage, Hardware(1, "4090-24GB"), "0", 0.4)
    assert not small["fits"] and small["advice"][0].startswith("fits with ZeRO-3-offload")  # weights 13 GiB
    need = float(small["advice"][0].rsplit("(", 1)[1].split()[0])
    assert need * GIB <= 0.9 * 24 * GIB


def test_lora_plan_counts_the_adapter() -> None:
    from align.recipes import load_config
    from mllm_swap.tune.config import TuneConfig
    from mllm_swap.tune.plan import tune_stage

    stage = tune_stage(load_config(TuneConfig, RECIPES / "llava15_lora.yaml", ["model=llava-hf/llava-1.5-7b-hf"]))
    llm = next(p for p in stage.parts if p.name == "language model")
    # r (in + out) per nn.Linear of each of the 32 layers: q,k,v,o (4096x4096) + gate,up (4096->11008), down
    per_layer = 128 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert llm.trainable == 32 * per_layer


def test_plan_command_json_for_kuea(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", str(RECIPES / "kuea_vitl14.yaml"), "--hardware", "2x4090-24GB", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    train = result["stages"][-1]
    assert result["reference"]["hours"] == 30.0 and train["image_tokens"] == 257
    assert 303e6 < train["trainable"] < 305e6 and 303e6 < train["frozen"] < 305e6
    assert train["samples"] == 40000 * 64 * 2


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--hardware", "3xTPU"], "--hardware '3xTPU'"),
        (["--zero", "1"], "--zero '1'"),
        (["--mfu", "1.5"], "--mfu 1.5"),
    ],
)
def test_plan_rejects_bad_flags(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(RECIPES / "kuea_vitl14.yaml"), *argv]) == 2
    assert needle in capsys.readouterr().err


def glu_params(d_in: int, d_out: int, width: int) -> int:
    """LayerNorm + W1, W2 (d_in -> width * d_in) + W3 (-> d_out), with biases: the SAIL head by hand."""
    hidden = width * d_in
    return 2 * d_in + 2 * (d_in * hidden + hidden) + hidden * d_out + d_out


def test_sail_and_freeze_align_heads() -> None:
    from align.methods.plan import align_stages, read_align_recipe

    sail = align_stages(*read_align_recipe(RECIPES / "sail_dinov2l_nv2.yaml", []), dataset_size=23_000_000)
    heads = {p.name: p for p in sail[-1].parts}
    assert heads["image head"].trainable == glu_params(2 * 1024, 1024, 8)  # [CLS ; mean] of DINOv2-L
    assert heads["text head"].trainable == glu_params(4096, 1024, 8)  # NV-Embed-v2 sentence embedding
    assert sail[-1].optimizer == "lion" and sail[-1].samples(1) == 10 * 23_000_000
    encode = {p.name: p for p in sail[0].parts}
    assert 7.0e9 < encode["text nvidia/NV-Embed-v2"].frozen < 7.2e9  # its Mistral-7B text model
    fa = align_stages(*read_align_recipe(RECIPES / "freeze_align_dinov2l_arl.yaml", []))
    assert sum(p.trainable for p in fa[-1].parts) == 11_553_792  # the paper's ~11.5M projectors
    gte = align_stages(*read_align_recipe(RECIPES / "sail_dinov2l_gte.yaml", []))
    assert any("model type 'new'" in n for n in gte[0].notes)  # custom code: recorded, not built
    assert {p.name: p for p in gte[-1].parts}["text head"].trainable == glu_params(1024, 1024, 8)


@pytest.mark.parametrize(
    ("encoder", "image_tokens", "tower_tokens"),
    [("facebook/dinov2-large", 256, 257), ("facebook/dinov2-with-registers-large", 256, 261)],
)
def test_swap_plan_follows_the_swap_rules(encoder: str, image_tokens: int, tower_tokens: int) -> None:
    from align.recipes import load_config
    from mllm_swap.tune.config import TuneConfig
    from mllm_swap.tune.plan import tune_stage

    cfg = load_config(TuneConfig, RECIPES / "sail_llava_stage1.yaml", ["model=llava-hf/llava-1.5-7b-hf"])
    stage = tune_stage(cfg, encoder=encoder)
    parts = {p.name: p for p in stage.parts}
    assert (stage.image_tokens, parts["vision tower"].tokens) == (image_tokens, tower_tokens)
    assert 304e6 < parts["vision tower"].frozen < 305e6
    assert parts["connector"].trainable == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # linear_1 from 1024


def _swapped_checkpoint_config(out: Path, encoder: str) -> Path:
    """A LLaVA-1.5-7B checkpoint folder swapped to ``encoder`` (no weights): the swapped config and the
    processor a swap saves (the encoder's image processor, LLaVA's tokenizer), written by transformers."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor

    from align.model_configs import config_dir
    from mllm_swap.tune.plan import swapped

    llava = "llava-hf/llava-1.5-7b-hf"
    config, tower = swapped(shipped_config(llava), encoder)
    config.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(str(config_dir(encoder))),
        tokenizer=AutoTokenizer.from_pretrained(str(config_dir(llava))),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=tower.num_prefix_tokens,
    )
    processor.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("model", "image_tokens", "tower_tokens"),
    [("dinov2", 256, 257), ("llava-hf/llava-1.5-7b-hf", 576, 577)],
)
def test_checkpoint_plan_counts_the_tokens_its_processor_feeds(
    model: str, image_tokens: int, tower_tokens: int, tmp_path: Path
) -> None:
    """A swapped checkpoint's image tokens follow its processor's pixels: DINOv2-L is fed 224 px (16 x 16
    patches), not its config's 518 (1,369); CLIP-L/14-336 in LLaVA-1.5-7B is fed 336 px (24 x 24)."""
    from align.recipes import load_config
    from mllm_swap.tune.config import TuneConfig
    from mllm_swap.tune.plan import tune_stage

    if model == "dinov2":
        model = str(_swapped_checkpoint_config(tmp_path / "swapped", "facebook/dinov2-large"))
        assert shipped_config("facebook/dinov2-large").image_size == 518  # the config alone would say 37 x 37
    cfg = load_config(TuneConfig, RECIPES / "llava15_lora.yaml", [f"model={model}"])
    stage = tune_stage(cfg)
    parts = {p.name: p for p in stage.parts}
    assert (stage.image_tokens, parts["vision tower"].tokens) == (image_tokens, tower_tokens)
