import json

import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from hellora_trl import ExpertProfile, profile_experts
from hellora_trl.profiling import pad_collate, warmup_slice
from hellora_trl.utils import atomic_write_text

from modulelist_model import LegacyMoEConfig, LegacyMoEForCausalLM
from testing_utils import FUSED_FAMILIES, random_batch, tiny_model


def router_counts(model, batch):
    """Independent count: read the router's own top-k output for real (unpadded) tokens."""
    seen = []
    handles = [
        layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2].detach()))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    mask = batch["attention_mask"].reshape(-1).bool()
    E = model.config.num_experts
    return torch.stack([torch.bincount(idx[mask].reshape(-1), minlength=E) for idx in seen])


def test_counts_match_router_assignments_and_skip_padding(olmoe):
    batch = random_batch(olmoe, batch=3, seq=10)
    batch["attention_mask"][1, 6:] = 0
    batch["attention_mask"][2, 3:] = 0
    profile = profile_experts(olmoe, [batch], progress=False)
    assert torch.equal(profile.counts, router_counts(olmoe, batch))
    assert profile.tokens_seen == int(batch["attention_mask"].sum())
    k = olmoe.config.num_experts_per_tok
    assert (profile.counts.sum(dim=1) == profile.tokens_seen * k).all()
    assert profile.num_experts == olmoe.config.num_experts and profile.experts_per_token == k
    assert profile.layer_names == [f"model.layers.{i}.mlp.experts" for i in range(olmoe.config.num_hidden_layers)]


def test_accepts_dataset_dataloader_and_iterable(olmoe):
    rows = [{"input_ids": list(range(3, 3 + n))} for n in (5, 8, 6, 7)]
    ds = Dataset.from_list(rows)
    p1 = profile_experts(olmoe, ds, batch_size=2, progress=False)
    loader = DataLoader(rows, batch_size=2, collate_fn=pad_collate(0))
    p2 = profile_experts(olmoe, loader, progress=False)
    p3 = profile_experts(olmoe, list(loader), progress=False)
    assert torch.equal(p1.counts, p2.counts) and torch.equal(p2.counts, p3.counts)
    assert p1.tokens_seen == 26
    p4 = profile_experts(olmoe, ds, batch_size=2, max_batches=1, progress=False)
    assert p4.tokens_seen == 13


def test_empty_or_untokenized_data_is_rejected(olmoe):
    with pytest.raises(ValueError, match="empty"):
        profile_experts(olmoe, Dataset.from_dict({"input_ids": []}), progress=False)
    with pytest.raises(ValueError, match="empty"):
        profile_experts(olmoe, [], progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        profile_experts(olmoe, Dataset.from_dict({"text": ["hello"]}), progress=False)


def test_model_without_moe_layers_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="No MoE layers"):
        profile_experts(dense, [{"input_ids": torch.ones(1, 4, dtype=torch.long)}], progress=False)


def test_save_load_roundtrip_and_extra(tmp_path, olmoe):
    profile = profile_experts(olmoe, [random_batch(olmoe)], progress=False, source={"dataset": "unit"})
    path = profile.save(tmp_path / "p" / "profile.json", extra={"hot_experts": {"x": [1]}})
    loaded = ExpertProfile.load(path)
    assert torch.equal(loaded.counts, profile.counts)
    assert loaded.layer_names == profile.layer_names and loaded.source["dataset"] == "unit"
    assert json.loads(path.read_text())["hot_experts"] == {"x": [1]}
    assert [p.name for p in path.parent.iterdir()] == ["profile.json"]  # no temp file left behind


def test_invalid_profile_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        ExpertProfile.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ExpertProfile.load(bad)
    bad.write_text(json.dumps({"counts": [[1]]}))
    with pytest.raises(ValueError, match="format marker"):
        ExpertProfile.load(bad)
    bad.write_text(json.dumps({"format": "hellora_trl.ExpertProfile", "counts": [[1, 2]], "layer_names": ["a"],
                               "num_experts": 3, "experts_per_token": 1}))
    with pytest.raises(ValueError, match="shape"):
        ExpertProfile.load(bad)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")

    with pytest.raises(TypeError):
        atomic_write_text(target, 123)  # write() of a non-string fails mid-save
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def _profile(counts):
    counts = torch.tensor(counts)
    return ExpertProfile(counts, [f"l{i}" for i in range(len(counts))], counts.shape[1], 1, tokens_seen=int(counts[0].sum()))


