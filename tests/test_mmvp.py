"""Shapes-MMVP: the mined pairs are CLIP-blind (checked with plain transformers), the MMVP-VLM score of
``zeroshot --task pairs`` and the lmms-eval task ``shapes_mmvp`` score an oracle at 1 and a blind model at 0."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from align.data.shapes import MMVP_PAIRS, generate_shapes, load_shapes
from align.data.shapes_text import answer
from align.evals.mmvp import load_mmvp_pairs, mmvp_vlm_score, select_pairs
from align.io import read_json, read_jsonl
from mllm_swap.cli import main

CLIP, DINO = "tiny-clip-shapes", "tiny-dinov2-random"
CLIP_Q, DINO_Q = 0.9, 0.7  # a small world: looser than the defaults, so that it holds pairs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-scene world (80 held out) with its Shapes-MMVP pairs mined by the CLI into the world folder."""
    out = tmp_path_factory.mktemp("mmvp") / "world"
    generate_shapes(out, 400, seed=5, progress=False)
    code = main(["data", "mmvp", "--data", str(out), "--clip", CLIP, "--dino", DINO,
                 "--clip-quantile", str(CLIP_Q), "--dino-quantile", str(DINO_Q)])  # fmt: skip
    assert code == 0
    return out


@torch.no_grad()
def hf_cosines(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Cosine matrices of the held-out images by plain transformers: CLIP image features, DINOv2 CLS."""
    from transformers import AutoImageProcessor, CLIPModel, Dinov2Model

    from align.encoders.registry import resolve

    images = [Image.open(r["image"]).convert("RGB") for r in rows]
    clip_dir, dino_dir = resolve(CLIP), resolve(DINO)
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    c = clip.get_image_features(
        **AutoImageProcessor.from_pretrained(clip_dir)(images=images, return_tensors="pt")
    )
    c = getattr(c, "pooler_output", c)  # transformers 5 may wrap the features
    dino = Dinov2Model.from_pretrained(dino_dir).eval()
    d = dino(
        **AutoImageProcessor.from_pretrained(dino_dir)(images=images, return_tensors="pt")
    ).last_hidden_state[:, 0]
    c, d = F.normalize(c, dim=-1).numpy(), F.normalize(d, dim=-1).numpy()
    return c @ c.T, d @ d.T


def test_pairs_are_clip_blind_and_their_answers_differ(world: Path):
    rows = load_shapes(world, split="test")
    index = {r["id"]: k for k, r in enumerate(rows)}
    clip_cos, dino_cos = hf_cosines(rows)
    upper = np.triu_indices(len(rows), k=1)
    clip_min, dino_max = np.quantile(clip_cos[upper], CLIP_Q), np.quantile(dino_cos[upper], DINO_Q)
    meta = read_json(world / "mmvp_meta.json")
    assert meta["clip_min"] == pytest.approx(clip_min, abs=1e-4) and meta["dino_max"] == pytest.approx(
        dino_max, abs=1e-4
    )
    pairs = load_mmvp_pairs(world)
    assert len(pairs) >= 3 and meta["pairs"] == len(pairs)
    used = set()
    for pair in pairs:
        i, j = (index[s] for s in pair["ids"])
        assert [Path(p).name for p in pair["images"]] == [
            Path(rows[i]["image"]).name,
            Path(rows[j]["image"]).name,
        ]
        assert clip_cos[i, j] >= clip_min - 1e-5 and dino_cos[i, j] <= dino_max + 1e-5
        assert pair["clip_cos"] == pytest.approx(clip_cos[i, j], abs=1e-4)
        assert pair["dino_cos"] == pytest.approx(dino_cos[i, j], abs=1e-4)
        a, b = rows[i]["attributes"], rows[j]["attributes"]
        truth = [answer(a, pair["kind"]), answer(b, pair["kind"])]
        assert pair["answers"] == truth and truth[0] != truth[1] and sorted(pair["options"]) == sorted(truth)
        assert pair["differs"] == [
            k for k in ("count", "position", "color", "shape") if answer(a, k) != answer(b, k)
        ]
        assert not used & {i, j}  # each image in one pair only
        used |= {i, j}
    # nothing left out: every other qualifying pair of two unused scenes would have been taken
    for i, j in zip(*upper, strict=True):
        if i in used or j in used or clip_cos[i, j] < clip_min + 1e-5 or dino_cos[i, j] > dino_max - 1e-5:
            continue
        a, b = rows[i]["attributes"], rows[j]["attributes"]
        assert all(answer(a, k) == answer(b, k) for k in ("count", "position", "color", "shape")), (i, j)


def test_select_pairs_prefers_the_largest_gap_and_uses_each_image_once():
    attrs = [{"count": 1, "position": p, "color": "red", "shape": "circle"} for p in ("top", "left", "right")]
    clip = torch.tensor([[1.0, 0.99, 0.97], [0.99, 1.0, 0.98], [0.97, 0.98, 1.0]])
    dino = torch.tensor([[1.0, 0.5, 0.1], [0.5, 1.0, 0.9], [0.1, 0.9, 1.0]])
    assert select_pairs(clip, dino, attrs, 0.95, 0.95, None) == [(0, 2)]  # gap 0.87 beats 0.49; 1 left alone
    assert select_pairs(clip, dino, attrs, 0.95, 0.3, None) == [(0, 2)]
    assert select_pairs(clip, dino, attrs, 0.975, 0.95, None) == [(0, 1)]
    same = [dict(attrs[0]) for _ in range(3)]
    assert select_pairs(clip, dino, same, 0.0, 1.0, None) == []  # nothing to ask about


def _one_hot(n: int) -> torch.Tensor:
    return torch.eye(2 * n).reshape(n, 2, 2 * n)


def test_mmvp_vlm_scores_an_oracle_at_one_a_blind_model_at_zero_and_coin_flips_at_chance():
    n = 50
    oracle = mmvp_vlm_score(_one_hot(n), _one_hot(n))
    assert oracle["mmvp_vlm"] == 1.0 and oracle["mmvp_vlm_stderr"] == 0.0 and oracle["chance"] == 0.25
    blind = mmvp_vlm_score(
        torch.ones(n, 2, 8), torch.randn(n, 2, 8, generator=torch.Generator().manual_seed(0))
    )
    assert blind["mmvp_vlm"] == 0.0  # both images pick the same statement: at most one is right
    # only image 0 right: the first statement is closer to both images
    texts = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])]).expand(n, 2, 2)
    images = torch.tensor([[1.0, 0.0], [0.95, 0.31]]).expand(n, 2, 2)  # image 1: 0.95 vs 0.82
    half = mmvp_vlm_score(images, texts)
    assert (half["mmvp_vlm"], half["image_acc"], half["n"]) == (0.0, 0.5, n)
    g = torch.Generator().manual_seed(1)
    many = 4000
    coin = mmvp_vlm_score(torch.randn(many, 2, 16, generator=g), torch.randn(many, 2, 16, generator=g))
    hits = coin["mmvp_vlm"] * many
    assert coin["mmvp_vlm_stderr"] == pytest.approx(
        math.sqrt(hits * (many - hits) / (many * (many - 1)) / many)
    )
    assert abs(coin["mmvp_vlm"] - 0.25) < 3 * coin["mmvp_vlm_stderr"]


class ByOrder:
    """A hand-made dual encoder: the k-th image and the k-th text of a call get the same one-hot vector
    (an oracle), or every image the same vector (blind)."""

    name = "by-order"

    def __init__(self, blind: bool = False) -> None:
        self.blind = blind

    def encode_pil(self, images: list) -> torch.Tensor:
        return torch.ones(len(images), len(images)) if self.blind else torch.eye(len(images))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.eye(len(texts))


def test_zeroshot_pairs_task_on_the_mined_pairs(world: Path, tmp_path: Path):
    from align.evals.zeroshot import run_task

    pairs = load_mmvp_pairs(world)
    oracle = run_task(ByOrder(), "pairs", world)
    assert oracle["pairs_source"] == "shapes-mmvp" and oracle["n"] == len(pairs)
    assert oracle["mmvp_vlm"] == 1.0 and oracle["pair_acc"] == 1.0
    assert run_task(ByOrder(blind=True), "pairs", world)["mmvp_vlm"] == 0.0
    # the real CLI on tiny-clip-shapes equals the score recomputed with plain transformers
    assert (
        main(["zeroshot", "--task", "pairs", "--model", CLIP, "--data", str(world), "--out", str(tmp_path)])
        == 0
    )
    result = read_json(tmp_path / "zeroshot-pairs.json")
    from transformers import AutoProcessor, CLIPModel

    from align.encoders.registry import resolve

    model, processor = (
        CLIPModel.from_pretrained(resolve(CLIP)).eval(),
        AutoProcessor.from_pretrained(resolve(CLIP)),
    )
    hits = []
    with torch.no_grad():
        for pair in pairs:
            images = [Image.open(p).convert("RGB") for p in pair["images"]]
            out = model(
                **processor(text=pair["texts"], images=images, return_tensors="pt", padding="max_length")
            )
            own = out.logits_per_image.argmax(dim=1)  # [2]: the statement each image picks
            hits.append(
                bool(own[0] == 0 and own[1] == 1 and out.logits_per_image[0, 0] != out.logits_per_image[0, 1])
            )
    assert result["mmvp_vlm"] == pytest.approx(sum(hits) / len(hits)) and result["chance"] == 0.25
    assert result["n"] == len(pairs) and result[f"n_{pairs[0]['kind']}"] >= 1


def test_bad_input_is_refused(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["data", "mmvp", "--data", str(tmp_path), "--dino", DINO]) == 2
    assert "not a shapes-world folder" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "mmvp",
                "--data",
                str(world),
                "--dino",
                DINO,
                "--clip-quantile",
                "1.5",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "quantiles must lie in [0, 1]" in capsys.readouterr().err
    broken = tmp_path / MMVP_PAIRS
    row = read_jsonl(world / MMVP_PAIRS)[0]
    broken.write_text(json.dumps({**row, "answers": row["answers"][:1]}) + "\n")
    with pytest.raises(Exception, match=r"'answers' must be a list of 2"):
        load_mmvp_pairs(broken)


# ------------------------------------------------------------------------------------ lmms-eval task
def _evaluate(model, world: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    from lmms_eval.evaluator import simple_evaluate

    from mllm_swap.lmms.suites import task_manager

    monkeypatch.setenv("MLLM_SWAP_SHAPES_DIR", str(world))
    return simple_evaluate(model=model, tasks=["shapes_mmvp"], task_manager=task_manager(["shapes_mmvp"]))


def _answering(rule):
    """An lmms-eval model (no network, no weights) whose reply to each doc is ``rule(doc)``."""
    from lmms_eval.api.model import lmms

    class Rule(lmms):
        def generate_until(self, requests):
            return [rule(self.task_dict[r.args[4]][r.args[5]][r.args[3]]) for r in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

    return Rule()


@pytest.mark.parametrize(
    ("name", "rule", "pair_acc", "question_acc"),
    [
        ("oracle", lambda doc: f"The {doc['answer']}.", 1.0, 1.0),
        ("constant", lambda doc: doc["options"][0], 0.0, 0.5),  # blind: the same answer for both images
        ("first image only", lambda doc: doc["answer"] if doc["id"].endswith("-0") else "unknown", 0.0, 0.5),
    ],
)
def test_lmms_task_scores_pairs_only_when_both_answers_are_right(
    world: Path, monkeypatch: pytest.MonkeyPatch, name: str, rule, pair_acc: float, question_acc: float
):
    n = len(read_jsonl(world / MMVP_PAIRS))
    results = _evaluate(_answering(rule), world, monkeypatch)["results"]["shapes_mmvp"]
    assert results["pair_acc,none"] == pair_acc and results["question_acc,none"] == question_acc
    assert results["pair_acc_stderr,none"] == 0.0  # lmms-eval's acc_all_stderr over the n pairs
    assert n >= 3


def test_lmms_task_pair_stderr_is_over_pairs(world: Path, monkeypatch: pytest.MonkeyPatch):
    rows = read_jsonl(world / MMVP_PAIRS)
    right = {r["id"] for k, r in enumerate(rows) if k % 2 == 0}  # every other pair answered right
    rule = lambda doc: doc["answer"] if doc["id"].rsplit("-", 1)[0] in right else "unknown"  # noqa: E731
    results = _evaluate(_answering(rule), world, monkeypatch)["results"]["shapes_mmvp"]
    hits = [1.0 if r["id"] in right else 0.0 for r in rows]
    assert results["pair_acc,none"] == pytest.approx(np.mean(hits))
    assert results["pair_acc_stderr,none"] == pytest.approx(np.std(hits, ddof=1) / math.sqrt(len(hits)))


@pytest.mark.slow
def test_lmms_eval_cli_scores_a_tiny_llava_on_shapes_mmvp(world: Path, tmp_path: Path):
    """The installed lmms-eval CLI with the mllm_swap model: pair_acc is recomputed from its logged answers."""
    from test_lmms import run_cli

    from mllm_swap.fixtures import ensure_tiny_mllm

    model = ensure_tiny_mllm("tiny-llava")
    run_cli(tmp_path, world, ["--model", "mllm_swap", "--model_args", f"pretrained={model},device=cpu,batch_size=4",
                              "--tasks", "shapes_mmvp"])  # fmt: skip
    (path,) = glob.glob(str(tmp_path / "*" / "*_results.json"))
    results = json.loads(Path(path).read_text())["results"]["shapes_mmvp"]
    (samples,) = glob.glob(str(tmp_path / "*" / "*_samples_shapes_mmvp.jsonl"))
    samples = sorted(read_jsonl(samples), key=lambda s: s["doc_id"])
    assert len(samples) == 8  # --limit 8: the first 4 pairs
    norm = lambda s: s.strip().split("\n")[0].lower().strip(".!?,;: ")  # noqa: E731
    right = [norm(s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"])
             == norm(s["target"]) for s in samples]  # fmt: skip
    pairs = [right[2 * p] and right[2 * p + 1] for p in range(4)]
    assert results["pair_acc,none"] == pytest.approx(sum(pairs) / 4)
    assert results["question_acc,none"] == pytest.approx(sum(right) / 8)


def test_eval_refuses_shapes_mmvp_without_pairs(tmp_path: Path, capsys: pytest.CaptureFixture):
    from mllm_swap.fixtures import ensure_tiny_mllm

    bare = tmp_path / "bare"
    generate_shapes(bare, 10, seed=0, progress=False)
    for which in (["--tasks", "shapes_mmvp"], ["--suite", "shapes_all"]):
        code = main(["eval", "--model", str(ensure_tiny_mllm("tiny-llava")), *which, "--shapes", str(bare),
                     "--out", str(tmp_path / "out")])  # fmt: skip
        assert code == 2
        err = capsys.readouterr().err  # refused before any model loads, with the command that writes the pairs
        assert "mmvp_pairs.jsonl: not found; expected a shapes-world folder (write it with `mllm-swap data mmvp" in err
