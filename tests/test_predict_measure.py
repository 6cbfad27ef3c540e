"""A swap's ``measurements`` (``swap_report.json``), checked against a second computation from the encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mllm_swap.cli import main
from mllm_swap.measure import NAMES

N = 16


def swap_measurements(out, encoder: str, mode: str, data, *extra: str) -> dict:
    argv = ["swap", "--mllm", "tiny-llava", "--encoder", encoder, "--mode", mode, "--data", str(data),
            "--measure-images", str(N), "--out", str(out), *extra]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "swap_report.json").read_text())
    assert set(report["measurements"]) == set(NAMES)
    assert report["measured_on"]["images"] == N and "test split" in report["measured_on"]["source"]
    return report["measurements"]


def consumed(encoder_id: str, images: list) -> np.ndarray:
    """Layer -2 patch tokens (CLS dropped) of an encoder loaded on its own: what LLaVA's connector reads."""
    from align.load import load_vision_encoder

    enc = load_vision_encoder(encoder_id).eval()
    with torch.no_grad():
        return enc(enc.preprocess(images), layer=-2)[:, enc.num_prefix_tokens :].double().numpy()


def grid4(tokens: np.ndarray) -> np.ndarray:
    """[N, 64, D] (8x8, row-major) -> [N, 16 D]: 2x2 block means."""
    n, _, d = tokens.shape
    return tokens.reshape(n, 4, 2, 4, 2, d).mean(axis=(2, 4)).reshape(n, -1)


def debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased HSIC (Song et al. 2012) from explicit Gram matrices with zeroed diagonals."""

    def hsic(k: np.ndarray, m: np.ndarray) -> float:
        n = k.shape[0]
        one = np.ones(n)
        return (np.trace(k @ m) + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ k @ m @ one) / (n * (n - 3))  # fmt: skip

    x, y = x - x.mean(0), y - y.mean(0)
    k, m = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(m, 0)
    return hsic(k, m) / np.sqrt(hsic(k, k) * hsic(m, m))


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    def neighbours(a: np.ndarray) -> list[set]:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        sims = a @ a.T
        np.fill_diagonal(sims, -np.inf)
        return [set(np.argsort(-row)[:k]) for row in sims]

    return float(np.mean([len(p & q) / k for p, q in zip(neighbours(x), neighbours(y), strict=True)]))


def test_measurements_match_a_second_computation(tmp_path, shapes_dir, one_thread):
    from align.data.images import open_image
    from align.data.readers import open_data

    same = swap_measurements(tmp_path / "same", "tiny-clip", "dropin", shapes_dir)
    for name in ("token_cosine", "token_cka", "token_mknn", "llm_input_cosine", "llm_input_cka", "llm_input_mknn"):
        assert same[name] == pytest.approx(1.0, abs=1e-6), name  # the tower the MLLM already has
    assert same["probe_new"] == same["probe_old"]

    other = swap_measurements(tmp_path / "random", "tiny-dinov2-random", "rebuild", shapes_dir)
    images = [open_image(s.image).convert("RGB") for s in open_data(str(shapes_dir), split="test").samples[:N]]
    old, new = grid4(consumed("tiny-clip", images)), grid4(consumed("tiny-dinov2-random", images))
    assert other["token_cosine"] is None  # widths 64 and 96: no per-token cosine
    assert other["token_cka"] == pytest.approx(debiased_cka(new, old), abs=2e-3)
    assert other["token_mknn"] == pytest.approx(mutual_knn(new, old, k=10), abs=1 / (10 * N) + 1e-9)
    assert other["token_cka"] < 0.95 and other["probe_old"] == same["probe_old"]
    assert other["llm_input_cosine"] < 0.9  # a re-initialised connector input layer


def test_bridge_report_carries_measurements(tmp_path, shapes_dir, one_thread):
    m = swap_measurements(tmp_path / "bridge", "tiny-siglip", "bridge", shapes_dir, "--steps", "2", "--no-compare",
                          "--vqa-limit", "0")  # fmt: skip
    assert all(m[name] is not None for name in NAMES)  # bridged to the old width: every measurement defined
    assert -1 <= m["token_cosine"] <= 1 and 0 < m["llm_vocab_cosine"] <= 1