def test_merge_jaccard_coverage_concentration():
    a = _profile([[8, 1, 1, 0]])
    b = _profile([[0, 1, 1, 8]])
    assert torch.equal(a.merge(b).counts, torch.tensor([[8, 2, 2, 8]]))
    assert a.merge(b).tokens_seen == 20
    assert a.jaccard(a, k=2) == [1.0]
    assert a.jaccard(b, k=2) == [pytest.approx(1 / 3)]  # {0,1} vs {1,3}... ties: b top-2 = {3, 1}
    assert a.coverage(b, k=2) == [pytest.approx(0.1)]  # b's mass on a's hot set {0, 1}
    assert a.concentration(1) == [pytest.approx(0.8)]
    assert _profile([[5, 5, 5, 5]]).concentration(2) == [pytest.approx(0.5)]  # uniform: k / E
    with pytest.raises(ValueError, match="different models"):
        a.merge(_profile([[1, 2, 3]]))


def test_profile_check_matches(olmoe):
    profile = profile_experts(olmoe, [random_batch(olmoe)], progress=False)
    assert profile.check_matches(olmoe) is None
    assert profile.layer_names == [f"model.layers.{i}.mlp.experts" for i in range(olmoe.config.num_hidden_layers)]
    assert profile.num_experts == olmoe.config.num_experts
    other = tiny_model("olmoe", num_hidden_layers=1)
    with pytest.raises(ValueError, match="does not match"):
        profile.check_matches(other)
    fewer = tiny_model("olmoe", num_experts=olmoe.config.num_experts // 2)  # same layers, other expert count
    with pytest.raises(ValueError, match="experts per layer"):
        profile.check_matches(fewer)


def test_gradient_checkpoint_recompute_is_not_double_counted(olmoe):
    from hellora_trl import RoutingCounter

    batch = random_batch(olmoe)
    with RoutingCounter(olmoe) as plain:
        olmoe.train()
        olmoe(**batch, labels=batch["input_ids"]).loss.backward()
    olmoe.zero_grad()
    olmoe.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with RoutingCounter(olmoe) as checkpointed:
        olmoe(**batch, labels=batch["input_ids"]).loss.backward()
    assert checkpointed.counts.sum() > 0
    assert torch.equal(plain.counts, checkpointed.counts)
    assert plain.tokens_seen == checkpointed.tokens_seen == batch["input_ids"].numel()


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    """Regression: files went out 0600 because mkstemp creates them so."""
    import os
    import stat

    from hellora_trl.utils import atomic_write_text

    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "p.json", "{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text() == "{}" and not list(tmp_path.glob(".p.json.*"))


def _full_forward_counts(model, batch):
    """Counts of whole forwards (the counter without early stop), and the logits, for comparison."""
    from hellora_trl import RoutingCounter

    with RoutingCounter(model) as counter, torch.no_grad():
        logits = model(**batch).logits
    return counter.counts, counter.tokens_seen, logits


def _lm_head_calls(model):
    calls = []
    head = model.get_output_embeddings() or model.lm_head
    handle = head.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("family", FUSED_FAMILIES + ["modulelist"])
def test_forward_profiling_stops_after_the_last_router_with_identical_counts(family):
    """profile_experts ends each forward once every MoE layer is counted (the LM head never runs); the counts are
    those of whole forwards, and the model is left working (same logits afterwards)."""
    if family == "modulelist":
        model = LegacyMoEForCausalLM(LegacyMoEConfig()).eval()
    else:
        model = tiny_model(family).eval()
    batch = random_batch(model, batch=3, seq=9)
    batch["attention_mask"][2, 5:] = 0
    counts, tokens, logits = _full_forward_counts(model, batch)
    calls, handle = _lm_head_calls(model)
    profile = profile_experts(model, [batch, batch], progress=False)
    handle.remove()
    assert calls == []  # no forward reached the LM head
    assert torch.equal(profile.counts, 2 * counts) and profile.tokens_seen == 2 * tokens
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)


