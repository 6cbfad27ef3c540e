"""Zero-shot metrics on hand-built cases with known answers, naive re-implementations, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from align.evals.zeroshot import shapes_minimal_pairs
from align.metrics.zeroshot import (
    class_embeddings,
    classification_metrics,
    paired_accuracy,
    retrieval_metrics,
    segmentation_miou,
    zeroshot_classifier,
)


def one_hot(i: int, d: int = 4) -> torch.Tensor:
    return F.one_hot(torch.tensor(i), d).float()


def test_classifier_averages_normalized_template_embeddings():
    table = {"a x": [3.0, 0, 0], "the x": [0, 1.0, 0], "a y": [0, 0, 2.0], "the y": [0, 0, 5.0]}

    def encode(texts):
        return torch.tensor([table[t] for t in texts])

    w = zeroshot_classifier(encode, ["x", "y"], ["a {}", "the {}"])
    # x: normalize([1,0,0]) + normalize([0,1,0]) averaged -> [.5,.5,0] -> renormalized
    assert torch.allclose(w[0], torch.tensor([1.0, 1.0, 0.0]) / 2**0.5)
    assert torch.allclose(w[1], torch.tensor([0.0, 0.0, 1.0]))
    groups = class_embeddings(encode, [["a x"], ["a y", "the y", "the x"]])
    expected = F.normalize(torch.tensor([0.0, 1.0, 2.0]) / 3, dim=0)
    assert torch.allclose(groups[1], expected)


def test_classification_acc1_half_and_mean_per_class_recall():
    classes = torch.eye(3, 4)
    # labels 0,0,1,2 ; predictions 0,1,1,0 -> acc1 2/4; recalls: class0 1/2, class1 1/1, class2 0/1
    images = torch.stack([one_hot(0), one_hot(1), one_hot(1), one_hot(0) + 0.1 * one_hot(2)])
    m = classification_metrics(images, classes, torch.tensor([0, 0, 1, 2]))
    assert m["acc1"] == 0.5
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["acc5"] == 1.0  # top min(5, 3) = every class
    assert m["chance"] == pytest.approx(1 / 3) and m["majority"] == 0.5


def test_classification_acc5_counts_rank_within_five():
    classes = torch.eye(7)
    image = torch.tensor([[0.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])  # class 0 ranks last, class 5 ranks 5th
    assert classification_metrics(image, classes, torch.tensor([5]))["acc5"] == 1.0
    assert classification_metrics(image, classes, torch.tensor([6]))["acc5"] == 0.0
    assert classification_metrics(image, classes, torch.tensor([1]))["acc1"] == 1.0


def naive_recall(image_emb, text_emb, owner, k):
    sims = F.normalize(text_emb, dim=-1) @ F.normalize(image_emb, dim=-1).T
    t2i = []
    for j in range(sims.shape[0]):
        order = sorted(range(sims.shape[1]), key=lambda i: -sims[j, i].item())
        t2i.append(owner[j].item() in order[:k])
    i2t = []
    for i in range(sims.shape[1]):
        order = sorted(range(sims.shape[0]), key=lambda j: -sims[j, i].item())
        i2t.append(any(owner[j].item() == i for j in order[:k]))
    return sum(t2i) / len(t2i), sum(i2t) / len(i2t)


def test_retrieval_planted_hits():
    images = torch.eye(4)
    # texts 0-3 point at their own image; text 4 belongs to image 0 but looks like image 3
    texts = torch.cat([torch.eye(4), (one_hot(3) + 0.1 * one_hot(0)).unsqueeze(0)])
    owner = torch.tensor([0, 1, 2, 3, 0])
    m = retrieval_metrics(images, texts, owner, ks=(1, 2))
    assert m["image_retrieval_recall@1"] == pytest.approx(4 / 5)
    assert m["text_retrieval_recall@1"] == 1.0  # every image's best text is its own
    assert m["image_retrieval_recall@2"] == 1.0


def test_retrieval_matches_naive_on_random_data():
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(12, 8, generator=g), torch.randn(30, 8, generator=g)
    owner = torch.randint(0, 12, (30,), generator=g)
    m = retrieval_metrics(images, texts, owner, ks=(1, 5, 10))
    for k in (1, 5, 10):
        t2i, i2t = naive_recall(images, texts, owner, k)
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)


def test_paired_accuracy_needs_both_texts():
    images = torch.stack([torch.stack([one_hot(0), one_hot(1)]), torch.stack([one_hot(0), one_hot(1)])])
    good = torch.stack([one_hot(0), one_hot(1)])
    half = torch.stack([one_hot(0), one_hot(0) + 0.1 * one_hot(1)])  # second text picks the wrong image
    m = paired_accuracy(images, torch.stack([good, half]))
    assert m["pair_acc"] == 0.5 and m["text_acc"] == 0.75 and m["n"] == 2


def test_segmentation_known_mask():
    # 2x2 patch grid on 16x16 masks; left column class 1, right column class 2
    classes = torch.eye(3)
    patches = torch.stack([one_hot(1, 3), one_hot(2, 3), one_hot(1, 3), one_hot(2, 3)]).unsqueeze(0)
    mask = torch.zeros(1, 16, 16, dtype=torch.long)
    mask[:, :, :8], mask[:, :, 8:] = 1, 2
    m = segmentation_miou(patches, classes, mask)
    assert m["miou"] == 1.0 and m["pixel_acc"] == 1.0 and m["per_class_iou"][0] is None
    # predicting class 1 everywhere: IoU(1) = 128/256, IoU(2) = 0
    m = segmentation_miou(one_hot(1, 3).expand(1, 4, 3), classes, mask)
    assert m["per_class_iou"] == [None, 0.5, 0.0] and m["miou"] == 0.25 and m["pixel_acc"] == 0.5


def test_shapes_minimal_pairs_differ_in_one_attribute():
    rows = [{"attributes": {"color": c, "shape": s}} for c in ("red", "blue") for s in ("circle", "cross")]
    pairs = shapes_minimal_pairs(rows * 3, 10, seed=1)
    assert len(pairs) == 10
    for a, b in pairs:
        x, y = a["attributes"], b["attributes"]
        assert (x["color"] == y["color"]) + (x["shape"] == y["shape"]) == 1


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from align.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("zs") / "shapes"
    generate_shapes(out, 40, seed=3, progress=False)
    return out


def test_dual_encoder_clip_matches_hf_and_tasks_run(shapes):
    from align.evals.zeroshot import run_task
    from align.load import load_dual_encoder

    dual = load_dual_encoder("tiny-clip")
    pixels = torch.rand(2, 3, 64, 64)
    want = F.normalize(dual.vision.model(pixel_values=pixels).image_embeds, dim=-1)
    assert torch.allclose(dual.encode_images(pixels), want, atol=1e-6)
    assert dual.patch_embeddings(pixels).shape == (2, 64, 64)
    res = run_task(dual, "classify", shapes, label="shape", split="test")
    assert res["n"] == 8 and res["chance"] == 0.25 and 0 <= res["acc1"] <= 1
    assert run_task(dual, "retrieve", shapes, captions=("caption", "long_caption"))["n_texts"] == 16
    assert run_task(dual, "pairs", shapes, split=None, n_pairs=5)["n"] == 5
    seg = run_task(dual, "segment", shapes)
    assert seg["classes"][0] == "background" and 0 <= seg["miou"] <= 1


def test_zeroshot_cli_writes_json_and_rejects_non_dual(shapes, tmp_path, capsys):
    from mllm_swap.cli import main

    assert main(["zeroshot", "--model", "tiny-openclip", "--task", "classify", "--label", "color",
                 "--data", str(shapes), "--out", str(tmp_path)]) == 0  # fmt: skip
    result = json.loads((tmp_path / "zeroshot-classify-color.json").read_text())
    assert result["classes"][0] == "red" and "acc1" in capsys.readouterr().out
    code = main(["zeroshot", "--model", "tiny-dinov2-random", "--data", str(shapes), "--out", str(tmp_path)])
    assert code == 2 and "not a dual encoder" in capsys.readouterr().err
