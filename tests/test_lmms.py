"""The lmms-eval model ``mllm_swap``: registration, the installed CLI on the shapes tasks, and its
loglikelihood / generation checked against independent computations."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lmms_eval.api.instance import GenerationResult, Instance
from PIL import Image

from align.io import read_jsonl
from mllm_swap.families.prompts import expand2square, pad_colour
from mllm_swap.fixtures import ensure_tiny_mllm
from mllm_swap.lmms.model import MllmSwap
from mllm_swap.tune.conversations import generation_prompt

REPO = Path(__file__).resolve().parent.parent
TASK = "t"


@pytest.fixture(scope="module")
def tiny_llava() -> Path:
    return ensure_tiny_mllm("tiny-llava")


@pytest.fixture(scope="module")
def docs(shapes_dir: Path) -> list[dict]:
    rows = read_jsonl(shapes_dir / "vqa_test.jsonl")[:6]
    return [{**r, "image": str(shapes_dir / r["image"])} for r in rows]


def visual(doc: dict) -> list[Image.Image]:
    return [Image.open(doc["image"]).convert("RGB")]


def instance(kind: str, args: tuple, doc_id: int) -> Instance:
    return Instance(
        request_type=kind, arguments=args, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1}
    )


def make_lm(path: Path, docs: list[dict], **kwargs) -> MllmSwap:
    lm = MllmSwap(pretrained=str(path), device="cpu", dtype="float32", **kwargs)
    lm.task_dict = {TASK: {"test": docs}}
    return lm


def loglikelihoods(lm: MllmSwap, pairs: list[tuple[int, str, str]]) -> list[tuple[float, bool]]:
    reqs = [instance("loglikelihood", (ctx, cont, visual, i, TASK, "test"), i) for i, ctx, cont in pairs]
    out = lm.loglikelihood(reqs)
    assert all(isinstance(r, GenerationResult) for r in out)  # 0.7.3 stringifies bare tuples
    return [r.text for r in out]


# ------------------------------------------------------------------------------------ registration
def test_entry_point_resolves_to_the_model_class():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model, get_model_manifest

    (ep,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "mllm_swap"]
    manifest = ep.load()()
    assert manifest.model_id == "mllm_swap"
    assert get_model_manifest("mllm_swap").simple_class_path == "mllm_swap.lmms.model.MllmSwap"
    assert get_model("mllm_swap") is MllmSwap


# --------------------------------------------------------------------------- the installed lmms-eval
def run_cli(
    out: Path, shapes_dir: Path, args: list[str], launcher: list[str] | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """One offline run of the installed ``lmms-eval`` CLI (or ``launcher`` + args) with the shapes tasks."""
    script = Path(sys.executable).with_name("lmms-eval")
    command = launcher or ([str(script)] if script.exists() else [sys.executable, "-m", "lmms_eval"])
    command += [*args, "--include_path", "eval_configs/tasks", "--limit", "8", "--output_path", str(out),
                "--log_samples"]  # fmt: skip
    env = dict(env or os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(out / "hf"))
    env["MLLM_SWAP_SHAPES_DIR"] = str(shapes_dir)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    # lmms-eval 0.7.3 logs a failed evaluation and exits 0
    assert proc.returncode == 0 and "Error during evaluation" not in log, log[-6000:]
    return proc


@pytest.fixture(scope="module")
def cli_run(tiny_llava: Path, shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One offline run of the installed ``lmms-eval`` console script on both shapes tasks."""
    out = tmp_path_factory.mktemp("lmms-cli")
    run_cli(out, shapes_dir, ["--model", "mllm_swap", "--model_args", f"pretrained={tiny_llava},device=cpu,batch_size=4",
                              "--tasks", "shapes_vqa,shapes_mc"])  # fmt: skip
    return out


def _cli_results(out: Path) -> dict:
    (path,) = glob.glob(str(out / "*" / "*_results.json"))
    return json.loads(Path(path).read_text())["results"]


def _cli_samples(out: Path, task: str) -> list[dict]:
    (path,) = glob.glob(str(out / "*" / f"*_samples_{task}.jsonl"))
    return read_jsonl(path)


