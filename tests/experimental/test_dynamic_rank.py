"""Dynamic rank (DR-LoRA-style growth of hot-expert ranks) on tiny random models."""

import copy
import json

import pytest
import torch

from hellora_trl import ExpertProfile, apply_hellora, default_lora_config, find_moe_layers, load_hellora
from hellora_trl import trainable_parameter_report
from hellora_trl.experimental.dynamic_rank import (
    RANKS_FILE,
    DynamicRankCallback,
    active_ranks,
    allocate,
    dynamic_rank_state,
    grow_ranks,
    growth_events,
    growth_quotas,
    init_rank_masks,
    restore_dynamic_rank,
    saliency,
    set_active_ranks,
)

from testing_utils import random_batch, tiny_model, train_steps

HOT = [0, 1, 2, 3]
R = 4


def adapted(seed=0, r=R, alpha=8, dtype=torch.float32, random_b=False, components="experts"):
    model = tiny_model("olmoe", seed=seed, dtype=dtype)
    if dtype == torch.float64:  # torch's grouped GEMM has no float64 kernel: the eager experts loop instead
        model.config._experts_implementation = "eager"
    hot = {layer.name: list(HOT) for layer in find_moe_layers(model)}
    config = default_lora_config(r=r, lora_alpha=alpha, init_lora_weights=not random_b)
    return apply_hellora(model, hot, config, components=components)


def expert_layers(model):
    return {layer.name: layer.experts for layer in find_moe_layers(model.get_base_model())}


def factors(layer, letter):
    return {p: getattr(layer, f"lora_{p}_{letter}")["default"] for p in layer.factor_names}


def profile_for(model, counts_per_layer):
    names = list(expert_layers(model))
    experts = find_moe_layers(model.get_base_model())[0].num_experts
    counts = torch.zeros(len(names), experts, dtype=torch.long)
    for i in range(len(names)):
        counts[i, : len(counts_per_layer)] = torch.tensor(counts_per_layer)
    return ExpertProfile(counts=counts, layer_names=names, num_experts=experts, experts_per_token=2, tokens_seen=100)


# ------------------------------------------------------------------------------------------------ masking
def test_inactive_components_stay_exactly_zero_through_adamw():
    model = adapted()
    init_rank_masks(model, r_init=1, r_budget=2)
    ranks = [1, 2, 3, 1]
    set_active_ranks(model, {name: ranks for name in expert_layers(model)})
    batch = random_batch(model)
    a_before = {n: {p: t.detach().clone() for p, t in factors(l, "A").items()} for n, l in expert_layers(model).items()}
    train_steps(model, batch, weight_decay=0.0, steps=3)
    for name, layer in expert_layers(model).items():
        for proj, b in factors(layer, "B").items():
            for j, active in enumerate(ranks):
                assert bool(b[j, :, :active].abs().sum() > 0)
                assert not bool(b[j, :, active:].any()), f"{name} {proj} slot {j}"
        for proj, a in factors(layer, "A").items():
            for j, active in enumerate(ranks):  # inactive A rows keep their init until switched on
                assert torch.equal(a[j, active:], a_before[name][proj][j, active:])
                assert not torch.equal(a[j, :active], a_before[name][proj][j, :active])
    # Why: with B's column at 0 the gradient of the matching A row is exactly 0 (no hook on A needed).
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for layer in expert_layers(model).values():
        for a in factors(layer, "A").values():
            for j, active in enumerate(ranks):
                assert bool(a.grad[j, :active].abs().sum() > 0)
                assert not bool(a.grad[j, active:].any())


def test_without_rank_masks_adamw_moves_every_component():
    """The control for the test above: the same training without masks changes the would-be inactive columns."""
    model = adapted()
    train_steps(model, random_batch(model), steps=3)
    for layer in expert_layers(model).values():
        assert bool(layer.lora_down_B["default"][:, :, 1:].any())


