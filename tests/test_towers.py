"""Aligned towers: the per-layer contract transformers 5.x Llava relies on, the artifact's own tokens
reproduced exactly, token rules, and save/reload through the Auto classes."""

from __future__ import annotations

import pytest
import torch

from align.load import load_vision_encoder
from mllm_swap.towers import AlignedTower, AlignedTowerConfig, new_tower


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _artifact(tmp_path, kind: str, backbone_id: str):
    from align.artifact import AlignedEncoder, save_aligned
    from align.heads import build_token_head

    backbone = load_vision_encoder(backbone_id)
    torch.manual_seed(0)
    head = build_token_head(
        {
            "kind": kind,
            "in_dim": backbone.embed_dim,
            "out_dim": 48,
            "num_prefix_tokens": backbone.num_prefix_tokens,
        }
    )
    out = save_aligned(tmp_path / kind, AlignedEncoder(backbone, "tiny-text", head, None, method="sail"))
    return load_vision_encoder(out)


@pytest.mark.parametrize(
    ("kind", "backbone"), [("sail_glu", "tiny-dinov2-random"), ("freeze_align", "tiny-dinov2-reg-random")]
)
@torch.no_grad()
def test_aligned_tower_reproduces_artifact_tokens(tmp_path, pixels, kind, backbone) -> None:
    encoder = _artifact(tmp_path, kind, backbone)
    tower = new_tower(encoder)
    assert (tower.kind, tower.width, tower.num_tokens, tower.head_layer) == ("aligned", 48, 64, -1)
    module = tower.module()
    out = module(pixels, output_hidden_states=-1)
    want = encoder(pixels)  # the artifact's own forward: head on the final tokens, per patch
    torch.testing.assert_close(out.hidden_states[-1], want, rtol=0, atol=0)
    torch.testing.assert_close(out.last_hidden_state, want, rtol=0, atol=0)
    torch.testing.assert_close(
        module(pixels, output_hidden_states=-2).hidden_states[-2], encoder(pixels, layer=-2)
    )


@torch.no_grad()
def test_output_hidden_states_as_index_bool_or_list(pixels) -> None:
    from transformers import Dinov2WithRegistersModel

    backbone = Dinov2WithRegistersModel.from_pretrained(
        load_vision_encoder("tiny-dinov2-reg-random").model.name_or_path
    )
    tower = AlignedTower(
        AlignedTowerConfig(vision_backbone=backbone.config.to_dict(), token_rule="patch")
    ).eval()
    tower.backbone.load_state_dict(backbone.state_dict())
    ref = backbone(pixels, output_hidden_states=True)
    out = tower(pixels, output_hidden_states=-2)
    assert [h is None for h in out.hidden_states] == [True, True, True, False, True]
    torch.testing.assert_close(
        out.hidden_states[-2], ref.hidden_states[-2][:, 5:]
    )  # CLS + 4 registers dropped
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state[:, 5:])
    assert all(
        h is not None and h.shape == (2, 64, 96)
        for h in tower(pixels, output_hidden_states=True).hidden_states
    )
    assert tower(pixels, output_hidden_states=False).hidden_states is None
    both = tower(pixels, output_hidden_states=[1, -1]).hidden_states
    assert both[1] is not None and both[-1] is not None and both[2] is None
    with pytest.raises(ValueError, match="out of range"):
        tower(pixels, output_hidden_states=9)
    keep = AlignedTower(AlignedTowerConfig(vision_backbone=backbone.config.to_dict(), token_rule="all"))
    assert keep.config.num_output_tokens == 69 and keep(pixels).last_hidden_state.shape == (2, 69, 96)
    with pytest.raises(ValueError, match="token_rule"):
        AlignedTowerConfig(vision_backbone=backbone.config.to_dict(), token_rule="middle")


@torch.no_grad()
def test_tower_saves_and_reloads_through_auto_classes(tmp_path, pixels) -> None:
    from transformers import AutoConfig, AutoModel

    encoder = _artifact(tmp_path, "sail_glu", "tiny-dinov2-random")
    module = new_tower(encoder).module()
    module.save_pretrained(tmp_path / "tower")
    config = AutoConfig.from_pretrained(tmp_path / "tower")
    assert config.model_type == "mllm_swap_aligned_tower" and config.head_config["kind"] == "sail_glu"
    again = AutoModel.from_pretrained(tmp_path / "tower").eval()
    assert isinstance(again, AlignedTower)
    torch.testing.assert_close(
        again(pixels).last_hidden_state, module(pixels).last_hidden_state, rtol=0, atol=0
    )


@torch.no_grad()
def test_llava_get_image_features_with_aligned_tower(tmp_path, pixels) -> None:
    """Llava passes the layer index as ``output_hidden_states`` and indexes ``hidden_states`` with it."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    encoder = _artifact(tmp_path, "freeze_align", "tiny-dinov2-reg-random")
    tower = new_tower(encoder)
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=40
    )
    config = LlavaConfig(
        vision_config=tower.config, text_config=text, image_token_index=39, image_seq_length=64,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(tower.state_dict)
    feats = model.get_image_features(pixel_values=pixels).pooler_output
    proj = model.model.multi_modal_projector
    want = proj(encoder(pixels))
    torch.testing.assert_close(torch.stack(list(feats)), want)
    ids = torch.tensor([[1] + [39] * 64 + [2]])
    assert model(input_ids=ids, pixel_values=pixels[:1]).logits.shape == (1, 66, 40)


@torch.no_grad()
def test_openclip_visual_as_hf_clip_tower_keeps_hidden_states(pixels) -> None:
    """open_clip -> HF CLIPVisionModel: every hidden state LLaVA could select is unchanged."""
    from mllm_swap.towers import openclip_as_hf

    encoder = load_vision_encoder("tiny-openclip")
    tower = openclip_as_hf(new_tower(encoder))
    assert (tower.kind, tower.config.model_type, tower.config.hidden_act, tower.num_tokens) == (
        "hf", "clip_vision_model", "quick_gelu", 64,
    )  # fmt: skip
    states = tower.module()(pixels, output_hidden_states=True).hidden_states
    assert len(states) == encoder.num_layers + 1
    for layer in (0, -2, -1):
        torch.testing.assert_close(states[layer], encoder(pixels, layer=layer), rtol=1e-5, atol=1e-5)
