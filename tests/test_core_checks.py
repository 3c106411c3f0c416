"""Input checks and edge cases of the core (profile, selection, accounting, profiling) that the 2026-12-05
mutation review found untested (issue 23): each test pins a behaviour that a one-token change in the code would
break. Fast: tiny models only."""

from dataclasses import FrozenInstanceError, fields
from types import SimpleNamespace
import logging

import pytest
import torch
from torch import nn

from hellora_trl import ExpertProfile, RoutingCounter, profile_experts, select_hot_experts, trainable_parameter_report
from hellora_trl.accounting import adapter_flops_per_token
from hellora_trl.profile import PROFILE_FORMAT_VERSION, check_k, rank_experts
from hellora_trl.profiling import warmup_indices, warmup_slice
from hellora_trl.selection import SelectionSettings, default_k, plan_hot_experts, validate_hot_map

from modulelist_model import LegacyMoEConfig, LegacyMoEForCausalLM
from testing_utils import random_batch, tiny_model

NAMES = ["a.experts", "b.experts"]


def profile_of(counts, k=2, **kwargs):
    counts = torch.tensor(counts)
    return ExpertProfile(
        counts=counts,
        layer_names=[f"model.layers.{i}.mlp.experts" for i in range(counts.shape[0])],
        num_experts=counts.shape[1],
        experts_per_token=k,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------------ hot maps
@pytest.mark.parametrize("bad", [-1, 4, 5, -4])
def test_hot_ids_must_lie_in_zero_to_num_experts(bad):
    with pytest.raises(ValueError, match=r"'a\.experts': hot experts .* in \[0, 4\)"):
        validate_hot_map({"a.experts": [0, bad], "b.experts": [1]}, NAMES, 4)


def test_hot_map_boundary_ids_and_a_valid_map_pass():
    assert validate_hot_map({"a.experts": [0, 3], "b.experts": [3]}, NAMES, 4) is None


@pytest.mark.parametrize("ids", [[1, 1], [True], [1.0], "01", 2])
def test_hot_map_needs_distinct_whole_ids_in_a_list(ids):
    with pytest.raises(ValueError, match=r"'a\.experts'"):
        validate_hot_map({"a.experts": ids, "b.experts": [1]}, NAMES, 4)


def test_no_hot_experts_message_names_the_empty_layer():
    with pytest.raises(ValueError, match=r"Layer 'a\.experts' has no hot experts"):
        validate_hot_map({"a.experts": [], "b.experts": [1]}, NAMES, 4)
    with pytest.raises(ValueError, match=r"Layer 'b\.experts' has no hot experts"):
        validate_hot_map({"a.experts": [1], "b.experts": []}, NAMES, 4)


@pytest.mark.parametrize("hot", [[["a.experts", [0]]], "a.experts", None])
def test_hot_map_must_be_a_dict(hot):
    with pytest.raises(ValueError, match="must be a dict"):
        validate_hot_map(hot, NAMES, 4)


def test_hot_map_key_mismatch_names_missing_and_unknown():
    with pytest.raises(ValueError, match=r"missing \['b\.experts'\], unknown \['c\.experts'\]"):
        validate_hot_map({"a.experts": [0], "c.experts": [0]}, NAMES, 4)


# ------------------------------------------------------------------------------------------------ mass strategy
@pytest.mark.parametrize("mass", [0, 0.0, -0.1, 1.0000001, 1.5, 2.0])
def test_mass_outside_zero_one_is_refused(mass):
    with pytest.raises(ValueError, match=r"mass must be in \(0, 1\]"):
        select_hot_experts(profile_of([[50, 30, 10, 10]]), strategy="mass", mass=mass)


def test_mass_one_covers_every_routed_expert_and_the_default_mass_is_one_half():
    p = profile_of([[50, 30, 10, 10], [0, 0, 7, 0]])
    assert select_hot_experts(p, strategy="mass", mass=1.0) == {
        "model.layers.0.mlp.experts": [0, 1, 2, 3],
        "model.layers.1.mlp.experts": [2],
    }
    half = {"model.layers.0.mlp.experts": [0], "model.layers.1.mlp.experts": [2]}
    assert select_hot_experts(p, strategy="mass") == half == select_hot_experts(p, strategy="mass", mass=0.5)
    # 0.51 needs a second expert in layer 0 (50% < 51%), so the default is exactly one half
    assert select_hot_experts(p, strategy="mass", mass=0.51)["model.layers.0.mlp.experts"] == [0, 1]


def test_mass_of_a_single_assignment_layer_is_one_expert():
    p = profile_of([[0, 1, 0, 0]])
    assert select_hot_experts(p, strategy="mass", mass=1.0) == {"model.layers.0.mlp.experts": [1]}


def test_mass_layer_that_saw_no_tokens_gets_max_k():
    p = profile_of([[6, 2, 1, 1], [0, 0, 0, 0]])
    hot = select_hot_experts(p, strategy="mass", mass=0.5, max_k=3)
    assert hot == {"model.layers.0.mlp.experts": [0], "model.layers.1.mlp.experts": [0, 1, 2]}


def test_mass_min_k_above_max_k_is_refused_and_equal_bounds_fix_k():
    p = profile_of([[50, 30, 10, 10]])
    with pytest.raises(ValueError, match=r"min_k \(3\) must not exceed max_k \(2\)"):
        select_hot_experts(p, strategy="mass", min_k=3, max_k=2)
    assert select_hot_experts(p, strategy="mass", mass=0.1, min_k=3, max_k=3) == {"model.layers.0.mlp.experts": [0, 1, 2]}
    assert select_hot_experts(p, strategy="mass", mass=1.0, min_k=2, max_k=2) == {"model.layers.0.mlp.experts": [0, 1]}


@pytest.mark.parametrize("bound", [{"min_k": 0}, {"max_k": 5}, {"min_k": 5}])
def test_mass_bounds_are_checked_like_k(bound):
    with pytest.raises(ValueError, match="k must be"):
        select_hot_experts(profile_of([[5, 3, 1, 1]]), strategy="mass", **bound)


def test_mass_ignores_k_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="hellora_trl.selection"):
        hot = select_hot_experts(profile_of([[50, 30, 10, 10]]), k=3, strategy="mass")
    assert hot == {"model.layers.0.mlp.experts": [0]} and "k=3 is ignored" in caplog.text