def test_output_with_r_init_active_equals_a_dense_rank_r_init_adapter():
    model = adapted(dtype=torch.float64, random_b=True, alpha=8)  # scaling 8/4 = 2
    init_rank_masks(model, r_init=2)
    reference = adapted(dtype=torch.float64, r=2, alpha=4)  # scaling 4/2 = 2, a real rank-2 adapter
    with torch.no_grad():
        for name, layer in expert_layers(model).items():
            ref = expert_layers(reference)[name]
            for proj in layer.factor_names:
                getattr(ref, f"lora_{proj}_A")["default"].copy_(getattr(layer, f"lora_{proj}_A")["default"][:, :2])
                getattr(ref, f"lora_{proj}_B")["default"].copy_(getattr(layer, f"lora_{proj}_B")["default"][:, :, :2])
    batch = random_batch(model)
    with torch.no_grad():
        ours, theirs = model(**batch).logits, reference(**batch).logits
        base = model.get_base_model()
        with model.disable_adapter():
            plain = base(**batch).logits
    assert not torch.allclose(ours, plain)  # the active components do change the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_inactive_A_rows_do_not_reach_the_output():
    model = adapted(dtype=torch.float64, random_b=True)
    init_rank_masks(model, r_init=1, r_budget=3)
    set_active_ranks(model, {name: [1, 3, 2, 4] for name in expert_layers(model)})
    batch = random_batch(model)
    with torch.no_grad():
        before = model(**batch).logits
        for layer in expert_layers(model).values():
            for a in factors(layer, "A").values():
                for j, active in enumerate([1, 3, 2, 4]):
                    a[j, active:].normal_()
        after = model(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ accounting
def test_accounting_counts_only_active_entries():
    model = adapted()
    full = trainable_parameter_report(model)["trainable"]
    init_rank_masks(model, r_init=1, r_budget=3)
    layers = expert_layers(model)
    per_rank = sum(a.shape[2] + b.shape[1] for a, b in zip(factors(next(iter(layers.values())), "A").values(),
                                                             factors(next(iter(layers.values())), "B").values()))
    inactive = len(layers) * len(HOT) * (R - 1)
    assert trainable_parameter_report(model)["trainable"] == full - inactive * per_rank
    set_active_ranks(model, {name: [1, 2, 4, 1] for name in layers})
    inactive = len(layers) * (3 + 2 + 0 + 3)
    report = trainable_parameter_report(model)
    assert report["trainable"] == full - inactive * per_rank
    assert report["by_component"]["experts"] == report["trainable"]  # components="experts": nothing else trains


# ------------------------------------------------------------------------------------------------ saliency / growth
def test_allocate_hands_out_quota_by_saliency_within_rank():
    active = torch.tensor([1, 1, 1, 1])
    scores = torch.tensor([0.1, 0.9, 0.0, 0.5])
    assert allocate(scores, active, r=4, quota=2, grow_step=1).tolist() == [1, 2, 1, 2]
    assert allocate(scores, active, r=4, quota=3, grow_step=2).tolist() == [1, 3, 1, 2]
    # quota left after a pass goes round again; an expert at r is skipped; score 0 never grows
    assert allocate(scores, active, r=3, quota=10, grow_step=1).tolist() == [3, 3, 1, 3]
    assert allocate(scores, torch.tensor([1, 4, 1, 1]), r=4, quota=1).tolist() == [1, 4, 1, 2]
    with pytest.raises(ValueError):
        allocate(scores, active, r=4, quota=1, grow_step=0)


def test_growth_respects_the_budget_and_picks_the_highest_saliency_experts():
    model = adapted()
    init_rank_masks(model, r_init=1, r_budget=2)  # budget per layer: 4 hot x 2 = 8, 4 in use
    names = list(expert_layers(model))
    scores = {name: torch.tensor([0.2, 0.05, 0.9, 0.4], dtype=torch.float64) for name in names}
    grow_ranks(model, scores, quotas=1)
    assert active_ranks(model) == {name: [1, 1, 2, 1] for name in names}
    grow_ranks(model, scores, quotas=100, grow_step=2)  # capped by the budget: 3 more components
    ranks = active_ranks(model)
    assert ranks == {name: [1, 1, 4, 2] for name in names}  # slot 2 to r=4, slot 3 gets the last one
    grow_ranks(model, scores, quotas=100)
    assert active_ranks(model) == ranks  # budget used up
    assert all(sum(v) == 8 for v in ranks.values())


def test_saliency_is_routing_share_times_the_pre_mask_gradient_of_inactive_columns():
    masked, reference = adapted(seed=0), adapted(seed=0)
    init_rank_masks(masked, r_init=2, r_budget=3)
    with torch.no_grad():  # the same numbers without masks: zero the columns the masks zero
        for layer in expert_layers(reference).values():
            for b in factors(layer, "B").values():
                b[:, :, 2:] = 0
    batch = random_batch(masked)
    for model in (masked, reference):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    counts = [50, 30, 20, 0]  # the fourth hot expert never routed in the profile: saliency 0
    scores = saliency(masked, profile_for(masked, counts))
    for name, layer in expert_layers(reference).items():
        potential = sum(b.grad[:, :, 2:].abs().mean(dim=(1, 2)).double() for b in factors(layer, "B").values())
        expected = torch.tensor(counts, dtype=torch.float64) / 100 * potential
        assert bool((potential > 0).all())
        torch.testing.assert_close(scores[name], expected, rtol=1e-5, atol=0)
    grow_ranks(masked, scores, quotas=2)
    assert all(r == [3, 3, 2, 2] for r in active_ranks(masked).values())


def test_schedule_spreads_the_budget_over_the_growth_events():
    assert growth_events(interval=5, max_steps=60, grow_until=0.5) == [5, 10, 15, 20, 25, 30]
    assert growth_events(interval=7, max_steps=10, grow_until=0.5) == []
    model = adapted()
    init_rank_masks(model, r_init=1, r_budget=3)  # 8 components to add per layer
    assert set(growth_quotas(model, events_left=3).values()) == {3}
    assert set(growth_quotas(model, events_left=100).values()) == {1}


# ------------------------------------------------------------------------------------------------ save / load
def test_save_and_load_keep_active_ranks(tmp_path):
    model = adapted()
    init_rank_masks(model, r_init=1, r_budget=2)
    ranks = {name: [1, 2, 3, 2] for name in expert_layers(model)}
    set_active_ranks(model, ranks)
    train_steps(model, random_batch(model), steps=3)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / RANKS_FILE).read_text())
    assert {name: entry["active_ranks"] for name, entry in record["layers"].items()} == ranks
    trained = trainable_parameter_report(model)["trainable"]

    loaded = load_hellora(tiny_model("olmoe"), tmp_path, is_trainable=True)
    restore_dynamic_rank(loaded, tmp_path)
    assert active_ranks(loaded) == ranks
    assert trainable_parameter_report(loaded)["trainable"] == trained
    assert dynamic_rank_state(loaded).layers[next(iter(ranks))].budget == 8
    train_steps(loaded, random_batch(loaded, seed=1), steps=3)
    for layer in expert_layers(loaded).values():
        assert not bool(layer.lora_up_B["default"][0, :, 1:].any())