def test_counter_outside_profile_experts_never_stops_a_forward(olmoe):
    """The LoRA warm-up counts while training: its forwards must run whole (stop_early is off by default)."""
    from hellora_trl import RoutingCounter

    batch = random_batch(olmoe)
    calls, handle = _lm_head_calls(olmoe)
    with RoutingCounter(olmoe) as counter:
        olmoe(**batch, labels=batch["input_ids"]).loss.backward()
    handle.remove()
    assert not counter.stop_early and calls == [1] and counter.counts.sum() > 0


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_lora_warmup_never_counts_padding_when_peft_bypasses_the_model_hooks(monkeypatch, task_type):
    """Ecosystem review (Axolotl 0.19 env, PEFT 0.20): the warm-up counted padding (140 vs 102 tokens) because
    PEFT's LoraModel called the transformers model's ``.forward`` directly, so the pre-hook that read the attention
    mask never ran. Reproduced here by making the tuner call ``.forward`` as PEFT 0.20 did."""
    from peft.tuners.tuners_utils import BaseTuner

    from hellora_trl import default_lora_config
    from hellora_trl.integrations.warmup import lora_warmup_profile

    monkeypatch.setattr(BaseTuner, "forward", lambda self, *args, **kwargs: self.model.forward(*args, **kwargs))
    model = tiny_model("olmoe")
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 500, (n,), generator=generator).tolist()} for n in (5, 17, 9, 30)]
    config = default_lora_config(r=2, lora_alpha=4, task_type=task_type)
    profile = lora_warmup_profile(model, rows, config, epochs=1, batch_size=2, seed=0)
    real = sum(len(r["input_ids"]) for r in rows)
    assert profile.tokens_seen == real
    assert (profile.counts.sum(dim=1) == real * model.config.num_experts_per_tok).all()


# ----------------------------------------------------------------------------------- clear errors (#13, review W7)
def _saved_profile(tmp_path, olmoe, **changes):
    profile = profile_experts(olmoe, [random_batch(olmoe)], progress=False)
    data = json.loads(profile.save(tmp_path / "good.json").read_text())
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "case, match",
    [
        ("nan", r"bad\.json: Invalid expert profile: counts must be whole numbers"),
        ("float", r"counts must be whole numbers"),
        ("version", r"bad\.json: Unsupported profile format version 99"),
        ("binary", r"Expert profile .*bad\.json is not UTF-8 JSON text"),
        ("directory", r"is a directory, not a file; pass the profile JSON in it"),
    ],
)
def test_broken_profile_files_give_one_clear_line(tmp_path, olmoe, case, match):
    """Review 3.12-3.16: NaN counts (raw RuntimeError), non-UTF8 files (no file name), version 99 (accepted),
    a directory ('not found')."""
    from hellora_trl.selection import load_plan

    path = tmp_path / "bad.json"
    data = _saved_profile(tmp_path, olmoe)
    if case == "nan":
        data["counts"][0][0] = float("nan")
        path.write_text(json.dumps(data))  # json writes NaN
    elif case == "float":
        data["counts"][0][0] = 1.5
        path.write_text(json.dumps(data))
    elif case == "version":
        data["version"] = 99
        path.write_text(json.dumps(data))
    elif case == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path = tmp_path
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        ExpertProfile.load(path)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_plan(path)


def test_profiling_that_records_no_routing_fails_instead_of_writing_zeros(olmoe, monkeypatch):
    """Review 1.12/W5: a family whose experts never saw the routing profiled to all zeros with rc 0."""
    from hellora_trl.profiling import RoutingCounter

    monkeypatch.setattr(RoutingCounter, "_record", lambda self, layer_idx, index: None)
    with pytest.raises(RuntimeError, match="recorded no routing in any MoE layer"):
        profile_experts(olmoe, [random_batch(olmoe)], progress=False)