@pytest.mark.slow
def test_cli_shapes_vqa_exact_match(cli_run: Path):
    results = _cli_results(cli_run)["shapes_vqa"]
    assert {"exact_match,none", "exact_match_stderr,none"} <= set(results)
    samples = _cli_samples(cli_run, "shapes_vqa")
    assert len(samples) == 8
    # The metric recomputed from the logged answers: normalized string equality.
    norm = lambda s: s.strip().lower().strip(".!?,;: ")  # noqa: E731
    expected = sum(norm(s["filtered_resps"]) == norm(s["target"]) for s in samples) / 8
    assert results["exact_match,none"] == pytest.approx(expected)


@pytest.mark.slow
def test_cli_shapes_mc_accuracy(cli_run: Path, shapes_dir: Path):
    rows = read_jsonl(shapes_dir / "vqa_test.jsonl")
    results = _cli_results(cli_run)["shapes_mc"]
    assert {"acc,none", "acc_norm,none"} <= set(results)
    samples = _cli_samples(cli_run, "shapes_mc")
    assert len(samples) == 8
    correct = 0
    for s in samples:  # each option got a (loss, is_greedy) pair; the prediction is the lowest loss
        losses = [float(loss) for loss, _ in s["filtered_resps"]]
        options = rows[s["doc_id"]]["options"]
        assert len(losses) == len(options) and all(loss > 0 for loss in losses)
        correct += options[losses.index(min(losses))] == s["target"]
    assert results["acc,none"] == pytest.approx(correct / 8)


# ------------------------------------------------------------------------------------ loglikelihood
def _reference_nll(model, processor, family: str, doc: dict, question: str, reply: str) -> tuple[float, bool]:
    """HF's own label loss on prompt+reply with the prompt masked, times the number of reply tokens."""
    image = expand2square(visual(doc)[0], pad_colour(processor))
    if family == "idefics":
        prompt_in = processor(text=[["User:", image, f"{question}\nAssistant:"]], return_tensors="pt")
        full_in = processor(text=[["User:", image, f"{question}\nAssistant: {reply}"]], return_tensors="pt")
    else:
        prompt = generation_prompt(processor, question)
        prompt_in = processor(text=[prompt], images=[image], return_tensors="pt")
        full_in = processor(text=[f"{prompt} {reply}"], images=[image], return_tensors="pt")
    n_prompt = prompt_in["input_ids"].shape[1]
    labels = full_in["input_ids"].clone()
    labels[:, :n_prompt] = -100
    with torch.no_grad():
        out = model(**full_in, labels=labels)
    n_reply = labels.shape[1] - n_prompt
    greedy = out.logits[0, n_prompt - 1 : -1].argmax(-1)
    return out.loss.item() * n_reply, bool((greedy == full_in["input_ids"][0, n_prompt:]).all())


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-idefics", "tiny-llava-original"])
def test_loglikelihood_matches_hf_label_loss(name: str, docs: list[dict]):
    lm = make_lm(ensure_tiny_mllm(name), docs, batch_size=3)
    pairs = [
        (i, doc["question"], f" {reply}")
        for i, doc in enumerate(docs[:3])
        for reply in (doc["answer"], "blue square")
    ]
    got = loglikelihoods(lm, pairs)
    for (i, question, cont), (nll, greedy) in zip(pairs, got, strict=True):
        ref_nll, ref_greedy = _reference_nll(
            lm.model, lm.prompter.processor, lm.family, docs[i], question, cont.strip()
        )
        assert nll == pytest.approx(ref_nll, rel=1e-4, abs=1e-4)
        assert greedy == ref_greedy


def _bias_toward(lm: MllmSwap, token_id: int, bias: float) -> int:
    """Replace the LM head by a zero-weight linear layer whose bias favours ``token_id``; returns vocab size."""
    head = lm.model.lm_head
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    torch.nn.init.zeros_(new.weight)
    torch.nn.init.zeros_(new.bias)
    new.bias.data[token_id] = bias
    lm.model.lm_head = new
    return head.out_features