def test_restore_refuses_weights_outside_their_ranks(tmp_path):
    model = adapted()
    init_rank_masks(model, r_init=1, r_budget=2)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / RANKS_FILE).read_text())
    for entry in record["layers"].values():
        entry["active_ranks"] = [1, 1, 1, 1]
    trained = adapted(random_b=True)  # same layout, B nonzero everywhere
    trained.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / RANKS_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="inactive rank"):  # load_hellora restores the ranks, so it refuses
        load_hellora(tiny_model("olmoe"), tmp_path / "dense", is_trainable=True)


def test_fixed_rank_save_removes_a_stale_ranks_file(tmp_path):
    model = adapted()
    init_rank_masks(model, r_init=2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / RANKS_FILE).is_file()
    adapted().save_pretrained(tmp_path)  # a plain adapter has no rank saver: file untouched by PEFT
    from hellora_trl.experimental.dynamic_rank import save_dynamic_rank

    save_dynamic_rank(adapted(), tmp_path)
    assert not (tmp_path / RANKS_FILE).exists()
    assert restore_dynamic_rank(adapted(), tmp_path) is None


def test_deepcopy_keeps_ranks_enforced():
    model = adapted()
    init_rank_masks(model, r_init=1, r_budget=2)
    clone = copy.deepcopy(model)
    train_steps(clone, random_batch(clone), steps=3)
    for layer in expert_layers(clone).values():
        assert not bool(layer.lora_down_B["default"][:, :, 1:].any())
    grow_ranks(clone, {n: torch.ones(4) for n in expert_layers(clone)}, quotas=4)
    assert all(r == [2, 2, 2, 2] for r in active_ranks(clone).values())
    assert all(r == [1, 1, 1, 1] for r in active_ranks(model).values())


