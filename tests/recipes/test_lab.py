"""The lab model: its corpus, held-out target task, pretraining, cache and command (tiny recipe, seconds)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hellora_trl.recipes.lab import cache as lab_cache
from hellora_trl.recipes.lab import model as lab
from hellora_trl.recipes.lab.corpus import (
    DOMAINS,
    arithmetic_problems,
    arithmetic_splits,
    generated_corpus,
    heldout_domain_texts,
    shared_corpus,
    shared_heldout,
)
from hellora_trl.recipes.lab.targets import arithmetic_task

TINY = lab.LAB_RECIPES["tiny"]


def test_generated_corpus_is_deterministic_and_domains_differ():
    a, b, c = generated_corpus(20, seed=0), generated_corpus(20, seed=0), generated_corpus(20, seed=1)
    assert a == b and a != c
    assert set(a) == set(DOMAINS) and all(len(docs) == 20 for docs in a.values())
    assert all(d.startswith("Question:") and "####" in d for d in a["math"])
    assert all("```python" in d for d in a["code"])
    assert all(d.startswith("User:") and "\nAssistant:" in d for d in a["safety"])
    assert not any("####" in d or "```" in d for d in a["prose"])


def test_target_task_is_held_out_from_pretraining_and_its_own_training_rows():
    train, held_out = arithmetic_splits(300, 100, seed=0)
    assert len(train) == 300 and len(held_out) == 100
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}
    corpus = "\n".join(t for docs in generated_corpus(200, seed=0).values() for t in docs)
    assert not any(r["question"] in corpus for r in train + held_out)  # the target format is never pretrained on
    for row in held_out:
        expr, value = row["answer"].split(" = ")[0], int(row["answer"].rsplit("#### ", 1)[1])
        assert eval(expr) == value  # noqa: S307 - generated "a+b" / "a-b" / "a*b"
    assert arithmetic_problems(5, seed=3) == arithmetic_problems(5, seed=3)


def test_heldout_domain_texts_use_other_seeds_than_pretraining():
    pretrain = generated_corpus(50, seed=0)
    held = heldout_domain_texts(50, seed=0)
    assert set(held) == set(DOMAINS)
    assert held["math"] != pretrain["math"][:50] and held["code"] != pretrain["code"][:50]


def test_recipe_key_depends_on_every_field():
    assert TINY.key() == dataclasses.replace(TINY).key()
    assert len({TINY.key(), dataclasses.replace(TINY, steps=21).key(), dataclasses.replace(TINY, seed=1).key(),
                dataclasses.replace(TINY, data_dir="x").key()}) == 4


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HELLORA_LAB_CACHE", raising=False)
    monkeypatch.delenv("HELLORA_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lab.lab_cache_dir() == tmp_path / "xdg" / "hellora" / "lab"
    monkeypatch.setenv("HELLORA_HOME", str(tmp_path / "home"))
    assert lab.lab_cache_dir() == tmp_path / "home" / "lab"
    monkeypatch.setenv("HELLORA_LAB_CACHE", str(tmp_path / "explicit"))
    assert lab.lab_cache_dir() == tmp_path / "explicit"


@pytest.fixture(scope="module")
def tiny_lab():
    """The tiny lab model in the session cache (conftest sets HELLORA_LAB_CACHE), shared with the example tests."""
    cache = lab.lab_cache_dir()
    return cache, lab.lab_model_path(TINY, cache_dir=cache, progress=False)


def test_pretrain_writes_checkpoint_tokenizer_card_and_curve(tiny_lab):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, path = tiny_lab
    assert path == cache / TINY.key()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "lab_card.json", "README.md", "loss_curve.png"):
        assert (path / name).is_file(), name
    card = lab.read_card(path)
    assert card["steps"] == TINY.steps and len(card["losses"]) == TINY.steps
    assert set(card["corpus"]["tokens"]) == set(DOMAINS) and card["tokens_trained"] == 20 * 8 * 64
    assert card["loss_last"] < card["loss_first"]
    assert set(card["routing_concentration"]) == set(DOMAINS) and set(card["heldout_loss"]) == set(DOMAINS)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "olmoe" and model.config.num_experts == TINY.num_experts
    assert AutoTokenizer.from_pretrained(path).chat_template
    assert not [p for p in cache.iterdir() if p.name.startswith(".") and p.is_dir()]  # no temporary build left behind


def test_cache_is_reused_and_rebuilt_on_request(tiny_lab, monkeypatch, tmp_path):
    cache, path = tiny_lab
    built = []

    def fake_pretrain(recipe, out, progress=True, threads=None):
        built.append(recipe.key())
        (Path(out) / lab.CARD_NAME).write_text("{}")

    monkeypatch.setattr(lab, "pretrain_lab_model", fake_pretrain)
    assert lab.lab_model_path(TINY, cache_dir=cache) == path and built == []  # cached: not rebuilt
    other = dataclasses.replace(TINY, seed=5)
    assert lab.lab_model_path(other, cache_dir=tmp_path) == tmp_path / other.key() and built == [other.key()]
    lab.lab_model_path(other, cache_dir=tmp_path, rebuild=True)
    assert built == [other.key(), other.key()]


def test_pretrain_command(tiny_lab, tmp_path, capsys):
    from hellora_trl import cli

    cache, _ = tiny_lab
    assert cli.main(["pretrain", "--recipe", "tiny", "--cache_dir", str(cache), "--output_dir",
                     str(tmp_path / "copy")]) == 0
    out = capsys.readouterr().out
    assert "HELLoRA lab model" in out and (tmp_path / "copy" / "lab_card.json").is_file()
    assert cli.main(["pretrain", "--recipe", "nope"]) == 1


def test_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match="unknown lab recipe"):
        lab.lab_model_path("huge")


@pytest.mark.data
def test_shared_corpus_reads_the_real_text_and_keeps_gsm8k_tail_out():
    from testing_utils import shared_dataset

    root = shared_dataset()
    corpus = shared_corpus(root, docs_per_domain=50)
    assert set(corpus) == {"math", "code", "safety"} and all(len(v) == 50 for v in corpus.values())
    full = shared_corpus(root)
    tail = [json.loads(x) for x in (Path(root) / "gsm8k" / "train.jsonl").read_text().splitlines()[6000:6010]]
    assert not any(r["question"] in d for r in tail for d in full["math"])
    held = shared_heldout(root, n=8)
    assert not set(held["code"]) & set(full["code"]) and not set(held["safety"]) & set(full["safety"])
    assert not set(held["math"]) & set(full["math"])


def test_quality_helpers_on_the_tiny_lab_model(tiny_lab):
    import math

    from peft import LoraConfig

    from hellora_trl.accounting import trainable_parameter_report
    from hellora_trl.recipes.lab import quality as q

    _, path = tiny_lab
    model, tokenizer = q._load(path)
    rows = arithmetic_problems(6, seed=1)
    loss = q.completion_loss(model, tokenizer, rows, batch_size=4)
    assert math.isfinite(loss) and loss > 0
    profile = q.routing_profile(model, tokenizer, rows)
    assert len(profile.concentration()) == TINY.num_hidden_layers and profile.tokens_seen > 0
    floor = q.attention_router_only(model, LoraConfig(r=2, lora_alpha=4))
    parts = trainable_parameter_report(floor)["by_component"]
    assert parts["experts"] == 0 and parts["router"] > 0 and parts["attention"] > 0


# ---------------------------------------------------------------- the package face (moved paths: test_aliases.py)
def test_the_face_is_what_the_sft_recipe_uses():
    """`hellora train` with no model or dataset takes its rows from the face, and the face re-exports the model's
    public names (docs/lab.md imports them from hellora_trl.recipes.lab)."""
    import ast

    from hellora_trl.recipes import lab as face
    from hellora_trl.recipes.sft import HELLoRAScriptArguments, load_task_data

    train, held_out = load_task_data(HELLoRAScriptArguments(train_limit=12, eval_limit=5), seed=3)
    expected_train, expected_held_out = face.default_task(12, 5, seed=3)
    assert train[:] == expected_train[:] and held_out == expected_held_out
    rows, held_rows = arithmetic_task(12, 5, seed=3)  # the content split (issue 20), not the wording-only one
    assert train["prompt"][0].endswith(rows[0]["question"] + "\nAnswer:") and held_out == held_rows
    assert face.load_lab_model is lab.load_lab_model and face.LAB_RECIPES is lab.LAB_RECIPES
    # the recipe imports the lab only through its face
    tree = ast.parse(Path(face.__file__).parents[1].joinpath("sft.py").read_text())
    lab_imports = [(n.module, [a.name for a in n.names]) for n in ast.walk(tree)
                   if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("lab")
                   or isinstance(n, ast.ImportFrom) and any(a.name.startswith("lab") for a in n.names)]
    assert lab_imports and all(module is None and names == ["lab"] for module, names in lab_imports), lab_imports


def test_face_baseline_and_compare_on_the_tiny_lab_model(tiny_lab):
    import types

    from hellora_trl.recipes import lab as face

    _, path = tiny_lab
    model, tokenizer = face.load_lab_model(TINY, cache_dir=path.parent)
    _, held_out = face.default_task(4, 6, seed=0)
    base = face.baseline(model, tokenizer, held_out, exact_match=0.25)
    assert set(base) == {"base_heldout_loss", "base_exact_match"} and base["base_heldout_loss"] > 0
    profile = types.SimpleNamespace(concentration=lambda: [0.5, 0.3], experts_per_token=2, num_experts=8)
    after = face.compare(base, model, tokenizer, held_out, exact_match=0.5, profile=profile)
    assert after["adapted_heldout_loss"] == pytest.approx(base["base_heldout_loss"])  # same weights, same loss
    assert after["adapted_exact_match"] == 0.5 and after["routing_uniform_top_k_share"] == 0.25
    assert after["routing_top_k_share_layer1"] == 0.3 and after["routing_min_top_k_share_over_uniform"] == 1.2
    assert set(face.compare(base, model, tokenizer, held_out)) == set(base) | {"adapted_heldout_loss"}


# ---------------------------------------------------------------------------- the cache trusts nothing (#19 item 5)
def fake_entry(out: Path) -> None:
    """What a (fake) build writes: the files every entry must have."""
    for name in ("config.json", lab.CARD_NAME):
        (out / name).write_text("{}")
    (out / "model.safetensors").write_bytes(b"rebuilt")


@pytest.fixture
def tiny_copy(tiny_lab, tmp_path):
    """A private copy of the tiny lab entry (tests damage it)."""
    import shutil

    _, path = tiny_lab
    cache = tmp_path / "cache"
    shutil.copytree(path, cache / TINY.key())
    return cache, cache / TINY.key()


def test_published_entry_has_a_manifest_of_every_file(tiny_lab):
    _, path = tiny_lab
    files = json.loads((path / lab.MANIFEST_NAME).read_text())["files"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {lab.MANIFEST_NAME}
    assert set(files) == on_disk and {"model.safetensors", "config.json", lab.CARD_NAME} <= on_disk
    lab.verify_entry(path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest"])
def test_a_damaged_entry_stops_with_one_line_naming_the_rebuild(tiny_copy, damage):
    cache, path = tiny_copy
    weights = path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        (path / "config.json").unlink()
    else:
        (path / lab.MANIFEST_NAME).unlink()
    with pytest.raises(lab.LabCacheError) as err:
        lab.load_lab_model(TINY, cache_dir=cache, progress=False)  # the old code: SafetensorError, or trusted
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert f"hellora pretrain --rebuild --recipe tiny --cache_dir {cache}" in message


def test_rebuild_replaces_a_damaged_entry(tiny_copy, monkeypatch):
    cache, path = tiny_copy
    (path / "model.safetensors").write_bytes(b"torn")

    def fake_pretrain(recipe, out, progress=True, threads=None):
        fake_entry(Path(out))

    monkeypatch.setattr(lab, "pretrain_lab_model", fake_pretrain)
    assert lab.lab_model_path(TINY, cache_dir=cache, rebuild=True) == path
    lab.verify_entry(path)
    assert (path / "model.safetensors").read_bytes() == b"rebuilt" and not [p for p in cache.iterdir() if ".old-" in p.name]


def test_rebuild_command_names_the_recipe_overrides():
    assert lab.rebuild_command(lab.LAB_RECIPES["default"]) == "hellora pretrain --rebuild"
    custom = dataclasses.replace(TINY, steps=7, seed=3, data_dir="/d")
    assert lab.rebuild_command(custom, "/c") == (
        "hellora pretrain --rebuild --recipe tiny --data_dir /d --steps 7 --seed 3 --cache_dir /c"
    )


def test_stale_temp_folders_of_killed_builds_are_cleaned_on_the_next_run(monkeypatch, tmp_path):
    import os
    import subprocess
    import sys
    import time

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = lab_cache.host_tag()
    cache = tmp_path / "cache"
    key = TINY.key()
    dead = cache / f".{key}.tmp-{host}-{gone.pid}-abc123"
    live = cache / f".{key}.tmp-{host}-{os.getpid()}-def456"
    elsewhere = cache / f".{key}.tmp-otherhost-{gone.pid}-ghi789"
    ancient = cache / f".{key}.tmp-xyz_old"  # the old naming (no pid), a day and more
    for folder in (dead, live, elsewhere, ancient):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    past = time.time() - lab_cache.STALE_SECONDS - 60
    os.utime(ancient, (past, past))

    def fake_pretrain(recipe, out, progress=True, threads=None):
        fake_entry(Path(out))

    monkeypatch.setattr(lab, "pretrain_lab_model", fake_pretrain)
    lab.lab_model_path(TINY, cache_dir=cache)
    assert not dead.exists() and not ancient.exists()  # the old code left both forever
    assert live.exists() and elsewhere.exists()  # a running build here, or a recent one on another machine


# ---------------------------------------------------------------------------- one build per job (#19 item 0)
def _publish_later(cache: Path, delay: float) -> None:
    import threading

    def publish():
        import time

        time.sleep(delay)
        entry = cache / TINY.key()
        entry.mkdir(parents=True)
        fake_entry(entry)
        lab.write_manifest(entry)

    threading.Thread(target=publish, daemon=True).start()


def test_other_ranks_wait_for_the_main_process_instead_of_building(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(lab, "pretrain_lab_model", lambda *a, **k: pytest.fail("a non-first rank built the model"))
    _publish_later(tmp_path, 1.0)
    assert lab.lab_model_path(TINY, cache_dir=tmp_path) == tmp_path / TINY.key()


def test_other_ranks_stop_with_one_line_when_the_main_process_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("LOCAL_RANK", "0")

    def broken(recipe, out, progress=True, threads=None):
        raise OSError("No space left on device")

    monkeypatch.setattr(lab, "pretrain_lab_model", broken)
    with pytest.raises(OSError, match="No space"):
        lab.lab_model_path(TINY, cache_dir=tmp_path)  # the main process: its own error
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(lab.LabCacheError, match="main process failed to build the lab model .*No space") as err:
        lab.lab_model_path(TINY, cache_dir=tmp_path)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("MASTER_PORT", "30000")  # another job: an old failure note is not this job's
    monkeypatch.setenv("HELLORA_LAB_WAIT_SECONDS", "1")
    with pytest.raises(lab.LabCacheError, match="Waited 1 s for the main process"):
        lab.lab_model_path(TINY, cache_dir=tmp_path)


def test_pretraining_builds_the_model_whole_under_a_zero3_training_setup():
    """transformers' ZeRO-3 flag (set by a ZeRO-3 TrainingArguments) is off inside the block and back after it."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from hellora_trl.distributed import unsharded_construction

    keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with unsharded_construction():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        del keep