def test_selection_refuses_an_all_zero_profile_except_random():
    p = profile_of([[0, 0, 0, 0]])
    for strategy in ("layer", "model", "cold", "mass"):
        with pytest.raises(ValueError, match="no routing counts"):
            select_hot_experts(p, k=1, strategy=strategy)
    assert len(select_hot_experts(p, k=2, strategy="random")["model.layers.0.mlp.experts"]) == 2


def test_random_strategy_default_seed_is_zero_and_seeds_differ():
    p = profile_of([[1] * 16] * 3)
    default = select_hot_experts(p, k=4, strategy="random")
    assert default == select_hot_experts(p, k=4, strategy="random", seed=0)
    assert default != select_hot_experts(p, k=4, strategy="random", seed=1)
    assert default != select_hot_experts(p, k=4, strategy="random", seed=-1)
    assert all(0 <= e < 16 for ids in default.values() for e in ids)


# ------------------------------------------------------------------------------------------------ defaults
def test_default_k_doubles_with_shared_experts_and_is_capped_by_num_experts():
    assert default_k(profile_of([[1, 2, 3, 4, 5]], k=2)) == 2
    assert default_k(profile_of([[1, 2, 3, 4, 5]], k=2, has_shared_experts=True)) == 4
    assert default_k(profile_of([[1, 2, 3]], k=2, has_shared_experts=True)) == 3