# ------------------------------------------------------------------------------------------------ trainer
def test_callback_grows_ranks_during_training_within_the_budget(tmp_path):
    from hellora_trl.config import HELLoRAConfig
    from hellora_trl.recipes.data import synthetic_gsm8k
    from hellora_trl.recipes.offline import build_tokenizer
    from hellora_trl.trainer import HELLoRATrainer

    args = HELLoRAConfig(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_length=96, seed=0, disable_tqdm=True,
        hellora_k=4, hellora_profile_mode="forward", hellora_warmup_fraction=0.25, hellora_plots=False,
    )
    trainer = HELLoRATrainer(
        model=tiny_model("olmoe"), args=args, train_dataset=synthetic_gsm8k(24, seed=0),
        processing_class=build_tokenizer(), peft_config=default_lora_config(r=R, lora_alpha=8),
    )
    callback = DynamicRankCallback(r_init=1, r_budget=2, interval=2, grow_until=1.0, profile=lambda: trainer.hellora_profile)
    trainer.add_callback(callback)
    trainer.train()
    assert [e["step"] for e in callback.events] == [2, 4, 6]
    ranks = active_ranks(trainer.model)
    assert all(sum(v) == 4 * 2 and max(v) <= R for v in ranks.values())
    assert any(v != [2, 2, 2, 2] for v in ranks.values())  # growth followed saliency, not a uniform schedule
    for name, layer in expert_layers(trainer.model).items():
        for b in factors(layer, "B").values():
            for j, active in enumerate(ranks[name]):
                assert not bool(b[j, :, active:].any())
    trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / RANKS_FILE).read_text())["layers"][name]["active_ranks"] == ranks[name]


def test_warm_second_moment_starts_new_components_at_the_experts_mean():
    model = adapted()
    init_rank_masks(model, r_init=2, r_budget=3)
    optimizer = train_steps(model, random_batch(model), steps=2)
    name, layer = next(iter(expert_layers(model).items()))
    b = layer.lora_down_B["default"]
    v = optimizer.state[b]["exp_avg_sq"]
    assert not bool(v[:, :, 2:].any())  # never-active columns: no second moment yet
    expected = v[1, :, :2].mean().item()
    grow_ranks(model, {n: torch.tensor([0.0, 1.0, 0.0, 0.0]) for n in expert_layers(model)}, quotas=1, optimizer=optimizer)
    assert active_ranks(model)[name] == [2, 3, 2, 2]
    assert torch.allclose(v[1, :, 2], torch.full_like(v[1, :, 2], expected))
    assert not bool(v[[0, 2, 3], :, 2:].any()) and not bool(v[1, :, 3].any())
    a_v = optimizer.state[layer.lora_down_A["default"]]["exp_avg_sq"]
    assert torch.allclose(a_v[1, 2], torch.full_like(a_v[1, 2], a_v[1, :2].mean().item()))


def test_callback_with_live_routing_counts_while_training():
    from types import SimpleNamespace

    model = adapted()
    callback = DynamicRankCallback(r_init=1, r_budget=2, interval=2, grow_until=1.0, routing="live")
    callback.on_train_begin(None, None, None, model=model)
    optimizer = train_steps(model, random_batch(model), steps=2)
    assert callback._routing().tokens_seen == 2 * 2 * 12  # two steps of a 2 x 12 batch
    callback.on_step_end(None, SimpleNamespace(global_step=1, max_steps=4), None, model=model, optimizer=optimizer)
    assert callback.events == []  # not a growth step
    callback.on_step_end(None, SimpleNamespace(global_step=2, max_steps=4), None, model=model, optimizer=optimizer)
    assert [e["added"] for e in callback.events] == [2 * 2]  # 4 missing per layer over 2 events: 2 each, 2 layers
    assert all(sum(r) == 6 for r in active_ranks(model).values())
    callback.on_train_end(None, None, None)
    assert callback._counter is None
    with pytest.raises(ValueError):
        DynamicRankCallback(r_init=3, r_budget=2)


