"""`--task sft` checks its TRL rows up front (issue 19 item 6): one line naming the row and the problem instead of a
KeyError, jinja2 TemplateError, AttributeError or a misleading "empty after TRL's preparation" message."""

from __future__ import annotations

import json

import pytest

from hellora_trl.recipes import data
from hellora_trl.recipes.sft import HELLoRAScriptArguments, load_task_data

USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}


def write(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"prompt": "Q:"}], "has columns \\['prompt'\\]"),  # NT1: prompt-only is not an SFT format
        ([{"messages": ["hi", "hello"]}], "row 0: messages\\[0\\] is a str"),  # NT2
        ([{"messages": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "yo"}]}],
         "row 0: messages\\[0\\] has role 'human'; chat templates take"),  # NT3
        ([{"messages": [USER, BOT]}, {"messages": [{"content": "hi"}]}], "row 1: messages\\[0\\] has no 'role'"),  # NT4
        ([{"text": 7}, {"text": 8}], "row 0: 'text' is a int"),  # NT5
        ([{"prompt": "Q:", "completion": None}], "row 0: 'completion' is missing"),  # NT7
        ([{"messages": []}], "row 0: 'messages' is an empty list"),  # NT11
        ([{"prompt": [USER], "completion": "yo"}], "row 0: 'prompt' is a list and 'completion' a str"),  # NT14
        ([{"messages": [USER, {"role": "assistant", "content": None}]}], "messages\\[1\\] has no text 'content'"),
    ],
)
def test_malformed_rows_get_one_line_naming_the_row(tmp_path, rows, message):
    path = write(tmp_path, rows)
    with pytest.raises(ValueError, match=message) as err:
        load_task_data(HELLoRAScriptArguments(task="sft", dataset_name=str(path)))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "rows",
    [
        [{"text": ""}, {"text": "x"}],  # NT6: empty strings are valid
        [{"text": "plain"}, {"messages": [USER, BOT]}],  # NT8: mixed columns, each row by its own
        [{"messages": [{"role": "system", "content": "be brief"}]}],  # NT12
        [{"messages": [BOT, USER]}],  # NT13
        [{"prompt": [USER], "completion": [BOT]}],  # conversational prompt-completion
        [{"prompt": "Q:", "completion": " A"}],
    ],
)
def test_well_formed_rows_pass(tmp_path, rows):
    path = write(tmp_path, rows)
    train, _ = load_task_data(HELLoRAScriptArguments(task="sft", dataset_name=str(path)))
    assert len(train) == len(rows)


def test_trl_formats_are_only_the_ones_sft_trains_on():
    assert ("prompt",) not in data.TRL_FORMATS
    assert set(data.TRL_FORMATS) == {("text",), ("messages",), ("prompt", "completion")}


def test_cli_reports_a_bad_role_in_one_line(tmp_path, capsys):
    from hellora_trl import cli

    path = write(tmp_path, [{"messages": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "yo"}]}])
    code = cli.main(["train", "--task", "sft", "--dataset_name", str(path), "--output_dir", str(tmp_path / "out"),
                     "--report_to", "none", "--max_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "has role 'human'" in err[-1] and err[-1].startswith("hellora train: error:")
