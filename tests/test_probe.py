"""`mllm-swap probe`: linear probes of shapes-world attributes in frozen vision features.

The probe itself is checked against scikit-learn's logistic regression (the same objective), on features
that encode a label by construction and on shuffled labels; the features against the tiny models run
through plain transformers; the command end to end on a small shapes world.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from align.metrics.linear_probe import linear_probe
from align.metrics.probe import standardize
from mllm_swap.cli import main

L2 = 1e-3
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from align.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("probe") / "shapes"
    generate_shapes(out, n=120, seed=3, progress=False)
    return out


def encoded(n: int, classes: int, dim: int, signal: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features holding a label linearly: noise plus ``signal`` times the label's fixed random direction."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    y = torch.randint(classes, (n,), generator=gen)
    return torch.randn(n, dim, generator=gen) + signal * directions[y], y


def test_an_encoded_label_is_read_and_a_shuffled_one_is_not():
    x, y = encoded(600, 4, 16, signal=3.0, seed=0)
    got = linear_probe(x[:400], y[:400], x[400:], y[400:], num_classes=4)
    assert got["accuracy"] > 0.97 and got["train_accuracy"] > 0.97
    assert (got["n_train"], got["n_test"], got["chance"]) == (400, 200, 0.25)
    shuffled = y[:400][torch.randperm(400, generator=torch.Generator().manual_seed(1))]
    control = linear_probe(x[:400], shuffled, x[400:], y[400:], num_classes=4)
    assert abs(control["accuracy"] - 0.25) < 3 * (0.25 * 0.75 / 200) ** 0.5  # chance within 3 standard errors


def test_majority_is_the_training_majority_scored_on_test():
    x = torch.randn(10, 3)
    train_y = torch.tensor([2, 2, 2, 0, 1])  # majority class 2
    test_y = torch.tensor([0, 0, 0, 2, 1])  # 1 of 5 test rows is class 2
    got = linear_probe(x[:5], train_y, x[5:], test_y, num_classes=3)
    assert got["majority"] == pytest.approx(0.2) and got["chance"] == pytest.approx(1 / 3)
    assert got["stderr"] == pytest.approx((got["accuracy"] * (1 - got["accuracy"]) / 5) ** 0.5)


def sklearn_probe(train_x, train_y, test_x, l2: float = L2):
    """scikit-learn's multinomial logistic regression with the same objective: test predictions, weights."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    tr, te = standardize(train_x.double(), test_x.double())
    model = linear_model.LogisticRegression(C=1 / (2 * l2 * len(train_y)), tol=1e-10, max_iter=10000)
    model.fit(tr.numpy(), train_y.numpy())
    return torch.from_numpy(model.predict(te.numpy())), torch.from_numpy(model.coef_.T)


def test_probe_reaches_scikit_learns_optimum():
    from align.metrics.linear_probe import fit_logistic

    x, y = encoded(500, 5, 12, signal=0.6, seed=2)  # overlapping classes: accuracy well below 1
    got = linear_probe(x[:350], y[:350], x[350:], y[350:], num_classes=5)
    predicted, coef = sklearn_probe(x[:350], y[:350], x[350:])
    assert 0.4 < got["accuracy"] < 0.95
    assert got["accuracy"] == pytest.approx(float((predicted == y[350:]).double().mean()), abs=1 / 150)
    w, _ = fit_logistic(standardize(x[:350].double(), x[350:].double())[0], y[:350], 5, L2)
    assert torch.allclose(w, coef, atol=1e-3), (w - coef).abs().max()


