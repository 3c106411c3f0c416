"""Tests for hellora_trl.recipes.eval: answer grading, pass@k, the HumanEval sandbox, refusals, generation, result files."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import math
import socket
import time
from pathlib import Path

import pytest
import torch

from hellora_trl.recipes.eval import (
    RefusalJudge,
    evaluate_gsm8k,
    evaluate_humaneval,
    evaluate_safety,
    extract_gsm8k_answer,
    generate_batched,
    gsm8k_is_correct,
    is_refusal,
    load_humaneval,
    load_instruction_set,
    pass_at_k,
    refusal_rate,
    run_humaneval_sample,
    write_results,
)

from testing_utils import SHARED_DATASETS, shared_dataset

DOUBLE = {
    "task_id": "unit/double",
    "prompt": 'def double(x):\n    """Return twice x."""\n',
    "test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-3) == -6\n",
    "entry_point": "double",
}


# ---------------------------------------------------------------- GSM8K answers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 5 + 7 = 12 dollars.\n#### 12", "12"),
        ("#### -5", "-5"),
        ("The loss is -5 dollars", "-5"),
        ("#### 1,234", "1234"),
        ("In total $1,234,567.", "1234567"),
        ("#### $3.50", "3.5"),
        ("It is 4.0", "4"),
        ("0.50 of it", "0.5"),
        ("It costs $-7.", "-7"),
        ("pages 3-4", "4"),
        ("first 10, then 20, so the answer is 30.", "30"),
        ("#### 18\nAlso 99 later", "18"),
        ("#### 1 and then\n#### 2", "2"),
        ("I computed 42 but then #### no idea", None),
        ("No number here at all.", None),
        ("", None),
        ("list 3,4", "4"),
        ("007 agents", "7"),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_gsm8k_is_correct():
    assert gsm8k_is_correct("72", "72")
    assert gsm8k_is_correct("72.0000001", "72")
    assert gsm8k_is_correct("3.5", "3.50")
    assert gsm8k_is_correct("1234", "Natalia sold 1,234 clips.\n#### 1,234")
    assert gsm8k_is_correct("-5", "-5")
    assert not gsm8k_is_correct("5", "-5")
    assert not gsm8k_is_correct("72.01", "72")
    assert not gsm8k_is_correct(None, "72")
    assert not gsm8k_is_correct("no answer", "72")


# ---------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (10, 3, 1, 0.3),
        (5, 1, 5, 1.0),
        (10, 0, 1, 0.0),
        (10, 0, 10, 0.0),
        (4, 2, 2, 1 - 1 / 6),
        (10, 10, 1, 1.0),
        (6, 3, 2, 1 - math.comb(3, 2) / math.comb(6, 2)),
        (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),
    ],
)
def test_pass_at_k_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(3, 1, 4), (3, 4, 1), (-1, 0, 1), (5, -1, 1), (5, 1, 0), (5, 1, -2), (0, 0, 1)])
def test_pass_at_k_rejects_invalid(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_integers():
    with pytest.raises(TypeError):
        pass_at_k(5.0, 1, 1)


# ---------------------------------------------------------------- HumanEval sandbox


def test_sandbox_correct_and_wrong_completion():
    ok = run_humaneval_sample(DOUBLE, "    return 2 * x\n")
    assert ok["verdict"] == "passed" and ok["passed"] and ok["error"] is None and ok["task_id"] == "unit/double"
    bad = run_humaneval_sample(DOUBLE, "    return x + 2\n")
    assert bad["verdict"] == "failed" and not bad["passed"]
    assert "AssertionError" in bad["error"]
    broken = run_humaneval_sample(DOUBLE, "    return (\n")
    assert broken["verdict"] == "failed" and "SyntaxError" in broken["error"]


def test_sandbox_infinite_loop_times_out():
    start = time.monotonic()
    result = run_humaneval_sample(DOUBLE, "    while True:\n        pass\n", timeout=1.0)
    assert result["verdict"] == "timed out" and not result["passed"]
    assert time.monotonic() - start < 1.0 + 4.0


@pytest.mark.parametrize("completion", ["    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n", "    exit()\n"])
def test_sandbox_early_exit_is_not_a_pass(completion):
    assert run_humaneval_sample(DOUBLE, completion)["verdict"] == "failed"


@pytest.mark.parametrize(
    "attack",
    [
        "import os\n    os.remove({file!r})",
        "import os\n    os.unlink({file!r})",
        "import pathlib\n    pathlib.Path({file!r}).unlink()",
        "import shutil\n    shutil.rmtree({folder!r})",
        "import os\n    os.rename({file!r}, {file!r} + '.moved')",
        "import os\n    os.system('rm -rf ' + {folder!r})",
        "import subprocess\n    subprocess.run(['rm', '-rf', {folder!r}])",
        "import posix\n    posix.unlink({file!r})",
    ],
)
def test_sandbox_cannot_delete_callers_files(tmp_path, attack):
    folder = tmp_path / "precious"
    folder.mkdir()
    victim = folder / "keep.txt"
    victim.write_text("important")
    code = attack.format(file=str(victim), folder=str(folder))
    # The completion would pass the tests if the attack went through unnoticed.
    result = run_humaneval_sample(DOUBLE, f"    {code}\n    return 2 * x\n")
    assert result["verdict"] != "passed"
    assert "disabled" in result["error"]
    assert victim.read_text() == "important"


def test_sandbox_blocks_network():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        completion = (
            "    import socket\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    return 2 * x\n"
        )
        raw = (
            "    import _socket\n"
            "    s = _socket.socket()\n"
            f"    s.connect(('127.0.0.1', {port}))\n"
            "    return 2 * x\n"
        )
        for attempt in (completion, raw):
            result = run_humaneval_sample(DOUBLE, attempt)
            assert result["verdict"] == "failed" and "disabled" in result["error"]
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody ever connected
    finally:
        server.close()


def test_sandbox_runs_in_a_temporary_directory_that_is_removed(tmp_path):
    out = tmp_path / "cwd.txt"
    # Writing outside the work dir is blocked (it was allowed before issue 13), so the cwd comes back in the error.
    completion = f"    import os\n    open({str(out)!r}, 'w').write(os.getcwd())\n    return 2 * x\n"
    blocked = run_humaneval_sample(DOUBLE, completion)
    assert blocked["verdict"] == "failed" and "disabled" in blocked["error"] and not out.exists()
    result = run_humaneval_sample(DOUBLE, "    import os\n    raise RuntimeError('cwd=' + os.getcwd())\n")
    workdir = Path(result["error"].split("cwd=", 1)[1])
    assert workdir.name == "work" and workdir.parent.name.startswith("hellora_humaneval_")
    assert not workdir.parent.exists()


def test_sandbox_memory_limit():
    result = run_humaneval_sample(DOUBLE, "    big = bytearray(2 * 1024 ** 3)\n    return 2 * x\n", memory_mb=512)
    assert result["verdict"] == "failed" and "MemoryError" in result["error"]


def test_evaluate_humaneval_counts_and_skips_large_k():
    square = {
        "task_id": "unit/square",
        "prompt": "def square(x):\n",
        "test": "def check(f):\n    assert f(3) == 9\n",
        "entry_point": "square",
    }
    samples = {
        "unit/double": ["    return 2 * x\n", "    return x\n", "    return x + x\n"],
        "unit/square": ["    return x * x\n", "    return x\n", "    return 0\n"],
    }
    result = evaluate_humaneval([DOUBLE, square], samples, ks=(1, 2, 5), workers=2)
    assert result["per_task"] == {"unit/double": {"n": 3, "correct": 2}, "unit/square": {"n": 3, "correct": 1}}
    assert result["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert result["pass@2"] == pytest.approx((1.0 + (1 - 1 / 3)) / 2)
    assert "pass@5" not in result
    assert result["n_tasks"] == 2 and result["n_samples"] == 6 and len(result["results"]) == 6
    # upstream's jsonl row layout is accepted too
    rows = [{"task_id": "unit/double", "completion": "    return 2 * x\n"}]
    assert evaluate_humaneval({"unit/double": DOUBLE}, rows, ks=(1,))["pass@1"] == 1.0
    with pytest.raises(KeyError):
        evaluate_humaneval([DOUBLE], {"unit/missing": ["    return 1\n"]})


def test_load_humaneval_plain_and_gzip(tmp_path):
    rows = [DOUBLE, {**DOUBLE, "task_id": "unit/other"}]
    text = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    (tmp_path / "p.jsonl").write_text(text)
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write(text)
    assert load_humaneval(tmp_path / "p.jsonl") == rows
    assert load_humaneval(str(tmp_path / "p.jsonl.gz")) == rows


@pytest.mark.data
def test_real_humaneval_example_problem():
    problems = load_humaneval(shared_dataset("humaneval", "example_problem.jsonl"))
    assert problems[0]["task_id"] == "test/0"
    problem = problems[0]
    assert run_humaneval_sample(problem, problem["canonical_solution"])["verdict"] == "passed"
    samples_path = SHARED_DATASETS / "humaneval" / "example_samples.jsonl"
    if samples_path.exists():
        # Upstream's toy samples: an `rm -rf`, a sleep, an input() and three correct returns.
        result = evaluate_humaneval(problems, load_humaneval(samples_path), ks=(1,), timeout=2.0)
        assert result["per_task"]["test/0"] == {"n": 6, "correct": 3}
        verdicts = sorted(r["verdict"] for r in result["results"])
        assert verdicts == ["failed", "failed", "passed", "passed", "passed", "timed out"]


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I\u2019m sorry, but I can\u2019t help with that.",
        "  Sorry, that's not something I can do.",
        "I cannot provide instructions for making weapons.",
        "As an AI language model, I am not able to assist with illegal activities.",
        "I won't write that.",
        "**I must decline** this request.",
        "Hacking into a government database is illegal and unethical. Instead, consider a career in security.",
        "That request is not appropriate for me to answer.",
        "I am unable to comply.",
    ],
)
def test_is_refusal_detects_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure! Here is a healthy diet plan: eat vegetables, drink water, sleep well.",
        "The arithmetic mean is the sum of the values divided by their count.",
        "",
        # A benign answer that says "sorry" only later on is deliberately NOT a refusal:
        "Here is an acrostic poem about cats.\n" + "Curious paws wander the hall at night. " * 6
        + "\nI'm sorry if it is a bit short, I cannot fit more lines.",
        "Sorrel is a leafy green herb with a lemony taste.",
    ],
)
def test_is_refusal_ignores_compliant_answers(text):
    assert not is_refusal(text)


def test_refusal_rate_and_custom_judge():
    responses = ["I'm sorry, I can't.", "Sure, here you go.", "As an AI, I won't.", "Okay."]
    assert refusal_rate(responses) == 0.5
    shouting: RefusalJudge = lambda r: r.isupper()  # noqa: E731
    assert isinstance(shouting, RefusalJudge)
    assert refusal_rate(["NO", "yes", "NOPE", "NEVER"], judge=shouting) == 0.75
    with pytest.raises(ValueError):
        refusal_rate([])


def test_load_instruction_set_json_and_csv(tmp_path):
    (tmp_path / "set.json").write_text(json.dumps({"instructions": ["Do A.", "Do B."], "inputs": []}))
    assert load_instruction_set(tmp_path / "set.json") == ["Do A.", "Do B."]
    (tmp_path / "pairs.json").write_text(json.dumps({"instructions": ["Translate.", "Do B."], "inputs": ["bonjour", ""]}))
    assert load_instruction_set(tmp_path / "pairs.json") == ["Translate.\n\nbonjour", "Do B."]
    (tmp_path / "bad.json").write_text(json.dumps({"instructions": ["a", "b"], "inputs": ["x"]}))
    with pytest.raises(ValueError):
        load_instruction_set(tmp_path / "bad.json")
    with open(tmp_path / "adv.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["goal", "target"])
        writer.writerow(["Write something, harmful", "Sure, here is"])
        writer.writerow(["Second goal", "Sure"])
    assert load_instruction_set(tmp_path / "adv.csv") == ["Write something, harmful", "Second goal"]
    with pytest.raises(ValueError, match="goal"):
        load_instruction_set(tmp_path / "adv.csv", column="missing")


@pytest.mark.data
def test_load_real_instruction_sets():
    malicious = load_instruction_set(shared_dataset("safety_eval", "I-MaliciousInstructions.json"))
    assert len(malicious) == 100 and all(isinstance(x, str) and x for x in malicious)
    advbench = load_instruction_set(shared_dataset("advbench", "harmful_behaviors.csv"))
    assert len(advbench) == 520


# ---------------------------------------------------------------- generation on a tiny model


WORDS = ["<pad>", "<eos>", "<unk>"] + "question answer : # the is of a what how many sorry i cannot . , ?".split() + [
    str(d) for d in range(10)
]


@pytest.fixture(scope="module")
def tiny():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = OlmoeConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1,
        bos_token_id=None,
    )
    return OlmoeForCausalLM(config), tokenizer


def test_generate_batched_matches_unbatched_and_restores_state(tiny):
    model, tokenizer = tiny
    model.train()
    prompts = ["what is 2", "how many of the 3 4 5 6 is a", "the", "what is 7 ?"]
    outs = generate_batched(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, progress=False)
    assert len(outs) == len(prompts) and all(isinstance(o, str) for o in outs)
    singles = [generate_batched(model, tokenizer, [p], max_new_tokens=5, progress=False)[0] for p in prompts]
    assert outs == singles  # left padding does not change greedy outputs
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None and model.training
    assert generate_batched(model, tokenizer, [], progress=False) == []


def test_generate_batched_chat_template(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="chat_template"):
        generate_batched(model, tokenizer, ["the"], chat=True, max_new_tokens=2, progress=False)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}answer :"
    try:
        outs = generate_batched(model, tokenizer, ["what is 2", "the"], chat=True, max_new_tokens=3, progress=False)
        assert len(outs) == 2
    finally:
        tokenizer.chat_template = None


def test_evaluate_gsm8k_on_tiny_model(tiny):
    model, tokenizer = tiny
    rows = [{"question": f"what is {i} ?", "answer": f"it is {i}\n#### {i}"} for i in range(5)]
    result = evaluate_gsm8k(model, tokenizer, rows, batch_size=2, max_new_tokens=4, progress=False)
    assert result["total"] == 5 and len(result["records"]) == 5
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["correct"] == sum(r["correct"] for r in result["records"])
    assert [r["gold"] for r in result["records"]] == ["0", "1", "2", "3", "4"]
    limited = evaluate_gsm8k(model, tokenizer, rows, limit=2, max_new_tokens=2, progress=False,
                             prompt_fn=lambda q: f"question : {q} answer :")
    assert limited["total"] == 2


def test_evaluate_safety_on_tiny_model(tiny):
    model, tokenizer = tiny
    result = evaluate_safety(model, tokenizer, ["how many", "what is"], ["the 3"], max_new_tokens=3, progress=False,
                             judge=lambda r: True)
    assert result["refusal_rate"] == 1.0 and result["over_refusal_rate"] == 1.0
    assert result["n_harmful"] == 2 and result["n_benign"] == 1 and len(result["harmful_records"]) == 2
    none = evaluate_safety(model, tokenizer, ["how many"], [], max_new_tokens=2, progress=False)
    assert 0.0 <= none["refusal_rate"] <= 1.0 and none["over_refusal_rate"] is None


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_needs_vllm(tiny):
    model, tokenizer = tiny
    with pytest.raises(ImportError, match="pip install vllm"):
        generate_batched(model, tokenizer, ["the"], backend="vllm")
    with pytest.raises(ImportError, match="pip install vllm"):
        evaluate_gsm8k(model, tokenizer, [{"question": "q", "answer": "#### 1"}], backend="vllm")
    with pytest.raises(ValueError):
        generate_batched(model, tokenizer, ["the"], backend="onnx")


# ---------------------------------------------------------------- result files


def test_write_results(tmp_path):
    results = {
        "model": "tiny-olmoe",
        "gsm8k": {"accuracy": 0.25, "correct": 1, "total": 4, "records": [{"q": 1}]},
        "safety": {"refusal_rate": 0.9, "over_refusal_rate": None},
        "path": tmp_path,
    }
    json_path, md_path = write_results(results, tmp_path / "out")
    assert json_path == tmp_path / "out" / "results.json" and md_path == tmp_path / "out" / "results.md"
    loaded = json.loads(json_path.read_text())
    assert loaded["gsm8k"]["records"] == [{"q": 1}] and loaded["path"] == str(tmp_path)
    md = md_path.read_text()
    assert md.startswith("| metric | value |")
    assert "| gsm8k.accuracy | 0.2500 |" in md and "| gsm8k.total | 4 |" in md
    assert "| safety.over_refusal_rate | - |" in md and "records" not in md
    assert not [p for p in json_path.parent.iterdir() if p.name.endswith(".tmp")]
    write_results({"x": 1}, tmp_path / "out")  # overwrite in place
    assert json.loads(json_path.read_text()) == {"x": 1}


def test_generate_batched_with_router_aux_loss_model():
    """Regression: a MoE model trained with output_router_logits=True failed in cached decoding."""
    from hellora_trl.recipes.eval import generate_batched
    from hellora_trl.recipes.offline import build_tokenizer, tiny_moe_model

    model = tiny_moe_model("olmoe", output_router_logits=True)
    tokenizer = build_tokenizer()
    out = generate_batched(model, tokenizer, ["Question: 1+1?\nAnswer:", "Hi"], max_new_tokens=4, progress=False)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert model.config.output_router_logits is True


# ---------------------------------------------------------------- one evaluation path (issue 18)


def _train_and_eval_args(tmp_path, task: str, **extra):
    """Matching arguments for the two entry points: `hellora train`'s after-training evaluation and `hellora eval`."""
    from types import SimpleNamespace

    from hellora_trl.cli.commands.eval import EvalArguments
    from hellora_trl.recipes.sft import HELLoRAScriptArguments

    train_task = {"gsm8k": "gsm8k", "humaneval": "codealpaca", "safety": "saferpaca"}[task]
    limit, budget = extra.pop("limit", 4), extra.pop("max_new_tokens", 6)
    dataset, benign = extra.pop("dataset", None), extra.pop("benign", None)
    script_args = HELLoRAScriptArguments(
        task=train_task, eval_limit=limit, eval_max_new_tokens=budget, **extra,
        **({"eval_dataset_path": str(dataset), "benign_eval_path": benign and str(benign)} if task != "gsm8k" else {}))
    training_args = SimpleNamespace(disable_tqdm=True, output_dir=str(tmp_path / "train"))
    eval_args = EvalArguments(task=task, dataset_name=dataset and str(dataset), benign_path=benign and str(benign),
                              limit=limit, max_new_tokens=budget, output_dir=str(tmp_path / "eval"), disable_tqdm=True)
    return script_args, training_args, eval_args


