import pytest
import torch

from hellora_trl import ExpertProfile, select_hot_experts
from hellora_trl.selection import default_k, validate_hot_map


def make_profile(counts, k=2, shared=False):
    counts = torch.tensor(counts)
    return ExpertProfile(
        counts=counts,
        layer_names=[f"model.layers.{i}.mlp.experts" for i in range(counts.shape[0])],
        num_experts=counts.shape[1],
        experts_per_token=k,
        has_shared_experts=shared,
    )


def test_layer_strategy_takes_per_layer_top_k():
    p = make_profile([[5, 9, 1, 7], [0, 0, 3, 2]])
    assert select_hot_experts(p, k=2) == {"model.layers.0.mlp.experts": [1, 3], "model.layers.1.mlp.experts": [2, 3]}


def test_ties_break_to_lower_index_deterministically():
    p = make_profile([[4, 4, 4, 4], [1, 2, 2, 2]])
    hot = select_hot_experts(p, k=2)
    assert hot == {"model.layers.0.mlp.experts": [0, 1], "model.layers.1.mlp.experts": [1, 2]}
    assert select_hot_experts(p, k=2) == hot


def test_default_k_is_experts_per_token_doubled_with_shared_experts():
    p = make_profile([[5, 9, 1, 7, 0, 0]], k=2)
    assert default_k(p) == 2 and len(select_hot_experts(p)["model.layers.0.mlp.experts"]) == 2
    p = make_profile([[5, 9, 1, 7, 0, 0]], k=2, shared=True)
    assert default_k(p) == 4 and select_hot_experts(p)["model.layers.0.mlp.experts"] == [0, 1, 2, 3]


def test_model_cold_random_strategies():
    p = make_profile([[9, 1, 1, 0], [0, 1, 9, 5]])
    assert select_hot_experts(p, k=2, strategy="model") == {
        "model.layers.0.mlp.experts": [0, 2],
        "model.layers.1.mlp.experts": [0, 2],
    }
    assert select_hot_experts(p, k=1, strategy="cold") == {
        "model.layers.0.mlp.experts": [3],
        "model.layers.1.mlp.experts": [0],
    }
    r1 = select_hot_experts(p, k=2, strategy="random", seed=3)
    assert r1 == select_hot_experts(p, k=2, strategy="random", seed=3)
    assert all(len(v) == 2 and len(set(v)) == 2 for v in r1.values())


def test_mass_strategy_is_adaptive_per_layer():
    p = make_profile([[50, 30, 10, 10], [25, 25, 25, 25]])
    hot = select_hot_experts(p, strategy="mass", mass=0.75)
    assert hot["model.layers.0.mlp.experts"] == [0, 1]  # 80% >= 75%
    assert hot["model.layers.1.mlp.experts"] == [0, 1, 2]  # needs three quarters
    clipped = select_hot_experts(p, strategy="mass", mass=0.75, min_k=1, max_k=2)
    assert len(clipped["model.layers.1.mlp.experts"]) == 2


@pytest.mark.parametrize("k", [0, 5, -1])
def test_bad_k_is_rejected_early(k):
    with pytest.raises(ValueError, match="k must be"):
        select_hot_experts(make_profile([[1, 2, 3, 4]]), k=k)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        select_hot_experts(make_profile([[1, 2, 3, 4]]), strategy="hottest")


def test_validate_hot_map_errors():
    names = ["a.experts", "b.experts"]
    with pytest.raises(ValueError, match="missing"):
        validate_hot_map({"a.experts": [0]}, names, 4)
    for bad in ([0, 9], [0, 4], [-1, 0], [2, 2]):
        with pytest.raises(ValueError, match=r"Layer 'a\.experts': hot experts .* distinct ids in \[0, 4\)"):
            validate_hot_map({"a.experts": bad, "b.experts": [1]}, names, 4)
    with pytest.raises(ValueError, match=r"Layer 'a\.experts' has no hot experts"):
        validate_hot_map({"a.experts": [], "b.experts": [1]}, names, 4)


# ------------------------------------------------------------------------------------------------ the pipeline
def test_strategy_table_and_constants_agree():
    from hellora_trl.constants import STRATEGIES
    from hellora_trl.selection import SELECTORS

    assert tuple(SELECTORS) == STRATEGIES