def test_more_features_than_rows_reaches_scikit_learns_optimum():
    """With D > N the fit runs in the training rows' span and maps back: the same weights as scikit-learn's
    fit over all D features, and weights with no component outside that span."""
    from align.metrics.linear_probe import fit_logistic

    x, y = encoded(90, 3, 150, signal=0.5, seed=4)
    train, test = standardize(x[:60].double(), x[60:].double())
    w, b = fit_logistic(train, y[:60], 3, L2)
    predicted, coef = sklearn_probe(x[:60], y[:60], x[60:])
    assert w.shape == (150, 3) and b.shape == (3,)
    assert torch.allclose(w, coef, atol=1e-3), (w - coef).abs().max()
    assert torch.equal((test @ w + b).argmax(dim=1), predicted)
    outside = w - train.T @ torch.linalg.lstsq(train.T, w).solution  # the part off the rows' span
    assert outside.abs().max() < 1e-8


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-dinov2-reg-random"])
def test_features_are_what_plain_transformers_gives(name, world):
    """CLS after the final norm, and layer -2 patch tokens without the prefix (CLS + 4 registers), averaged
    over all patches and over the cells of a 4x4 grid."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    from align.data.readers import open_data
    from align.embedded import tiny_model_dir
    from align.evals.attributes import encoder_features
    from align.load import load_vision_encoder

    samples = open_data(world, split="test").samples[:6]
    ours = encoder_features(load_vision_encoder(name), samples, batch_size=4)
    folder = tiny_model_dir(name)
    model = AutoModel.from_pretrained(folder).eval()
    model = getattr(model, "vision_model", model)  # CLIPModel -> its vision tower
    pixels = AutoImageProcessor.from_pretrained(folder)([Image.open(s.image).convert("RGB") for s in samples],
                                                        return_tensors="pt")["pixel_values"]  # fmt: skip
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    assert prefix == (5 if name == "tiny-dinov2-reg-random" else 1)
    torch.testing.assert_close(ours["cls"], out.pooler_output, atol=1e-4, rtol=1e-4)  # the normed CLS
    patches = out.hidden_states[-2][:, prefix:]
    torch.testing.assert_close(ours["patch_mean"], patches.mean(dim=1), atol=1e-4, rtol=1e-4)
    # patch_grid: the 8x8 patches in 2x2 blocks (a 4x4 grid), each block's mean, cells row-major per channel
    blocks = patches.reshape(6, 4, 2, 4, 2, -1).mean(dim=(2, 4))  # [N, row, col, D]
    torch.testing.assert_close(ours["patch_grid"], blocks.permute(0, 3, 1, 2).flatten(1), atol=1e-4, rtol=1e-4)


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def test_probe_command_on_a_shapes_world(world, tmp_path, capsys):
    from align.data.readers import open_data
    from align.evals.attributes import encoder_features, read_probe_data
    from align.load import load_vision_encoder

    out = tmp_path / "probe"
    argv = ["probe", "--encoder", "tiny-clip,tiny-dinov2-random", "--data", str(world), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"probe.json", "probe.md", "probe.png", "run.json"}
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "probe.json").read_text())
    assert result["data"].startswith("../") and (out / result["data"]).resolve() == world.resolve()
    n_train, n_test = (len(open_data(world, split=s)) for s in ("train", "test"))
    assert n_train + n_test == 120 and n_test > 10

    rows = table_rows((out / "probe.md").read_text())
    assert rows[0] == ["encoder", "feature", "attribute", "accuracy", "stderr", "chance", "majority", "n_test"]
    assert rows == table_rows(printed)
    body = rows[2:]
    assert len(body) == len(result["results"]) == 2 * 3 * 4
    for cells, row in zip(body, result["results"], strict=True):
        assert cells[:3] == [row["encoder"], row["feature"], row["attribute"]]
        assert [float(c) for c in cells[3:7]] == [round(row[k], 3) for k in ("accuracy", "stderr", "chance", "majority")]
        assert int(cells[7]) == row["n_test"] == n_test and row["n_train"] == n_train
        assert row["chance"] == pytest.approx(1 / len(result["classes"][row["attribute"]]))
    assert result["classes"]["count"] == ["1", "2", "3"] and len(result["classes"]["position"]) == 9

    # each number again, independently: scikit-learn fitted on the train split's features
    data = read_probe_data(world)
    by_key = {(r["encoder"], r["feature"], r["attribute"]): r for r in result["results"]}
    for name in ("tiny-clip", "tiny-dinov2-random"):
        encoder = load_vision_encoder(name)
        train, test = encoder_features(encoder, data.train), encoder_features(encoder, data.test)
        for feature in ("cls", "patch_mean", "patch_grid"):
            for label in ("color", "shape", "count", "position"):
                predicted, _ = sklearn_probe(train[feature], data.train_y[label], test[feature])
                expected = float((predicted == data.test_y[label]).double().mean())
                assert by_key[name, feature, label]["accuracy"] == pytest.approx(expected, abs=1.01 / n_test)

    # a finished output is not replaced without --overwrite
    assert main(argv) == 2
    assert re.search(r"finished run of `mllm-swap probe`", capsys.readouterr().err)
