"""LoRI-D / LoRI-S (HELLoRI) variants and the all-experts baselines, on tiny random models."""

import copy
import json

import pytest
import torch

from hellora_trl import apply_hellora, default_lora_config, find_moe_layers, load_hellora, trainable_parameter_report
from hellora_trl.baselines import all_experts_hot, apply_peft_all_experts, apply_peft_dora
from hellora_trl.constants import MASKS_FILE, VARIANT_FILE
from hellora_trl.variants import (
    apply_masks,
    copy_lora_A,
    enforce_masks,
    freeze_lora_A,
    kept_count,
    load_masks,
    lora_factors,
    lori_s_from_lori_d,
    lori_s_masks,
    save_masks,
    variant_of,
)

from testing_utils import random_batch, tiny_model, train_steps
from modulelist_model import LegacyMoEConfig, LegacyMoEForCausalLM

HOT = (0, 1, 2, 3)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box oversubscribed OpenMP makes each step
    ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**overrides):
    return default_lora_config(r=4, lora_alpha=8, **overrides)


def hot_map(model, hot=HOT):
    return {layer.name: list(hot) for layer in find_moe_layers(model)}


def fake_train_B(model, seed=0, std=0.1):
    """Stand in for a finished LoRI-D run: random B, A untouched."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora_factors(model, "B").values():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def lori_d_model(family="olmoe", seed=0):
    model = tiny_model(family)
    peft_model = apply_hellora(model, hot_map(model), config(), variant="lori_d")
    fake_train_B(peft_model, seed)
    return peft_model


def snapshot(factors):
    return {k: p.detach().clone() for k, p in factors.items()}


def masked_values(model, masks):
    """Every B entry outside its mask, concatenated (must stay exactly zero under LoRI-S)."""
    factors = lora_factors(model, "B")
    return torch.cat([factors[k].detach().masked_select(~m) for k, m in masks.items()])


# ----------------------------------------------------------------------------------------------- LoRI-D
def test_lori_d_freezes_every_A_and_trains_B():
    model = tiny_model("olmoe")
    peft_model = apply_hellora(model, hot_map(model), config(), variant="lori_d")
    a, b = lora_factors(peft_model, "A"), lora_factors(peft_model, "B")
    assert any(".experts.lora_" in k for k in a) and any(".gate.lora_" in k for k in a)  # experts and router
    assert a and not any(p.requires_grad for p in a.values())
    assert b and all(p.requires_grad for p in b.values())
    before = snapshot(a)
    optimizer = train_steps(peft_model, random_batch(peft_model), steps=3)
    assert all(p.grad is None for p in a.values())
    assert not any(id(p) in {id(q) for q in optimizer.state} for p in a.values())  # no optimizer state
    assert all(torch.equal(before[k], p) for k, p in a.items())
    assert any(bool(p.detach().any()) for p in b.values())
    assert variant_of(peft_model) == "lori_d"


def test_lori_d_variant_survives_save_and_load(tmp_path):
    peft_model = lori_d_model()
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / VARIANT_FILE).read_text())["variant"] == "lori_d"
    assert not (tmp_path / MASKS_FILE).exists()
    loaded = load_hellora(tiny_model("olmoe"), tmp_path, is_trainable=True)
    assert variant_of(loaded) == "lori_d"
    assert not any(p.requires_grad for p in lora_factors(loaded, "A").values())
    assert all(p.requires_grad for p in lora_factors(loaded, "B").values())


def test_plain_lora_writes_no_variant_file(tmp_path):
    model = tiny_model("olmoe")
    peft_model = apply_hellora(model, hot_map(model), config())
    assert all(p.requires_grad for p in lora_factors(peft_model, "A").values())
    peft_model.save_pretrained(tmp_path)
    assert not (tmp_path / VARIANT_FILE).exists()
    assert variant_of(load_hellora(tiny_model("olmoe"), tmp_path)) == "lora"


# ----------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("scope", ["global", "layer", "module"])
def test_masks_keep_the_largest_entries_per_scope(scope):
    peft_model = lori_d_model()
    factors = lora_factors(peft_model, "B")
    masks = lori_s_masks(peft_model, density=0.1, scope=scope)
    assert set(masks) == set(factors) and all(m.dtype == torch.bool for m in masks.values())
    groups = {
        "global": lambda k: "",
        "layer": lambda k: k.split(".")[2],  # model.layers.<i>....
        "module": lambda k: k.rsplit(".lora_", 1)[0],
    }[scope]
    for group in {groups(k) for k in masks}:
        keys = [k for k in masks if groups(k) == group]
        values = torch.cat([factors[k].detach().abs().reshape(-1) for k in keys])
        keep = torch.cat([masks[k].reshape(-1) for k in keys])
        assert int(keep.sum()) == kept_count(values.numel(), 0.1)
        assert values[keep].min() >= values[~keep].max()
    if scope == "layer":
        assert len({groups(k) for k in masks}) == 2


def test_global_threshold_differs_from_per_module():
    peft_model = lori_d_model()
    with torch.no_grad():  # one module with much larger B: a global threshold favours it, per-module does not
        lora_factors(peft_model, "B")["model.layers.0.self_attn.q_proj.lora_B.weight"].mul_(100)
    key = "model.layers.0.self_attn.q_proj.lora_B.weight"
    global_masks = lori_s_masks(peft_model, 0.1, "global")
    module_masks = lori_s_masks(peft_model, 0.1, "module")
    assert global_masks[key].float().mean() > 0.5
    assert module_masks[key].float().mean() == pytest.approx(0.1, abs=0.01)


def test_masks_from_directory_match_masks_from_model(tmp_path):
    peft_model = lori_d_model()
    peft_model.save_pretrained(tmp_path)
    from_dir = lori_s_from_lori_d(tmp_path, density=0.2, scope="layer")
    from_model = lori_s_masks(peft_model, density=0.2, scope="layer")
    assert from_dir.keys() == from_model.keys()
    assert all(torch.equal(from_dir[k], from_model[k]) for k in from_dir)
    save_masks(from_dir, tmp_path / "m.safetensors")
    assert all(torch.equal(v, from_dir[k]) for k, v in load_masks(tmp_path / "m.safetensors").items())


def test_untrained_lori_d_is_refused():
    model = tiny_model("olmoe")
    peft_model = apply_hellora(model, hot_map(model), config(), variant="lori_d")
    with pytest.raises(ValueError, match="not trained"):
        lori_s_masks(peft_model)


# ----------------------------------------------------------------------------------------------- LoRI-S
def lori_s_stage_two(masks, source):
    model = tiny_model("olmoe", seed=1)  # a fresh start; A comes from the LoRI-D run
    peft_model = apply_hellora(model, hot_map(model), config(), variant="lori_s", masks=masks)
    copy_lora_A(peft_model, source)
    return peft_model


def test_lori_s_masked_entries_stay_exactly_zero_through_adamw_save_and_load(tmp_path):
    lori_d = lori_d_model()
    lori_d.save_pretrained(tmp_path / "lori_d")
    masks = lori_s_from_lori_d(tmp_path / "lori_d", density=0.1)
    peft_model = lori_s_stage_two(masks, tmp_path / "lori_d")
    batch = random_batch(peft_model, batch=4, seq=16)
    a_before = snapshot(lora_factors(peft_model, "A"))
    assert all(torch.equal(a_before[k], p) for k, p in lora_factors(lori_d, "A").items())
    assert not any(bool(p.any()) for p in lora_factors(peft_model, "B").values())  # fresh start: B = 0

    train_steps(peft_model, batch, steps=6, weight_decay=0.1)
    assert not bool(masked_values(peft_model, masks).any())
    kept = torch.cat([p.detach().masked_select(masks[k]) for k, p in lora_factors(peft_model, "B").items()])
    assert bool(kept.any())
    assert all(torch.equal(a_before[k], p) for k, p in lora_factors(peft_model, "A").items())

    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "lori_s")
    record = json.loads((tmp_path / "lori_s" / VARIANT_FILE).read_text())
    assert record["variant"] == "lori_s" and record["kept"] == sum(int(m.sum()) for m in masks.values())
    saved = load_masks(tmp_path / "lori_s" / MASKS_FILE)
    assert all(torch.equal(saved[k], masks[k]) for k in masks)

    loaded = load_hellora(tiny_model("olmoe", seed=1), tmp_path / "lori_s")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    assert not bool(masked_values(loaded, masks).any())

    resumed = load_hellora(tiny_model("olmoe", seed=1), tmp_path / "lori_s", is_trainable=True)
    assert variant_of(resumed) == "lori_s"
    assert not any(p.requires_grad for p in lora_factors(resumed, "A").values())
    train_steps(resumed, batch, steps=3, weight_decay=0.1)
    assert not bool(masked_values(resumed, masks).any())


def test_without_masks_adamw_moves_the_masked_entries():
    """Control for the test above: the same training on dense B does change those entries."""
    masks = lori_s_masks(lori_d_model(), density=0.1)
    model = tiny_model("olmoe", seed=1)
    dense = apply_hellora(model, hot_map(model), config(), variant="lori_d")
    train_steps(dense, random_batch(dense, batch=4, seq=16), steps=6, weight_decay=0.1)
    assert bool(masked_values(dense, masks).any())


def test_deepcopy_keeps_masks_enforced(tmp_path):
    source = lori_d_model()
    masks = lori_s_masks(source)
    clone = copy.deepcopy(lori_s_stage_two(masks, source))
    train_steps(clone, random_batch(clone), steps=3)
    assert not bool(masked_values(clone, masks).any())
    clone.save_pretrained(tmp_path)
    assert (tmp_path / MASKS_FILE).is_file() and not list(tmp_path.glob(".*.tmp"))


def test_lori_s_before_masks_refuses_to_train_and_apply_masks_fixes_it():
    source = lori_d_model()
    model = tiny_model("olmoe", seed=1)
    peft_model = apply_hellora(model, hot_map(model), config(init_lora_weights=False), variant="lori_s", density=0.25)
    report = trainable_parameter_report(peft_model)
    b_numels = [p.numel() for p in lora_factors(peft_model, "B").values()]
    assert report["trainable"] == sum(kept_count(n, 0.25) for n in b_numels)
    batch = random_batch(peft_model)
    with pytest.raises(RuntimeError, match="no mask yet"):
        peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    peft_model.zero_grad()
    masks = lori_s_masks(source, density=0.25)
    apply_masks(peft_model, masks)  # random B (init_lora_weights=False): masked entries are zeroed now
    assert not bool(masked_values(peft_model, masks).any())
    assert trainable_parameter_report(peft_model)["trainable"] == sum(int(m.sum()) for m in masks.values())
    train_steps(peft_model, batch, steps=2)
    assert not bool(masked_values(peft_model, masks).any())


def test_enforce_masks_and_refreezing():
    source = lori_d_model()
    masks = lori_s_masks(source)
    peft_model = lori_s_stage_two(masks, source)
    with torch.no_grad():
        for p in lora_factors(peft_model, "B").values():
            p.fill_(1.0)  # what an optimizer that ignores gradients could do
    enforce_masks(peft_model)
    assert not bool(masked_values(peft_model, masks).any())
    assert freeze_lora_A(peft_model) > 0  # idempotent
    assert not any(p.requires_grad for p in lora_factors(peft_model, "A").values())


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_frozen_A_is_declared_to_peft_so_set_adapter_keeps_it_frozen(family):
    """PEFT's set_adapter re-marks adapter factors trainable; LoRI's A is declared in frozen_peft_weight_names, so
    PEFT itself re-freezes it (no trainer-side re-freeze before each optimizer)."""
    model = tiny_model(family)
    peft_model = apply_hellora(model, hot_map(model), config(), variant="lori_d")
    peft_model.set_adapter("default")
    a, b = lora_factors(peft_model, "A"), lora_factors(peft_model, "B")
    assert a and not any(p.requires_grad for p in a.values())
    assert all(p.requires_grad for p in b.values())


def test_saving_plain_lora_over_a_lori_adapter_drops_its_stale_side_files(tmp_path):
    """One saver for every side file: a plain-LoRA adapter saved into a folder that held a LoRI-S adapter must not
    keep hellora_variant.json / the masks (load_hellora would rebuild it as LoRI-S)."""
    source = lori_d_model()
    peft_model = lori_s_stage_two(lori_s_masks(source), source)
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / VARIANT_FILE).is_file() and (tmp_path / MASKS_FILE).is_file()
    model = tiny_model()
    plain = apply_hellora(model, hot_map(model), config())
    plain.save_pretrained(tmp_path)
    assert not (tmp_path / VARIANT_FILE).exists() and not (tmp_path / MASKS_FILE).exists()
    assert variant_of(load_hellora(tiny_model(), tmp_path)) == "lora"


def test_accounting_counts_changeable_entries_only():
    source = lori_d_model()
    masks = lori_s_masks(source, density=0.1)
    lora_model = tiny_model("olmoe")
    lora = trainable_parameter_report(apply_hellora(lora_model, hot_map(lora_model), config()))
    lori_d = trainable_parameter_report(source)
    lori_s = trainable_parameter_report(lori_s_stage_two(masks, source))
    b_total = sum(p.numel() for p in lora_factors(source, "B").values())
    a_total = sum(p.numel() for p in lora_factors(source, "A").values())
    assert lora["total"] == lori_d["total"] == lori_s["total"]  # frozen and masked entries still exist
    assert lora["trainable"] == a_total + b_total
    assert lori_d["trainable"] == b_total
    assert lori_s["trainable"] == sum(int(m.sum()) for m in masks.values()) == kept_count(b_total, 0.1)
    assert sum(lori_s["by_component"].values()) == lori_s["trainable"]
    assert trainable_parameter_report(source.get_base_model())["trainable"] == b_total


def test_modulelist_layout_lori_s_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = LegacyMoEForCausalLM(LegacyMoEConfig())
    hot = {layer.name: [0, 2] for layer in find_moe_layers(model)}
    lori_d = apply_hellora(model, hot, config(), variant="lori_d")
    fake_train_B(lori_d)
    masks = lori_s_masks(lori_d, density=0.3, scope="module")
    assert any(".experts.2.w1.lora_B.weight" in k for k in masks)
    torch.manual_seed(1)
    lori_s = apply_hellora(LegacyMoEForCausalLM(LegacyMoEConfig()), hot, config(), variant="lori_s", masks=masks)
    copy_lora_A(lori_s, lori_d)
    train_steps(lori_s, random_batch(lori_s), steps=3)
    assert not bool(masked_values(lori_s, masks).any())
    lori_s.save_pretrained(tmp_path)
    torch.manual_seed(1)
    loaded = load_hellora(LegacyMoEForCausalLM(LegacyMoEConfig()), tmp_path, is_trainable=True)
    assert variant_of(loaded) == "lori_s"
    assert all(torch.equal(p, lora_factors(lori_s, "B")[k]) for k, p in lora_factors(loaded, "B").items())


def test_load_refuses_weights_that_break_their_mask(tmp_path):
    source = lori_d_model()
    peft_model = lori_s_stage_two(lori_s_masks(source), source)
    fake_train_B(peft_model)  # dense B, bypassing the gradient hooks
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="outside its LoRI-S mask"):
        load_hellora(tiny_model("olmoe", seed=1), tmp_path)
    (tmp_path / MASKS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=MASKS_FILE):
        load_hellora(tiny_model("olmoe", seed=1), tmp_path)


def test_variant_errors(tmp_path):
    model = tiny_model("olmoe")
    hot = hot_map(model)
    with pytest.raises(ValueError, match="variant must be one of"):
        apply_hellora(model, hot, config(), variant="lori")
    with pytest.raises(ValueError, match="only apply to variant='lori_s'"):
        apply_hellora(model, hot, config(), variant="lori_d", masks={})
    with pytest.raises(ValueError, match="density"):
        apply_hellora(model, hot, config(), variant="lori_s", density=0.0)
    source = lori_d_model()
    with pytest.raises(ValueError, match="scope"):
        lori_s_masks(source, scope="row")
    masks = lori_s_masks(source)
    with pytest.raises(ValueError, match="do not fit"):  # other targets: attention/router masks are unknown
        apply_hellora(tiny_model("olmoe"), hot, config(), components="experts", variant="lori_s", masks=masks)
    with pytest.raises(ValueError, match="shape"):  # other hot map: expert stacks of another size
        apply_hellora(tiny_model("olmoe"), hot_map(model, hot=(0, 1)), config(), variant="lori_s", masks=masks)
    with pytest.raises(FileNotFoundError):
        lori_s_from_lori_d(tmp_path)


# ----------------------------------------------------------------------------------------------- baselines
def test_all_experts_hot_lists_every_expert():
    model = tiny_model("olmoe")
    hot = all_experts_hot(model)
    assert hot == {layer.name: list(range(layer.num_experts)) for layer in find_moe_layers(model)}


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_peft_target_parameters_baseline_matches_our_all_experts_count(family):
    ours_model = tiny_model(family)
    ours = apply_hellora(ours_model, all_experts_hot(ours_model), config(), fuse_gate_up=True)
    peft_model = apply_peft_all_experts(tiny_model(family), config())
    targets = peft_model.peft_config["default"]
    assert targets.target_parameters and any(t.endswith(".gate_up_proj") for t in targets.target_parameters)
    ours_report, peft_report = trainable_parameter_report(ours), trainable_parameter_report(peft_model)
    assert peft_report["trainable"] == ours_report["trainable"]
    assert peft_report["by_component"] == ours_report["by_component"]
    batch = random_batch(peft_model)
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    expert_grads = [p.grad for n, p in peft_model.named_parameters() if ".experts." in n and "lora_B" in n]
    assert expert_grads and all(g is not None for g in expert_grads)


def test_peft_baselines_on_modulelist_layout_and_dora():
    torch.manual_seed(0)
    model = LegacyMoEForCausalLM(LegacyMoEConfig())
    ours = trainable_parameter_report(apply_hellora(model, all_experts_hot(model), config()))
    torch.manual_seed(0)
    peft_model = apply_peft_all_experts(LegacyMoEForCausalLM(LegacyMoEConfig()), config())
    assert trainable_parameter_report(peft_model)["trainable"] == ours["trainable"]
    torch.manual_seed(0)
    dora = apply_peft_dora(LegacyMoEForCausalLM(LegacyMoEConfig()), config())
    names = [n for n, p in dora.named_parameters() if p.requires_grad]
    assert any(".experts.5.w2.lora_magnitude_vector" in n for n in names)  # ModuleList experts are nn.Linear


def test_dora_on_fused_experts_is_attention_only():
    with pytest.raises(ValueError, match="DoRA"):
        apply_peft_all_experts(tiny_model("olmoe"), config(use_dora=True))
    dora = apply_peft_dora(tiny_model("olmoe"), config())
    names = [n for n, p in dora.named_parameters() if p.requires_grad]
    assert any("self_attn.q_proj.lora_magnitude_vector" in n for n in names)
    assert not any(".experts." in n or ".mlp.gate." in n for n in names)
    batch = random_batch(dora)
    dora(**batch, labels=batch["input_ids"]).loss.backward()