def test_plan_uses_a_stored_map_unless_reselect_and_records_one_shape():
    from hellora_trl.selection import SelectionSettings, plan_hot_experts

    p = make_profile([[5, 9, 1, 7], [0, 0, 3, 2]])
    stored = {"model.layers.0.mlp.experts": [2, 3], "model.layers.1.mlp.experts": [0, 1]}
    hot, record = plan_hot_experts(p, SelectionSettings(k=2), stored)
    assert hot == stored and record["stored_map"] is True and record["per_layer_k"] == {n: 2 for n in stored}
    hot, record = plan_hot_experts(p, SelectionSettings(k=2, reselect=True), stored)
    assert hot == select_hot_experts(p, k=2) and record["stored_map"] is False
    assert set(record) == {"k", "strategy", "seed", "mass", "min_k", "max_k", "components", "variant",
                           "per_layer_k", "stored_map"}
    hot, record = plan_hot_experts(p, SelectionSettings(strategy="mass", mass=0.6, min_k=1, max_k=3))
    assert record["mass"] == 0.6 and hot == select_hot_experts(p, strategy="mass", mass=0.6, max_k=3)
    with pytest.raises(ValueError, match="does not match"):
        plan_hot_experts(p, SelectionSettings(), {"model.layers.0.mlp.experts": [0]})


def test_settings_read_hellora_fields_and_fall_back_to_seed():
    from types import SimpleNamespace

    from hellora_trl.selection import SelectionSettings

    args = SimpleNamespace(hellora_k=3, hellora_selection="cold", hellora_seed=None, seed=7, hellora_min_k=2,
                           hellora_max_k=None, hellora_reselect=True)
    s = SelectionSettings.from_args(args)
    assert (s.k, s.strategy, s.seed, s.min_k, s.max_k, s.reselect) == (3, "cold", 7, 2, None, True)
    assert SelectionSettings.from_args(SimpleNamespace(hellora_seed=5, seed=7)).seed == 5
    assert SelectionSettings.from_args(args, seed=11).seed == 11


def test_save_and_load_plan_round_trip(tmp_path):
    from hellora_trl.selection import SelectionSettings, load_plan, plan_hot_experts, save_plan

    p = make_profile([[5, 9, 1, 7], [0, 0, 3, 2]])
    hot, record = plan_hot_experts(p, SelectionSettings(k=1))
    paths = save_plan(p, hot, record, tmp_path / "a.json", tmp_path / "sub" / "b.json")
    for path in paths:
        loaded, stored, rec = load_plan(path)
        assert loaded.counts.equal(p.counts) and stored == hot and rec == record
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_plan(tmp_path)
    p.save(tmp_path / "bare.json")
    assert load_plan(tmp_path / "bare.json")[1:] == (None, {})


def test_profile_top_k_matches_layer_selection_and_check_k():
    from hellora_trl.profile import check_k, rank_experts

    p = make_profile([[5, 9, 1, 7], [0, 0, 3, 2]])
    assert p.top_k(2) == select_hot_experts(p, k=2, strategy="layer")
    assert rank_experts(torch.tensor([1, 3, 3, 0])).tolist() == [1, 2, 0, 3]
    assert rank_experts(torch.tensor([1, 3, 3, 0]), descending=False).tolist() == [3, 0, 1, 2]
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer"):
            check_k(bad, 4)


# ----------------------------------------------------------------------------------- clear errors (#13, review W7)
def _profile(counts, tokens=10):
    from hellora_trl import ExpertProfile

    counts = torch.as_tensor(counts)
    return ExpertProfile(counts, [f"l{i}.experts" for i in range(len(counts))], counts.shape[1], 2, tokens_seen=tokens)


def test_k_of_any_integer_type_is_accepted_and_bools_floats_strings_are_not():
    """Review 2.21/2.26: k=True meant k=1; np.int64(2) was 'not an integer'."""
    import numpy as np

    from hellora_trl import select_hot_experts

    profile = _profile([[5, 3, 1, 0], [0, 1, 7, 2]])
    expected = select_hot_experts(profile, k=2)
    assert select_hot_experts(profile, k=np.int64(2)) == expected == select_hot_experts(profile, k=torch.tensor(2))
    for bad in (True, 2.0, 2.5, "2", float("inf")):
        with pytest.raises(ValueError, match="k must be an integer"):
            select_hot_experts(profile, k=bad)


