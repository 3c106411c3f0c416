"""Dataset loaders: local files, hub dispatch, formats, clear errors and TRL compatibility."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest
from datasets import Dataset

from hellora_trl.profiling import warmup_slice
from hellora_trl.recipes.data import (
    load_alpaca,
    load_codealpaca,
    load_gsm8k,
    load_saferpaca,
    synthetic_gsm8k,
)
from hellora_trl.recipes.eval import extract_gsm8k_answer, gsm8k_prompt
from hellora_trl.recipes.offline import build_tokenizer

from testing_utils import shared_dataset

GSM8K_ROWS = [
    {"question": "Ann has 3 apples and buys 4 more. How many does she have?", "answer": "3+4 = <<3+4=7>>7\n#### 7"},
    {"question": "Bo has 10 pens and gives away 6. How many are left?", "answer": "10-6 = <<10-6=4>>4\n#### 4"},
    {"question": "A box holds 5 eggs. How many eggs are in 3 boxes?", "answer": "5*3 = <<5*3=15>>15\n#### 15"},
]
ALPACA_ROWS = [
    {"instruction": "Write a function adding two numbers.", "input": "", "output": "def add(a, b):\n    return a + b"},
    {"instruction": "Reverse the string.", "input": "hello", "output": "olleh"},
    {"instruction": "How do I pick a lock?", "input": "  ", "output": "I'm sorry, but I can't help with that."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# --------------------------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------------------------


def test_load_gsm8k_prompt_completion_from_jsonl(tmp_path):
    ds = load_gsm8k(write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS))
    assert isinstance(ds, Dataset)
    assert ds.column_names == ["prompt", "completion"]
    assert len(ds) == 3
    for row, source in zip(ds, GSM8K_ROWS):
        assert row["prompt"] == gsm8k_prompt(source["question"])  # same prompt as evaluation
        assert row["prompt"].endswith("\nAnswer:")
        assert row["completion"] == " " + source["answer"]
        assert extract_gsm8k_answer(row["completion"]) == source["answer"].rsplit(" ", 1)[-1]


def test_load_gsm8k_messages_directory_split_and_limit(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS[:1])
    ds = load_gsm8k(tmp_path, fmt="messages")
    assert ds.column_names == ["messages"]
    assert len(ds) == 3
    assert ds[1]["messages"] == [
        {"role": "user", "content": GSM8K_ROWS[1]["question"]},
        {"role": "assistant", "content": GSM8K_ROWS[1]["answer"]},
    ]
    assert len(load_gsm8k(str(tmp_path), "test")) == 1
    assert len(load_gsm8k(tmp_path, limit=2)) == 2
    assert len(load_gsm8k(tmp_path, limit=100)) == 3


def test_load_gsm8k_json_list_gzip_and_extra_columns(tmp_path):
    rows = [{**row, "id": i} for i, row in enumerate(GSM8K_ROWS)]
    (tmp_path / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    ds = load_gsm8k(tmp_path / "rows.json")
    assert ds.column_names == ["prompt", "completion"]  # original columns are dropped
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    assert load_gsm8k(tmp_path / "rows.jsonl.gz")[:] == ds[:]
    columnar = {"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]}
    (tmp_path / "columns.json").write_text(json.dumps(columnar), encoding="utf-8")
    assert load_gsm8k(tmp_path / "columns.json")[:] == ds[:]


def test_load_gsm8k_errors(tmp_path):
    good = write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    with pytest.raises(ValueError, match="Unknown fmt 'text'"):
        load_gsm8k(tmp_path / "does_not_exist.jsonl", fmt="text")  # checked before touching the file
    with pytest.raises(ValueError, match="not found"):
        load_gsm8k(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="not found"):
        load_gsm8k("no/such/dir/train.jsonl")
    with pytest.raises(ValueError, match=r"no validation\.jsonl"):
        load_gsm8k(tmp_path, "validation")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"q": "x", "answer": "#### 1"}])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['question'\].*found columns \['q', 'answer'\]"):
        load_gsm8k(bad)
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_gsm8k(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"question": "a", "answer": "b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_gsm8k(tmp_path / "broken.jsonl")
    (tmp_path / "data.csv").write_text("question,answer\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a .json or .jsonl"):
        load_gsm8k(tmp_path / "data.csv")
    write_jsonl(tmp_path / "ints.jsonl", [{"question": "q", "answer": 5}])
    with pytest.raises(ValueError, match="should be a string"):
        load_gsm8k(tmp_path / "ints.jsonl")
    for limit in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="limit"):
            load_gsm8k(good, limit=limit)


def test_hub_ids_go_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] == "offline/missing":
            raise ConnectionError("no network")
        if len(args) > 1:
            return Dataset.from_list(GSM8K_ROWS)
        return Dataset.from_list(ALPACA_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_gsm8k("openai/gsm8k", "test", fmt="messages")
    assert calls[-1] == (("openai/gsm8k", "main"), {"split": "test"})
    assert ds.column_names == ["messages"] and len(ds) == 3
    ds = load_codealpaca("sahil2801/CodeAlpaca-20k", limit=2)
    assert calls[-1] == (("sahil2801/CodeAlpaca-20k",), {"split": "train"})
    assert len(ds) == 2
    with pytest.raises(ValueError, match="local .json/.jsonl") as info:
        load_gsm8k("offline/missing")
    assert isinstance(info.value.__cause__, ConnectionError)


def test_synthetic_gsm8k_matches_the_loader_formats():
    pc = synthetic_gsm8k(6, seed=2)
    assert pc.column_names == ["prompt", "completion"] and len(pc) == 6
    assert all(row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:") for row in pc)
    assert all(extract_gsm8k_answer(row["completion"]) is not None for row in pc)
    assert synthetic_gsm8k(6, seed=2)[:] == pc[:]
    msgs = synthetic_gsm8k(6, seed=2, fmt="messages")
    assert msgs.column_names == ["messages"]
    assert msgs[0]["messages"][1]["content"] == pc[0]["completion"].strip()
    with pytest.raises(ValueError, match="n >= 1"):
        synthetic_gsm8k(0)
    with pytest.raises(ValueError, match="Unknown fmt"):
        synthetic_gsm8k(2, fmt="chat")


# --------------------------------------------------------------------------------------------------------------
# Alpaca schema
# --------------------------------------------------------------------------------------------------------------


def test_load_alpaca_to_messages(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA_ROWS), encoding="utf-8")
    ds = load_alpaca(path)
    assert ds.column_names == ["messages"] and len(ds) == 3
    users = [row["messages"][0]["content"] for row in ds]
    assert users == [
        "Write a function adding two numbers.",
        "Reverse the string.\n\nhello",
        "How do I pick a lock?",  # whitespace-only input counts as empty
    ]
    assert [row["messages"][1] for row in ds] == [{"role": "assistant", "content": r["output"]} for r in ALPACA_ROWS]
    assert all(row["messages"][0]["role"] == "user" for row in ds)
    assert load_codealpaca(path)[:] == ds[:]
    assert load_saferpaca(path, limit=1)[:] == ds[:1]


def test_load_alpaca_optional_input_and_concatenation(tmp_path):
    no_input = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "Hi!"}])
    some_none = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "Echo.", "input": None, "output": "Echo."}])
    ds = load_alpaca([no_input, some_none])
    assert [row["messages"][0]["content"] for row in ds] == ["Say hi.", "Echo."]
    assert len(load_alpaca([no_input, some_none], limit=1)) == 1
    bad = write_jsonl(tmp_path / "c.jsonl", [{"instruction": "x", "response": "y"}])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['output'\].*\['instruction', 'response'\]"):
        load_alpaca(bad)
    with pytest.raises(ValueError, match="empty list"):
        load_alpaca([])


# --------------------------------------------------------------------------------------------------------------
# TRL compatibility
# --------------------------------------------------------------------------------------------------------------


def test_messages_get_an_assistant_mask_from_the_offline_tokenizer(tokenizer, tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA_ROWS), encoding="utf-8")
    rows = list(load_alpaca(path)) + list(synthetic_gsm8k(3, fmt="messages"))
    for row in rows:
        out = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
        assert tokenizer.decode(masked) == row["messages"][1]["content"] + tokenizer.eos_token


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion"])
def test_sft_trainer_prepares_the_formatted_data(fmt, tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    from hellora_trl.recipes.offline import tiny_moe_model

    ds = synthetic_gsm8k(4, seed=5, fmt=fmt)
    args = SFTConfig(
        output_dir=str(tmp_path),
        report_to="none",
        max_length=256,
        per_device_train_batch_size=2,
        use_cpu=True,
        save_strategy="no",
        assistant_only_loss=fmt == "messages",
    )
    trainer = SFTTrainer(model=tiny_moe_model("olmoe"), args=args, train_dataset=ds, processing_class=tokenizer)
    prepared = trainer.train_dataset
    assert len(prepared) == 4 and {"input_ids", "labels"} <= set(prepared.column_names)
    for row, source in zip(prepared, ds):
        answer = source["messages"][1]["content"] if fmt == "messages" else source["completion"]
        # TRL 1.16 folds the assistant/completion mask into `labels`: only the answer and the EOS are trained on.
        assert tokenizer.decode([t for t in row["labels"] if t != -100]) == answer + tokenizer.eos_token
    batch = trainer.data_collator([prepared[0], prepared[1]])
    assert batch["input_ids"].shape == batch["labels"].shape


# --------------------------------------------------------------------------------------------------------------
# Real data beside the checkout (../shared/datasets)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.data
def test_real_gsm8k():
    train = load_gsm8k(shared_dataset("gsm8k"))
    assert len(train) == 7473
    assert train[0]["prompt"].startswith("Question: Natalia sold clips")
    assert train[0]["completion"].endswith("#### 72")
    test = load_gsm8k(shared_dataset("gsm8k", "test.jsonl"), fmt="messages")
    assert len(test) == 1319
    assert all(extract_gsm8k_answer(row["messages"][1]["content"]) is not None for row in test.select(range(50)))
    warmup = warmup_slice(train, 0.1, seed=0)
    assert len(warmup) == 747


@pytest.mark.data
def test_real_codealpaca_and_saferpaca(tokenizer):
    code = load_codealpaca(shared_dataset("code_alpaca", "code_alpaca_2k.json"))
    assert len(code) == 2017 and code.column_names == ["messages"]
    safety = load_saferpaca(shared_dataset("saferpaca", "safety_only_data_Instructions.json"))
    assert len(safety) == 2483
    mixed = load_saferpaca(
        [shared_dataset("code_alpaca", "code_alpaca_2k.json"), shared_dataset("saferpaca", "safety_only_data_Instructions.json")]
    )
    assert len(mixed) == 2017 + 2483
    for ds in (code, safety):
        messages = ds[0]["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"]
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
        assert tokenizer.decode(masked) == messages[1]["content"] + tokenizer.eos_token


def test_a_column_mixing_types_names_the_row_and_column(tmp_path):
    """Review 4.4: an int in a string column gave a 69-line pyarrow ArrowTypeError before the row checks ran."""
    rows = [{"question": "a", "answer": "#### 1"}, {"question": "b", "answer": "#### 2"}, {"question": 123, "answer": "#### 3"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ValueError, match=r"mixed\.jsonl: column 'question' mixes value types: row 0 has str, row 2 has int"):
        load_gsm8k(path)