def test_selection_settings_defaults_are_pinned_and_frozen():
    defaults = {f.name: f.default for f in fields(SelectionSettings)}
    assert defaults == {
        "k": None, "strategy": "layer", "seed": 0, "mass": 0.5, "min_k": 1, "max_k": None, "reselect": False,
        "components": "all", "variant": "lora",
    }
    with pytest.raises(FrozenInstanceError):
        SelectionSettings().k = 3


def test_settings_mass_default_min_k_allows_a_single_expert():
    p = profile_of([[90, 5, 3, 2], [25, 25, 25, 25]])
    hot, record = plan_hot_experts(p, SelectionSettings(strategy="mass"))
    assert hot == {"model.layers.0.mlp.experts": [0], "model.layers.1.mlp.experts": [0, 1]}
    assert record["mass"] == 0.5 and record["per_layer_k"] == {"model.layers.0.mlp.experts": 1, "model.layers.1.mlp.experts": 2}


def test_settings_from_args_seed_order():
    assert SelectionSettings.from_args(SimpleNamespace()).seed == 0
    assert SelectionSettings.from_args(SimpleNamespace(seed=7)).seed == 7
    assert SelectionSettings.from_args(SimpleNamespace(seed=7, hellora_seed=3)).seed == 3
    assert SelectionSettings.from_args(SimpleNamespace(seed=7, hellora_seed=3), seed=5).seed == 5
    s = SelectionSettings.from_args(SimpleNamespace(hellora_selection="mass", hellora_mass=0.9, hellora_k=None))
    assert (s.strategy, s.mass, s.k) == ("mass", 0.9, None)


def test_stored_map_of_another_size_warns_and_is_used(caplog):
    p = profile_of([[5, 9, 1, 7], [0, 0, 3, 2]])
    stored = {"model.layers.0.mlp.experts": [2, 3], "model.layers.1.mlp.experts": [0, 1]}
    with caplog.at_level(logging.INFO, logger="hellora_trl.selection"):
        hot, _ = plan_hot_experts(p, SelectionSettings(k=2), stored, origin="run.json")
    assert hot == stored
    assert "not k=" not in caplog.text and "using the hot map stored in run.json" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hellora_trl.selection"):
        hot, _ = plan_hot_experts(p, SelectionSettings(k=3), stored, origin="run.json")
    assert hot == stored and "run.json holds a hot map with [2] experts per layer, not k=3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hellora_trl.selection"):
        plan_hot_experts(p, SelectionSettings(), stored)
    assert "not k=" not in caplog.text


def test_stored_map_is_validated():
    p = profile_of([[5, 9, 1, 7]])
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        plan_hot_experts(p, SelectionSettings(k=1), {"model.layers.0.mlp.experts": [-1]})


# ------------------------------------------------------------------------------------------------ the profile record
def test_profile_constructor_defaults():
    p = ExpertProfile(torch.tensor([[1, 2]]), ["x"], 2, 1)
    assert (p.family, p.tokens_seen, p.source, p.has_shared_experts) == ("unknown", 0, {}, False)
    assert default_k(p) == 1


@pytest.mark.parametrize("counts", [[[1, -1]], [[0, -5]]])
def test_negative_counts_are_refused(counts):
    with pytest.raises(ValueError, match="non-negative"):
        ExpertProfile(torch.tensor(counts), ["x"], 2, 1)


def test_counts_shape_is_checked():
    with pytest.raises(ValueError, match="2-D"):
        ExpertProfile(torch.tensor([1, 2]), ["x"], 2, 1)
    with pytest.raises(ValueError, match="1 layer names and num_experts=3"):
        ExpertProfile(torch.tensor([[1, 2]]), ["x"], 3, 1)


def test_rank_experts_keeps_ties_in_index_order_beyond_sixteen():
    counts = torch.zeros(40, dtype=torch.int64)
    counts[[5, 30]] = 3
    expected = [5, 30] + [e for e in range(40) if e not in (5, 30)]
    assert rank_experts(counts).tolist() == expected
    assert rank_experts(counts, descending=False).tolist() == [e for e in range(40) if e not in (5, 30)] + [5, 30]


