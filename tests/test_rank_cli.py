"""`mllm-swap rank` (old word: `score`) on tiny encoders and the shapes world, bad inputs, and the probe metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.metrics.cka import cka_null, linear_cka
from align.metrics.probe import alignment_probe, retrieval_recall
from mllm_swap.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_retrieval_recall_hand_built():
    # image 0 -> text 0 ranked 1st; image 1 -> text 1 ranked 2nd; image 2 -> text 2 ranked 3rd.
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.2], [0.7, 0.6, 0.3]])
    got = retrieval_recall(sim, ks=(1, 2, 3))
    assert got["i2t_R@1"] == pytest.approx(1 / 3) and got["i2t_R@2"] == pytest.approx(2 / 3)
    assert got["i2t_R@3"] == 1.0
    # text 0: image 0 best (0.9) -> rank 1; text 1: 0.5 vs 0.1, 0.6 -> rank 2; text 2: 0.3 best -> rank 1.
    assert got["t2i_R@1"] == pytest.approx(2 / 3) and got["t2i_R@2"] == 1.0
    with pytest.raises(ValueError, match="square"):
        retrieval_recall(torch.zeros(2, 3))


@pytest.mark.parametrize("loss", ["sigmoid", "infonce"])
def test_probe_separates_related_from_unrelated_features(loss):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(400, 8, generator=gen)
    img = z @ torch.randn(8, 24, generator=gen) + 0.2 * torch.randn(400, 24, generator=gen)
    txt = torch.tanh(z @ torch.randn(8, 16, generator=gen)) + 0.05 * torch.randn(400, 16, generator=gen)
    related = alignment_probe(img, txt, loss=loss, steps=150, out_dim=32)
    unrelated = alignment_probe(img, torch.randn(400, 16, generator=gen), loss=loss, steps=150, out_dim=32)
    assert related["n_test"] == 80
    assert related["i2t_R@10"] > 0.6 and related["t2i_R@10"] > 0.6
    assert unrelated["i2t_R@10"] < 0.35  # chance is 10/80
    with pytest.raises(ValueError, match="loss"):
        alignment_probe(img, txt, loss="mse")


def test_rank_toy_cli(tmp_path, capsys):
    assert (
        main(["rank", "toy", "--out", str(tmp_path), "--instances", "12", "--steps", "30", "--d", "4"]) == 0
    )
    result = json.loads((tmp_path / "toy.json").read_text())
    assert len(result["points"]) == 12 and result["config"]["d"] == 4 and result["config"]["n"] == 32
    assert (tmp_path / "toy.png").read_bytes()[:4] == b"\x89PNG"
    assert f"{result['pearson_r']:.3f}" in capsys.readouterr().out


@torch.no_grad()
def _mean_token_features(vision_id: str, text_id: str, shapes_dir: Path, ids: list[str]):
    """The features the command should use, computed directly from the encoders and the files."""
    from PIL import Image

    from align.load import load_text_encoder, load_vision_encoder

    rows = {}
    for line in (shapes_dir / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["id"]] = row
    vision, text = load_vision_encoder(vision_id), load_text_encoder(text_id)
    images = [Image.open(shapes_dir / rows[i]["image"]).convert("RGB") for i in ids]
    img = vision(vision.preprocess(images)).mean(dim=1)
    txt = text.encode([rows[i]["caption"] for i in ids])
    return img, txt


def test_rank_pairs_cli_on_tiny_encoders(shapes_dir, tmp_path, capsys):
    out = tmp_path / "scores"
    argv = ["rank", "--vision", "tiny-clip", "--text", "tiny-clip,tiny-text", "--data", str(shapes_dir)]
    assert main([*argv, "--n", "60", "--out", str(out), "--metrics", "cka,mknn,probe", "--knn", "5"]) == 0
    result = json.loads((out / "scores.json").read_text())
    assert (
        result["n"] == 60
        and result["vision"] == ["tiny-clip"]
        and result["text"] == ["tiny-clip", "tiny-text"]
    )
    assert len(result["grid"]["cka"]) == 1 and len(result["grid"]["cka"][0]) == 2
    for metric in ("cka", "mknn", "probe"):
        assert (out / f"heatmap_{metric}.png").is_file()
    firsts = [p["cka"] for p in result["pairs"]]
    assert firsts == sorted(firsts, reverse=True)
    printed = capsys.readouterr().out
    assert (
        "rank" in printed
        and "tiny-text" in printed
        and "cka null" in printed
        and "10 shuffles, n=60" in printed
    )

    from align.data.readers import open_data
    from align.evals.pairs import load_samples

    ids = [s.id for s in load_samples(str(shapes_dir), 60, 0, "raise")]
    assert len(ids) == 60 and len({s.id for s in open_data(shapes_dir)}) == 96
    img, txt = _mean_token_features("tiny-clip", "tiny-text", shapes_dir, ids)
    assert result["cka_estimator"].startswith("debiased")
    assert result["grid"]["cka"][0][1] == pytest.approx(linear_cka(img, txt, debiased=True), rel=1e-4)
    null = next(p for p in result["pairs"] if p["text"] == "tiny-text")["null"]["cka"]
    expected = cka_null(img, txt, "linear", debiased=True, permutations=10, seed=0)
    assert null["permutations"] == 10 and null["mean"] == pytest.approx(expected["mean"], abs=1e-5)
    assert null["sd"] == pytest.approx(expected["sd"], rel=1e-3)
    out_biased = tmp_path / "biased"
    assert main([*argv, "--n", "60", "--out", str(out_biased), "--metrics", "cka", "--biased-cka"]) == 0
    biased = json.loads((out_biased / "scores.json").read_text())
    assert biased["grid"]["cka"][0][1] == pytest.approx(linear_cka(img, txt, debiased=False), rel=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vision", "no-such-encoder", "--text", "tiny-text"], "no-such-encoder"),
        (["--vision", "tiny-clip", "--text", "tiny-text", "--metrics", "cka,bleu"], "bleu"),
        (["--text", "tiny-text"], "--vision is required"),
        (["--vision", "tiny-clip", "--text", "tiny-text", "--n", "3"], "--n must be >= 4"),
    ],
)
def test_rank_bad_inputs(shapes_dir, tmp_path, capsys, extra, message):
    code = main(["rank", "--data", str(shapes_dir), "--out", str(tmp_path), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_score_alias_missing_data_and_toy_misuse(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    args = [
        "score",
        "--vision",
        "tiny-clip",
        "--text",
        "tiny-text",
        "--data",
        str(missing),
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["score", "toy", "--out", str(tmp_path), "--vision", "tiny-clip"]) == 2
    assert "mllm-swap score: error: score toy takes no --vision" in capsys.readouterr().err
    assert main(["score", "toy", "--out", str(tmp_path), "--n", "1"]) == 2
    assert "n must be >= 2" in capsys.readouterr().err