def test_loglikelihood_ranks_the_favoured_option_first(tiny_llava: Path, docs: list[dict]):
    lm = make_lm(tiny_llava, docs, batch_size=4)
    tok = lm.prompter.tokenizer
    options = [" blue", " red", " green", " yellow"]
    ids = [tok(o, add_special_tokens=False)["input_ids"] for o in options]
    assert all(len(i) == 1 for i in ids)  # single tokens, so the expected losses are closed-form
    bias = 10.0
    vocab = _bias_toward(lm, ids[1][0], bias)
    got = loglikelihoods(lm, [(0, docs[0]["question"], o) for o in options])
    log_z = math.log(math.exp(bias) + vocab - 1)  # every position predicts softmax(bias)
    expected = [log_z - (bias if o == " red" else 0.0) for o in options]
    assert [nll for nll, _ in got] == pytest.approx(expected, abs=1e-4)
    assert min(range(4), key=lambda k: got[k][0]) == 1
    assert [greedy for _, greedy in got] == [False, True, False, False]


# ------------------------------------------------------------------------------------ generation
def test_generate_until_honours_max_new_tokens_and_until(tiny_llava: Path, docs: list[dict]):
    lm = make_lm(tiny_llava, docs, batch_size=2)
    red = lm.prompter.tokenizer(" red", add_special_tokens=False)["input_ids"][0]
    _bias_toward(lm, red, 10.0)
    full = lm.prompter.tokenizer.decode([red] * 3)
    kwargs = [
        {"max_new_tokens": 3, "until": []},
        {"max_new_tokens": 3, "until": ["d r"]},
        {"max_new_tokens": 1},
    ]
    reqs = [
        instance("generate_until", (docs[i]["question"], kw, visual, i, TASK, "test"), i)
        for i, kw in enumerate(kwargs)
    ]
    out = lm.generate_until(reqs)
    assert out == [full, full.split("d r")[0], lm.prompter.tokenizer.decode([red])]


def test_batched_generation_equals_one_by_one(tiny_llava: Path, docs: list[dict]):
    def run(batch_size: int) -> list[str]:
        lm = make_lm(tiny_llava, docs, batch_size=batch_size)
        reqs = [instance("generate_until", (d["question"] + " x" * i, {"max_new_tokens": 4}, visual, i, TASK, "test"), i)
                for i, d in enumerate(docs)]  # fmt: skip
        return lm.generate_until(reqs)

    assert run(4) == run(1)


def test_multi_round_feeds_previous_answers_back(tiny_llava: Path, docs: list[dict]):
    lm = make_lm(tiny_llava, docs)
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 3:
            return None, None, True, previous_output, None
        return (
            visual(doc),
            f"{doc['question']} (round {round_idx})",
            False,
            previous_output,
            {"round": round_idx},
        )

    req = Instance(
        request_type="generate_until_multi_round",
        arguments=(docs[0]["question"], {"max_new_tokens": 2}, visual, doc_to_text, 0, TASK, "test"),
        idx=0,
        metadata={"task": TASK, "doc_id": 0, "repeats": 1},
    )
    (answers,) = lm.generate_until_multi_round([req])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert [r for r, _, _ in seen] == [1, 2, 3]
    for round_idx, previous, info in seen:  # round r sees the r answers so far and round r-1's info
        assert previous == answers[:round_idx]
        assert info == (None if round_idx == 1 else {"round": round_idx - 1})


def test_a_failed_generation_is_an_error(tiny_llava: Path, docs: list[dict], monkeypatch: pytest.MonkeyPatch):
    lm = make_lm(tiny_llava, docs)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(lm.model, "generate", broken)
    req = instance("generate_until", (docs[0]["question"], {}, visual, 0, TASK, "test"), 0)
    with pytest.raises(RuntimeError, match=r"generation failed for t/0 .*out of memory"):
        lm.generate_until([req])