def test_shares_and_concentration_of_empty_and_single_assignment_layers():
    p = profile_of([[3, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], k=1)
    assert p.shares().tolist() == [[0.75, 0.25, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert p.concentration() == [0.75, 1.0, 0.0]
    assert p.concentration(2) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("k", [0, 5, -1])
def test_top_k_and_concentration_check_k(k):
    p = profile_of([[3, 1, 0, 2]])
    with pytest.raises(ValueError, match="k must be"):
        p.top_k(k)
    if k:  # k=0 means "experts_per_token" for concentration
        with pytest.raises(ValueError, match="k must be"):
            p.concentration(k)


def test_jaccard_and_coverage_values_and_k_one():
    a = profile_of([[5, 4, 1, 0], [0, 1, 2, 3]])
    b = profile_of([[5, 0, 4, 1], [3, 2, 1, 0]])
    assert a.jaccard(a, k=1) == [1.0, 1.0]
    assert a.jaccard(b, k=1) == [1.0, 0.0]
    assert a.jaccard(b) == [pytest.approx(1 / 3), 0.0]
    assert a.coverage(b) == [pytest.approx(0.5), pytest.approx(1 / 6)]
    assert a.coverage(b, k=3) == [pytest.approx(0.9), pytest.approx(0.5)]


@pytest.mark.parametrize("other", [[[1, 2, 3, 4]], [[1, 2, 3], [1, 2, 3]], [[1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 1]]])
def test_jaccard_coverage_and_merge_refuse_profiles_of_other_models(other):
    a = profile_of([[5, 4, 1, 0], [0, 1, 2, 3]])
    b = profile_of(other)
    for compare in (a.jaccard, a.coverage, a.merge, b.jaccard, b.coverage):
        with pytest.raises(ValueError, match="different models"):
            compare(b if compare.__self__ is a else a)


def test_profile_format_version_is_written_and_checked():
    p = profile_of([[1, 2]], family="olmoe", tokens_seen=3)
    data = p.to_dict()
    assert PROFILE_FORMAT_VERSION == 1 and data["version"] == 1
    assert ExpertProfile.from_dict(data).counts.tolist() == [[1, 2]]
    for version in (0, -1, 2, True, "1", 1.0):
        with pytest.raises(ValueError, match="Unsupported profile format version"):
            ExpertProfile.from_dict({**data, "version": version})
    del data["version"]
    assert ExpertProfile.from_dict(data).tokens_seen == 3


def test_profile_fields_missing_from_a_file_take_their_defaults():
    data = profile_of([[1, 2]], family="olmoe", tokens_seen=3, has_shared_experts=True).to_dict()
    assert ExpertProfile.from_dict(data).has_shared_experts is True
    for key in ("has_shared_experts", "tokens_seen", "family", "source"):
        del data[key]
    p = ExpertProfile.from_dict(data)
    assert (p.has_shared_experts, p.tokens_seen, p.family, p.source) == (False, 0, "unknown", {})


def test_profile_repr_and_round_trip(tmp_path):
    p = profile_of([[1, 2], [3, 0]], family="olmoe", tokens_seen=3, source={"rows": 2})
    assert repr(p) == "ExpertProfile(family='olmoe', layers=2, experts=2, top_k=2, tokens_seen=3)"
    back = ExpertProfile.load(p.save(tmp_path / "p.json"))
    assert torch.equal(back.counts, p.counts) and back.to_dict() == p.to_dict()


def test_check_matches_compares_layers_and_expert_counts():
    model = tiny_model("olmoe")
    E = model.config.num_experts
    profile = profile_experts(model, [random_batch(model)], progress=False)
    assert profile.num_experts == E and profile.check_matches(model) is None
    fewer = tiny_model("olmoe", num_experts=E // 2)
    with pytest.raises(ValueError, match=rf"Profile has {E} experts per layer but the model's layers .* have {E // 2}"):
        profile.check_matches(fewer)
    with pytest.raises(ValueError, match="does not match the model"):
        profile.check_matches(tiny_model("olmoe", num_hidden_layers=1))
    # accounting checks the profile against the model before any FLOP is counted
    with pytest.raises(ValueError, match="experts per layer"):
        trainable_parameter_report(fewer, profile)
    with pytest.raises(ValueError, match="experts per layer"):
        adapter_flops_per_token(fewer, profile)


# ------------------------------------------------------------------------------------------------ accounting
def test_params4bit_counts_twice_its_packed_elements():
    class Params4bit(nn.Parameter):  # the name bitsandbytes' 4-bit weights carry (two values per stored byte)
        pass

    model = tiny_model("olmoe")
    before = trainable_parameter_report(model)
    n = model.lm_head.weight.numel()
    model.lm_head.weight = Params4bit(model.lm_head.weight.detach().clone(), requires_grad=True)
    after = trainable_parameter_report(model)
    assert after["total"] == before["total"] + n
    assert after["trainable"] == before["trainable"] + n
    assert after["by_component"]["attention"] == before["by_component"]["attention"] + n


def test_adapter_flops_on_per_expert_linear_layers():
    from hellora_trl import apply_hellora, default_lora_config, find_moe_layers

    cfg = LegacyMoEConfig(num_local_experts=6, num_experts_per_tok=2)
    model = LegacyMoEForCausalLM(cfg)
    profile = profile_experts(model, [random_batch(model, batch=4, seq=16)], progress=False)
    hot = {layer.name: [1, 4] for layer in find_moe_layers(model)}
    peft_model = apply_hellora(model, hot, default_lora_config(r=4, lora_alpha=8))
    flops = trainable_parameter_report(peft_model, profile)["adapter_flops_per_token"]
    H, I, K, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok, cfg.num_hidden_layers
    per_expert = 3 * 2 * 4 * (H + I)  # w1, w3, w2; 2 FLOPs per MAC; r=4
    assert flops["all_experts"] == pytest.approx(L * K * per_expert)
    hot_share = sum(profile.counts[i, [1, 4]].sum().item() for i in range(L))
    assert flops["hellora"] == pytest.approx(hot_share / profile.tokens_seen * per_expert)
    assert flops["ratio"] == pytest.approx(flops["hellora"] / flops["all_experts"])


def test_adapter_flops_without_expert_adapters_are_zero_and_tokens_seen_floor_is_one():
    model = tiny_model("olmoe")
    profile = profile_experts(model, [random_batch(model)], progress=False)
    assert adapter_flops_per_token(model, profile) == {"hellora": 0.0, "all_experts": 0.0, "ratio": 0.0}

    from hellora_trl import apply_hellora, default_lora_config

    peft_model = apply_hellora(model, select_hot_experts(profile, k=2), default_lora_config(r=4, lora_alpha=8))
    one = ExpertProfile(profile.counts, profile.layer_names, profile.num_experts, profile.experts_per_token, tokens_seen=1)
    zero = ExpertProfile(profile.counts, profile.layer_names, profile.num_experts, profile.experts_per_token)
    flops_one = adapter_flops_per_token(peft_model, one)
    assert flops_one == adapter_flops_per_token(peft_model, zero)
    per_token = adapter_flops_per_token(peft_model, profile)
    assert flops_one["all_experts"] == pytest.approx(per_token["all_experts"] * profile.tokens_seen)


# ------------------------------------------------------------------------------------------------ profiling
@pytest.mark.parametrize("fraction", [0, 0.0, -0.5, 1.0001, 1.5, 2, True, "0.5", None])
def test_warmup_fraction_must_be_in_zero_one(fraction):
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        warmup_indices(10, fraction, 0)


def test_warmup_indices_sizes_and_edges():
    assert warmup_indices(10, 1, 0) == list(range(10)) == warmup_indices(10, 1.0, 3)
    assert len(warmup_indices(10, 0.3, 0)) == 3 and len(warmup_indices(10, 0.01, 0)) == 1
    rows = warmup_indices(100, 0.25, 7)
    assert rows == sorted(rows) and len(set(rows)) == 25 and all(0 <= r < 100 for r in rows)
    assert rows == warmup_indices(100, 0.25, 7) and rows != warmup_indices(100, 0.25, 8)
    with pytest.raises(ValueError, match="empty"):
        warmup_indices(0, 0.5, 0)


def test_warmup_slice_returns_the_dataset_itself_at_fraction_one():
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": [[i] for i in range(8)]})
    assert warmup_slice(data, 1.0, 0) is data
    part = warmup_slice(data, 0.5, 1)
    assert part["input_ids"] == [[i] for i in warmup_indices(8, 0.5, 1)]
    for not_map_style in (iter([]), [{"input_ids": [1]}] * 4):  # no len, or no .select
        with pytest.raises(ValueError, match="map-style"):
            warmup_slice(not_map_style, 0.5, 0)


@pytest.mark.parametrize("training", [True, False])
def test_profiling_runs_in_eval_mode_and_restores_the_mode(training):
    model = tiny_model("olmoe")
    model.train(training)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    profile_experts(model, [random_batch(model)], progress=False)
    handle.remove()
    assert seen == [False] and model.training is training
    assert all(m.training is training for m in model.modules())


@pytest.mark.parametrize("family, shared", [("olmoe", False), ("qwen2_moe", True), ("deepseek_v2", True)])
def test_profile_records_shared_experts(family, shared):
    model = tiny_model(family)
    assert profile_experts(model, [random_batch(model)], progress=False).has_shared_experts is shared


def test_batch_size_one_profiles_like_larger_batches_and_zero_is_refused():
    from datasets import Dataset

    model = tiny_model("olmoe")
    data = Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [9, 10, 11], [12, 13]]})
    one = profile_experts(model, data, batch_size=1, progress=False)
    three = profile_experts(model, data, batch_size=3, progress=False)
    assert torch.equal(one.counts, three.counts) and one.tokens_seen == three.tokens_seen == 9
    assert one.source["batch_size"] == 1
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        profile_experts(model, data, batch_size=0, progress=False)


def test_positional_attention_mask_excludes_padding():
    model = tiny_model("olmoe")
    batch = random_batch(model, batch=2, seq=8)
    batch["attention_mask"][1, 4:] = 0
    with RoutingCounter(model) as by_keyword, torch.no_grad():
        model(**batch)
    with RoutingCounter(model) as by_position, torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"])
    assert by_position.tokens_seen == by_keyword.tokens_seen == 12
    assert torch.equal(by_position.counts, by_keyword.counts)
    assert by_position.row_batches == []


def test_row_counts_before_any_forward_and_without_per_row():
    model = tiny_model("olmoe")
    counter = RoutingCounter(model, per_row=True)
    L, E = len(counter.layers), counter.num_experts
    assert counter.row_counts().shape == (0, L, E)
    with pytest.raises(ValueError, match="per_row=True"):
        RoutingCounter(model).row_counts()


def test_filler_forwards_pad_the_batch_count_and_are_not_counted():
    model = tiny_model("olmoe")
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    batch = random_batch(model)
    plain = profile_experts(model, [batch], progress=False)
    assert len(calls) == 1
    padded = profile_experts(model, [batch], progress=False, pad_batches_to=3)
    handle.remove()
    assert calls[1:] == [batch["input_ids"].shape, (1, 1), (1, 1)]
    assert torch.equal(plain.counts, padded.counts) and plain.tokens_seen == padded.tokens_seen
    empty = profile_experts(model, [], progress=False, pad_batches_to=2)
    assert int(empty.counts.sum()) == 0


def test_max_batches_and_tokens_without_mask():
    model = tiny_model("olmoe")
    ids = random_batch(model, batch=2, seq=5)["input_ids"]
    profile = profile_experts(model, [{"input_ids": ids}] * 3, max_batches=2, progress=False)
    assert profile.tokens_seen == 2 * 10 and profile.source["max_batches"] == 2
    assert (profile.counts.sum(dim=1) == 20 * model.config.num_experts_per_tok).all()


def test_check_k_accepts_integer_types_only():
    import numpy as np

    assert check_k(np.int64(2), 4) == 2 and check_k(torch.tensor(4), 4) == 4 and check_k(1, 4) == 1
    for bad in (True, 2.0, "2", None, 0, 5):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, 4\]"):
            check_k(bad, 4)