def _without_timings(result: dict) -> dict:
    result = dict(result)
    result["results"] = [{k: v for k, v in r.items() if k != "elapsed"} for r in result.get("results", [])]
    return result


def test_train_and_eval_commands_score_humaneval_alike_with_stop_lines(tmp_path, monkeypatch):
    """Issue 18: `hellora train` scored uncut HumanEval completions, `hellora eval` cut them at stop lines, so one
    adapter got two pass@1 numbers. Both now go through evaluate_task: the code after a stop line is not run."""
    from hellora_trl.cli.commands import eval as eval_command
    from hellora_trl.recipes import sft
    from hellora_trl.recipes.eval import tasks

    path = tmp_path / "he.jsonl"
    path.write_text(json.dumps(DOUBLE) + "\n")
    completion = "    return 2 * x\n\nprint(undefined_name)\n"  # passes only when cut at "\nprint("
    prompts = []

    def stub(model, tokenizer, batch, **kwargs):
        prompts.append((list(batch), kwargs))
        return [completion for _ in batch]

    monkeypatch.setattr(tasks, "generate_batched", stub)
    script_args, training_args, eval_args = _train_and_eval_args(tmp_path, "humaneval", dataset=path)
    from_train = sft.evaluate(None, None, script_args, None, training_args)
    from_eval = eval_command.evaluate(eval_args, None, None)
    assert from_train["humaneval"]["pass@1"] == from_eval["pass@1"] == 1.0
    assert _without_timings(from_train["humaneval"]) == _without_timings(from_eval)
    assert prompts[0] == prompts[1]  # same prompts, same generation settings
    assert (tmp_path / "train" / "eval" / "humaneval_samples.jsonl").is_file()
    assert (tmp_path / "eval" / "humaneval_samples.jsonl").is_file()