def test_bad_arguments_fail_early(tiny_llava: Path, docs: list[dict]):
    with pytest.raises(ValueError, match="unknown model_args"):
        MllmSwap(pretrained=str(tiny_llava), max_new_token=4)
    with pytest.raises(ValueError, match="dtype"):
        MllmSwap(pretrained=str(tiny_llava), dtype="float8")
    with pytest.raises(FileNotFoundError):
        MllmSwap(pretrained=str(tiny_llava / "missing"))
    lm = make_lm(tiny_llava, docs)
    req = instance("generate_until", ("q", {}, lambda doc: ["clip.mp4"], 0, TASK, "test"), 0)
    with pytest.raises(ValueError, match="only PIL images"):
        lm.generate_until([req])


def test_model_args_win_over_harness_defaults(tiny_llava: Path):
    lm = MllmSwap.create_from_arg_string(
        f"pretrained={tiny_llava},batch_size=3,device=cpu", {"batch_size": "1"}
    )
    assert lm.batch_size == 3 and lm.device.type == "cpu"


# ------------------------------------------------------------------- lmms-eval's own llava_hf wrapper
# lmms-eval as installed without this project (lmms-eval's entry-point scan would import mllm_swap);
# the attempts and the project modules loaded are printed at exit.
LMMS_EVAL_MAIN = """
import atexit, json
loaded = lambda: sorted(m for m in sys.modules if m.split(".")[0] in ("align", "mllm_swap"))
blocked = _WithoutProject.blocked
atexit.register(lambda: print("PROJECT=" + json.dumps({"blocked": blocked, "loaded": loaded()})))
sys.argv = ["lmms-eval", *sys.argv[1:]]
from lmms_eval.__main__ import cli_evaluate
cli_evaluate()
"""
# lmms-eval's llava_hf module imports decord (video decoding) at import time; images need none of it.
DECORD_STUB = """def cpu(index=0):
    raise RuntimeError("decord stub (tests): no video decoding")


class VideoReader:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("decord stub (tests): no video decoding")
"""


@pytest.mark.slow
def test_lmms_eval_llava_hf_wrapper_answers_like_the_plugin(
    shapes_dir: Path, tmp_path: Path, without_project: str
):
    """lmms-eval's own ``llava_hf`` (string message content, no project import) scores a drop-in swapped
    tiny LLaVA with the same shapes_vqa answers as the ``mllm_swap`` model."""
    from mllm_swap.swap import swap

    model = tmp_path / "dropin"
    swap("tiny-llava", "tiny-clip", model, mode="dropin", num_images=1, verbose=False)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "decord.py").write_text(DECORD_STUB)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(stubs)
    wrapper = run_cli(tmp_path / "llava_hf", shapes_dir,
                      ["--model", "llava_hf", "--force_simple", "--model_args",
                       f"pretrained={model},device=cpu,device_map=cpu,dtype=float32", "--tasks", "shapes_vqa",
                       "--batch_size", "1"],
                      launcher=[sys.executable, "-c", without_project + LMMS_EVAL_MAIN], env=env)  # fmt: skip
    (line,) = [x for x in wrapper.stdout.splitlines() if x.startswith("PROJECT=")]
    project = json.loads(line.removeprefix("PROJECT="))
    assert project["loaded"] == [], project  # 'mllm_swap' not in sys.modules of the wrapper's process
    assert "Found total 0" not in wrapper.stdout + wrapper.stderr
    theirs = {s["doc_id"]: s["filtered_resps"] for s in _cli_samples(tmp_path / "llava_hf", "shapes_vqa")}
    rows = read_jsonl(shapes_dir / "vqa_test.jsonl")[:8]  # what --limit 8 scores, in order
    lm = make_lm(model, [{**r, "image": str(shapes_dir / r["image"])} for r in rows])
    gen_kwargs = {"max_new_tokens": 8, "temperature": 0, "do_sample": False, "until": ["\n"]}  # the task's
    ours = lm.generate_until(
        [
            instance("generate_until", (r["question"], dict(gen_kwargs), visual, i, TASK, "test"), i)
            for i, r in enumerate(rows)
        ]
    )
    assert sorted(theirs) == list(range(8)) and any(ours)  # the model says something: equality is informative
    # llava_hf generates past the task's stop string "\n"; the plugin stops there
    assert [theirs[i].split("\n")[0] for i in range(8)] == ours