def test_loading_a_missing_profile_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Expert profile not found: .*missing\.json"):
        ExpertProfile.load(tmp_path / "missing.json")


def test_pad_collate_right_pads_and_masks_padding_labels():
    from hellora_trl.profiling import IGNORE_INDEX, pad_collate

    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 0]}, {"input_ids": [8], "labels": [-100]}]
    batch = pad_collate(pad_token_id=2, labels=True)(rows)
    assert IGNORE_INDEX == -100
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, -100], [-100, -100, -100]]  # a row's own masked token too
    plain = pad_collate()(rows)
    assert set(plain) == {"input_ids", "attention_mask"} and plain["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]


def test_tokens_are_counted_from_inputs_embeds_without_a_mask():
    model = tiny_model("olmoe")
    embeds = model.get_input_embeddings()(random_batch(model, batch=2, seq=5)["input_ids"])
    with RoutingCounter(model) as counter, torch.no_grad():
        model(inputs_embeds=embeds)
    assert counter.tokens_seen == 10
    assert (counter.counts.sum(dim=1) == 10 * model.config.num_experts_per_tok).all()


def test_positional_mask_on_a_single_level_model_excludes_padding():
    model = LegacyMoEForCausalLM(LegacyMoEConfig())  # no decoder level below it that would see the mask again
    batch = random_batch(model, batch=2, seq=6)
    batch["attention_mask"][0, 2:] = 0
    with RoutingCounter(model) as counter, torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"])
    assert counter.tokens_seen == 8
    assert (counter.counts.sum(dim=1) == 8 * model.config.num_experts_per_tok).all()
    with RoutingCounter(model) as unmasked, torch.no_grad():
        model(batch["input_ids"])
    assert unmasked.tokens_seen == 12


def test_profile_rows_gives_each_rows_own_counts():
    from datasets import Dataset

    from hellora_trl.profiling import profile_rows

    model = tiny_model("olmoe")
    rows = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    profile, per_row = profile_rows(model, Dataset.from_dict({"input_ids": rows}), batch_size=2, progress=False)
    assert per_row.shape == (3, len(profile.layer_names), profile.num_experts) and per_row.dtype == torch.int32
    assert profile.tokens_seen == 9 and torch.equal(per_row.sum(0).long(), profile.counts)
    for i, ids in enumerate(rows):
        alone = profile_experts(model, [{"input_ids": torch.tensor([ids])}], progress=False)
        assert torch.equal(per_row[i].long(), alone.counts), i
    single = [[5], [9], [12]]  # one-token rows: each batch row is one position long
    _, per_row = profile_rows(model, Dataset.from_dict({"input_ids": single}), batch_size=3, progress=False)
    for i, ids in enumerate(single):
        alone = profile_experts(model, [{"input_ids": torch.tensor([ids])}], progress=False)
        assert torch.equal(per_row[i].long(), alone.counts), i
    for bad in (Dataset.from_dict({"text": ["a"]}), Dataset.from_dict({"input_ids": []}), [[5, 6]]):
        with pytest.raises(ValueError, match="non-empty tokenized dataset"):
            profile_rows(model, bad, progress=False)


def test_default_profiling_batch_size_is_eight():
    from datasets import Dataset

    from hellora_trl.profiling import profile_rows

    model = tiny_model("olmoe")
    data = Dataset.from_dict({"input_ids": [[5, 6, 7]] * 9})
    assert profile_experts(model, data, progress=False).source["batch_size"] == 8
    assert profile_rows(model, data, progress=False)[0].source["batch_size"] == 8