# ------------------------------------------------------------------------ rows as the trainer prepares them
PREPARE_CASES = {
    "text": ([{"text": f"row {i} " + "word " * (i % 7)} for i in range(12)], {}),
    "prompt_completion": (  # long prompts on some rows: truncation leaves them no target, and they are dropped
        [{"prompt": f"Question: {i} plus {i}?" + " and" * (8 * (i % 3)) + "\nAnswer:", "completion": f" {2 * i}"}
         for i in range(12)],
        {"max_length": 14},
    ),
    "messages": (
        [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} " * (i % 4 + 1)}]}
         for i in range(12)],
        {"max_length": 16},
    ),
}


@pytest.mark.parametrize("case", sorted(PREPARE_CASES))
def test_prepare_dataset_is_what_the_sft_trainer_trains_on(case, tmp_path):
    """recipes.prepare runs TRL's own preparation: the same input_ids and labels as an SFTTrainer built on the
    rows (EOS, chat template, completion masks, truncation, rows left without a target dropped)."""
    import random

    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from hellora_trl.recipes.offline import build_tokenizer
    from hellora_trl.recipes.prepare import prepare_dataset, sft_arguments, warmup_rows

    rows, options = PREPARE_CASES[case]
    tokenizer = build_tokenizer()
    config = SFTConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, **options)
    trainer = SFTTrainer(model=tiny_model("olmoe"), args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=LoraConfig(r=2, target_modules=["q_proj"]))
    expected = trainer.train_dataset
    for args in (config, sft_arguments(**options)):
        prepared = prepare_dataset(Dataset.from_list(rows), tokenizer, args)
        assert prepared["input_ids"][:] == expected["input_ids"][:]
        assert prepared["labels"][:] == expected["labels"][:]
    sliced = warmup_rows(Dataset.from_list(rows), tokenizer, sft_arguments(**options), 0.25, 3)
    if case == "prompt_completion":
        assert 0 < len(expected) < len(rows)  # the drop path ran
    indices = sorted(random.Random(3).sample(range(len(expected)), round(0.25 * len(expected))))
    assert sliced["input_ids"][:] == expected.select(indices)["input_ids"][:]


def test_prepare_refuses_what_needs_the_model_or_is_not_prepared():
    from hellora_trl.recipes.offline import build_tokenizer
    from hellora_trl.recipes.prepare import prepare_dataset, sft_arguments

    rows = Dataset.from_list([{"text": "a b c"}])
    with pytest.raises(ValueError, match="Not HELLoRAConfig / SFTConfig fields"):
        sft_arguments(max_lenght=8)
    with pytest.raises(ValueError, match="embeddings"):
        prepare_dataset(rows, build_tokenizer(), sft_arguments(chat_template_path="x.jinja"))
    with pytest.raises(ValueError, match="empty"):
        prepare_dataset(Dataset.from_list([]), build_tokenizer(), sft_arguments())


# --------------------------------------------------------------------------------------------------------------
# Warm-up slice
# --------------------------------------------------------------------------------------------------------------


def test_warmup_slice_is_seeded_and_sized():
    """(Was recipes.data.sample_fraction, a pass-through to this function.)"""
    ds = Dataset.from_dict({"i": list(range(200))})
    part = warmup_slice(ds, 0.1, seed=0)
    assert len(part) == 20
    assert part["i"][:] == sorted(part["i"][:])  # dataset order is kept
    assert len(set(part["i"][:])) == 20
    assert warmup_slice(ds, 0.1, seed=0)["i"][:] == part["i"][:]
    assert warmup_slice(ds, 0.1, seed=1)["i"][:] != part["i"][:]
    assert len(warmup_slice(ds, 0.0001, seed=0)) == 1  # at least one row
    assert len(warmup_slice(ds, 1.0, seed=0)) == 200
    assert len(warmup_slice(ds, 1, seed=0)) == 200


@pytest.mark.parametrize("fraction", [0, 0.0, -0.5, 1.0001, 2, float("nan"), True, "0.5"])
def test_warmup_slice_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        warmup_slice(Dataset.from_dict({"i": [1, 2]}), fraction, seed=0)


def test_warmup_slice_rejects_empty_dataset():
    with pytest.raises(ValueError, match="empty"):
        warmup_slice(Dataset.from_dict({"i": []}), 0.5, seed=0)