# ------------------------------------------------------------------------------------------------ the opt-in trainer
def dr_trainer(tmp_path, config_class=None, **overrides):
    from hellora_trl.recipes.data import synthetic_gsm8k
    from hellora_trl.experimental.dynamic_rank_trainer import DynamicRankConfig, DynamicRankTrainer
    from hellora_trl.recipes.offline import build_tokenizer

    kwargs = dict(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_length=96, seed=0, disable_tqdm=True,
        hellora_k=2, hellora_profile_mode="forward", hellora_warmup_fraction=0.25, hellora_plots=False,
    )
    kwargs.update(overrides)
    args = (config_class or DynamicRankConfig)(**kwargs)
    return DynamicRankTrainer(
        model=tiny_model("olmoe"), args=args, train_dataset=synthetic_gsm8k(40, seed=0),
        processing_class=build_tokenizer(), peft_config=default_lora_config(r=R, lora_alpha=8),
    )


def test_dynamic_rank_trainer_grows_within_budget_and_survives_save_load(tmp_path):
    from hellora_trl import load_hellora

    trainer = dr_trainer(tmp_path, hellora_dr_r_init=1, hellora_dr_r_budget=2, hellora_dr_interval=1,
                         hellora_dr_grow_until=1.0)
    trainer.train()
    ranks = active_ranks(trainer.model)
    assert ranks and all(sum(r) == 2 * 2 for r in ranks.values())  # k=2 experts x budget 2, all used
    assert any(max(r) > 1 for r in ranks.values())  # something grew from r_init=1
    assert trainer.run_fingerprint()["hellora"]["hellora_dr_r_budget"] == 2  # growth settings identify the run
    trainer.save_model()
    loaded = load_hellora(tiny_model("olmoe"), tmp_path / "run")
    assert active_ranks(loaded) == ranks


def test_dynamic_rank_trainer_resumes_with_the_checkpoints_ranks(tmp_path):
    first = dr_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, hellora_dr_r_init=1,
                       hellora_dr_r_budget=2, hellora_dr_interval=1, hellora_dr_grow_until=1.0)
    first.train()
    saved = active_ranks(first.model)
    resumed = dr_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, hellora_dr_r_init=1,
                         hellora_dr_r_budget=2, hellora_dr_interval=1, hellora_dr_grow_until=1.0)
    resumed.train(resume_from_checkpoint=True)  # nothing left to train: the restored ranks are kept as they were
    assert active_ranks(resumed.model) == saved and any(max(r) > 1 for r in saved.values())


def test_dynamic_rank_trainer_converts_a_hellora_config_and_checks_its_settings(tmp_path):
    from hellora_trl.config import HELLoRAConfig
    from hellora_trl.experimental.dynamic_rank_trainer import DynamicRankConfig

    trainer = dr_trainer(tmp_path, config_class=HELLoRAConfig, learning_rate=3e-3)
    assert isinstance(trainer.args, DynamicRankConfig) and trainer.args.learning_rate == 3e-3
    assert (trainer.dynamic_rank.r_init, trainer.dynamic_rank.r_budget) == (1, 2)  # max(1, r // 4), max(r_init, r // 2)
    with pytest.raises(ValueError, match="lori_s"):
        DynamicRankConfig(output_dir=str(tmp_path), use_cpu=True, hellora_variant="lori_s")
    with pytest.raises(ValueError, match="hellora_dr_routing"):
        DynamicRankConfig(output_dir=str(tmp_path), use_cpu=True, hellora_dr_routing="sometimes")
    with pytest.raises(ValueError, match=r"r_init <= hellora_dr_r_budget <= r=4"):
        dr_trainer(tmp_path, hellora_dr_r_init=2, hellora_dr_r_budget=8)