def test_train_and_eval_commands_score_safety_alike(tmp_path, monkeypatch):
    from hellora_trl.cli.commands import eval as eval_command
    from hellora_trl.recipes import sft
    from hellora_trl.recipes.eval import safety

    (tmp_path / "harm.json").write_text(json.dumps({"instructions": ["a", "b", "c"], "inputs": []}))
    (tmp_path / "ok.json").write_text(json.dumps(["d", "e"]))
    monkeypatch.setattr(safety, "generate_batched",
                        lambda model, tok, batch, **kw: ["I cannot." if p in "ab" else "Sure." for p in batch])
    script_args, training_args, eval_args = _train_and_eval_args(
        tmp_path, "safety", dataset=tmp_path / "harm.json", benign=tmp_path / "ok.json", limit=2)
    from_train = sft.evaluate(None, None, script_args, None, training_args)
    from_eval = eval_command.evaluate(eval_args, None, None)
    assert from_train == {"safety": from_eval}
    assert (from_eval["refusal_rate"], from_eval["n_harmful"], from_eval["n_benign"]) == (1.0, 2, 2)


def test_train_and_eval_commands_score_the_same_held_out_arithmetic_on_a_tiny_model(tmp_path):
    """One tiny model, both entry points, no dataset: the same rows, completions and accuracy, filed as arithmetic."""
    from hellora_trl.cli.commands import eval as eval_command
    from hellora_trl.recipes.offline import build_tokenizer, tiny_moe_model
    from hellora_trl.recipes import sft

    model, tokenizer = tiny_moe_model("olmoe"), build_tokenizer()
    script_args, training_args, eval_args = _train_and_eval_args(tmp_path, "gsm8k", limit=3, max_new_tokens=4)
    eval_args.seed = 7
    _, held_out = sft.load_task_data(script_args, seed=7)
    from_train = sft.evaluate(model, tokenizer, script_args, held_out, training_args)
    from_eval = eval_command.evaluate(eval_args, model, tokenizer)
    assert list(from_train) == ["arithmetic"] and from_train["arithmetic"] == from_eval
    assert [r["question"] for r in from_eval["records"]] == [r["question"] for r in held_out]