def test_an_all_zero_profile_is_refused_for_count_based_selection():
    """Review 3.15/3.28/W5: an all-zero profile (Llama4) selected experts 0..k-1 everywhere, silently."""
    from hellora_trl import select_hot_experts

    zero = _profile([[0, 0, 0, 0], [0, 0, 0, 0]], tokens=956)
    for strategy in ("layer", "model", "cold", "mass"):
        with pytest.raises(ValueError, match="no routing counts"):
            select_hot_experts(zero, k=None if strategy == "mass" else 2, strategy=strategy)
    assert all(len(v) == 2 for v in select_hot_experts(zero, k=2, strategy="random").values())


def test_mass_selection_says_that_k_is_ignored(caplog):
    """Review 2.11: `--strategy mass --k 3` ignored k without a word."""
    from hellora_trl import select_hot_experts

    select_hot_experts(_profile([[5, 3, 1, 0], [0, 1, 7, 2]]), k=3, strategy="mass")
    assert "k=3 is ignored" in caplog.text


@pytest.mark.parametrize("ids", [[1.7, 2], ["a", 1], [True, 2]])
def test_hot_ids_must_be_whole_numbers(ids):
    """Review 3.26/3.27: ids [1.7, 2] trained experts [1, 2] while the record kept 1.7; "a" gave a bare
    'invalid literal for int()'."""
    from hellora_trl.selection import validate_hot_map

    with pytest.raises(ValueError, match=r"Layer 'l0\.experts'.*as whole numbers"):
        validate_hot_map({"l0.experts": ids}, ["l0.experts"], 4)


# ------------------------------------------------------------------------------------- usage-weighted random draw
def _inclusion(counts, k, draws=2000):
    """How often each expert of a one-layer profile is drawn by 'random_weighted' over seeds 0..draws-1."""
    p = make_profile([counts])
    hits = [0] * len(counts)
    for seed in range(draws):
        (ids,) = select_hot_experts(p, k=k, strategy="random_weighted", seed=seed).values()
        assert len(ids) == k and len(set(ids)) == k and ids == sorted(ids)
        for e in ids:
            hits[e] += 1
    return [h / draws for h in hits]


def test_random_weighted_draws_in_proportion_to_counts():
    # k=1: inclusion = count share; a uniform draw (the 'random' strategy) would give 0.25 each
    share = _inclusion([60, 30, 10, 0], k=1)
    assert share[3] == 0.0
    for got, want in zip(share, (0.6, 0.3, 0.1)):
        assert abs(got - want) < 0.04, share
    # k=2 without replacement: P(i in set) = p_i + sum_{j != i} p_j * p_i / (1 - p_j)
    p = [0.6, 0.3, 0.1, 0.0]
    want = [pi + sum(pj * pi / (1 - pj) for j, pj in enumerate(p) if j != i) for i, pi in enumerate(p)]
    share = _inclusion([60, 30, 10, 0], k=2)
    assert share[3] == 0.0 and sum(share) == pytest.approx(2.0)
    for got, w in zip(share, want):
        assert abs(got - w) < 0.04, (share, want)


def test_random_weighted_is_seeded_and_differs_from_the_ranking_and_from_uniform():
    p = make_profile([[50, 40, 30, 20, 10, 5, 3, 1], [1, 3, 5, 10, 20, 30, 40, 50]])
    a = select_hot_experts(p, k=3, strategy="random_weighted", seed=7)
    assert a == select_hot_experts(p, k=3, strategy="random_weighted", seed=7)
    draws = [select_hot_experts(p, k=3, strategy="random_weighted", seed=s) for s in range(40)]
    assert len({tuple(map(tuple, d.values())) for d in draws}) > 5  # not the hot set every time
    hot = select_hot_experts(p, k=3)
    assert any(d != hot for d in draws)
    # the heavy experts are drawn far more often than the light ones (uniform would draw each 3/8 of the time)
    first = [e for d in draws for e in d["model.layers.0.mlp.experts"]]
    assert first.count(0) > 3 * first.count(7)


def test_random_weighted_refuses_k_above_the_used_experts():
    p = make_profile([[5, 0, 3, 0], [1, 1, 1, 1]])
    assert len(select_hot_experts(p, k=2, strategy="random_weighted")["model.layers.0.mlp.experts"]) == 2
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.mlp\.experts' routed tokens to only 2 of 4"):
        select_hot_experts(p, k=3, strategy="random_weighted")
    with pytest.raises(ValueError, match="no routing counts"):
        select_hot_experts(make_profile([[0, 0, 0, 0]]), k=1, strategy="random_weighted")
