"""Concept-balanced curation: selection rules on hand-built scores, a naive reference, and a real run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from align.data.curate import concept_prototypes, select_balanced


def naive_select(scores, k, top_k, min_score):
    n, c = scores.shape
    cand = {j: [] for j in range(c)}
    for i in range(n):
        ranked = sorted(range(c), key=lambda j: -scores[i, j].item())
        allowed = ranked[:top_k] if top_k is not None else ranked
        for j in allowed:
            if min_score is None or scores[i, j].item() >= min_score:
                cand[j].append(i)
    claimed, chosen = set(), [[] for _ in range(c)]
    for j in sorted(range(c), key=lambda j: (len(cand[j]), j)):
        pool = sorted((i for i in cand[j] if i not in claimed), key=lambda i: (-scores[i, j].item(), i))
        chosen[j] = pool[:k]
        claimed.update(chosen[j])
    return chosen, [len(cand[j]) for j in range(c)]


def test_rarest_concept_first_claims_shared_sample():
    # concept 1 has 1 candidate (sample 0), concept 0 has 3 (samples 0, 1, 2): concept 1 goes first
    scores = torch.tensor([[0.9, 0.8], [0.7, 0.1], [0.6, 0.2]])
    chosen, counts = select_balanced(scores, k=10, top_k=None, min_score=0.5)
    assert counts == [3, 1]
    assert chosen == [[1, 2], [0]]


def test_cap_k_keeps_best_scores_and_no_double_claims():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.95, 0.3], [0.5, 0.4], [0.7, 0.6]])
    chosen, counts = select_balanced(scores, k=2, top_k=1)
    assert counts == [4, 1]  # top-1 concept: sample 0 -> concept 1, samples 1-4 -> concept 0
    assert chosen[1] == [0] and chosen[0] == [2, 1]  # best two of concept 0 by score
    flat = [i for c in chosen for i in c]
    assert len(flat) == len(set(flat))


def test_matches_naive_reference_on_random_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(200, 7, generator=g) ** 3  # skewed so concepts differ in rarity
    for k, top_k, min_score in [(5, 2, None), (30, None, 0.2), (1000, 1, None), (10, 3, 0.05)]:
        got = select_balanced(scores, k=k, top_k=top_k, min_score=min_score)
        assert got == naive_select(scores, k, top_k, min_score)
        assert all(len(c) <= k for c in got[0])


def test_prototypes_are_renormalized_means_of_unit_vectors():
    a = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    protos = concept_prototypes([a, torch.tensor([[0.0, -3.0]])])
    assert torch.allclose(protos[0], F.normalize(torch.tensor([0.5, 0.5]), dim=0))
    assert torch.allclose(protos[1], torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match="at least one example"):
        concept_prototypes([torch.zeros(0, 2)])


def test_curate_cli_on_shapes(tmp_path, capsys):
    from align.data.shapes import generate_shapes
    from mllm_swap.cli import main

    data = tmp_path / "shapes"
    generate_shapes(data, 48, seed=5, progress=False)
    out = tmp_path / "cur"
    code = main(["curate", "--data", str(data), "--model", "tiny-clip", "--shapes-concepts", "shape",
                 "--shots", "2", "--k", "3", "--out", str(out)])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "concept_counts.json").read_text())
    rows = [json.loads(line) for line in (out / "curated.jsonl").read_text().splitlines()]
    assert {r["concept"] for r in summary["concepts"]} == {"circle", "cross", "square", "triangle"}
    assert all(r["kept"] <= 3 for r in summary["concepts"]) and summary["kept"] == len(rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert (out / "concept_counts.tsv").read_text().startswith("concept\tcandidates\tkept")
    assert "kept" in capsys.readouterr().out
    assert main(["curate", "--data", str(data), "--out", str(out)]) == 2