def test_held_out_arithmetic_is_what_training_holds_out():
    from hellora_trl.recipes import lab
    from hellora_trl.recipes.eval import ARITHMETIC_TRAIN_ROWS, held_out_arithmetic
    from hellora_trl.recipes.lab.targets import arithmetic_task

    train, held_out = lab.default_task(ARITHMETIC_TRAIN_ROWS, 10, seed=3)  # what the train recipe holds out
    assert held_out_arithmetic(10, seed=3) == held_out
    assert held_out_arithmetic(4, seed=3) == held_out[:4]  # a prefix: fewer rows are the first of them
    assert not {r["prompt"] for r in held_out} & set(train["prompt"])
    assert not {r["completion"] for r in held_out} & set(train["completion"])  # split by (op, a, b): no answer text shared
    assert held_out_arithmetic(10, seed=3, train_rows=50) == arithmetic_task(50, 10, seed=3)[1]
    assert held_out_arithmetic(10, seed=4) != held_out
    with pytest.raises(ValueError, match="n >= 1"):
        held_out_arithmetic(0, seed=3)


def test_metric_names_say_what_was_measured():
    from hellora_trl.recipes.eval import metric_name

    assert metric_name("gsm8k", None) == "arithmetic"
    assert metric_name("gsm8k", "../shared/datasets/gsm8k") == "gsm8k"
    assert metric_name("humaneval", "he.jsonl") == "humaneval" and metric_name("safety", None) == "safety"
    with pytest.raises(ValueError, match="unknown evaluation task"):
        metric_name("mmlu", None)


def test_evaluate_task_rejects_bad_input():
    from hellora_trl.recipes.eval import EvalSettings, evaluate_task

    with pytest.raises(ValueError, match="unknown evaluation task"):
        evaluate_task("mmlu", None, None, [], EvalSettings())
    with pytest.raises(ValueError, match="no HumanEval problems"):
        evaluate_task("humaneval", None, None, [], EvalSettings())
    with pytest.raises(TypeError, match="safety rows"):
        evaluate_task("safety", None, None, "harmful prompt", EvalSettings())
