"""The planted-expert test (issue 20 §7): a selection check that a wrong selection cannot pass.

A tiny OLMoE whose routing is planted by hand: attention is switched off (``o_proj`` = 0), every token of the target
vocabulary carries one embedding direction that its layer's router sends, with a large margin, to two known experts,
and the padding token carries another direction routed to two other experts. The target is a lookup the base model
cannot do (each target token must predict a fixed, random other target token), so only a change in the outputs of
the experts those tokens visit can lower its loss.

Hot experts are chosen through the package's own code (``profile_experts`` -> ``select_hot_experts`` ->
``apply_hellora`` with expert adapters only) and must beat cold and random k=2 by :data:`MARGIN` nats of loss
reduction. The negative controls run the same pipeline with the three classic bugs planted and assert each one
misses the margin: the ranking reversed, hot sets shifted by one layer name, and a profile that counts padding.
"""

from __future__ import annotations

import pytest
import torch

from hellora_trl import selection
from hellora_trl.adapter import apply_hellora
from hellora_trl.profiling import profile_experts
from hellora_trl.recipes.offline import tiny_moe_model

E, K, HIDDEN, VOCAB, PAD = 8, 2, 64, 40, 0
TARGET_TOKENS = list(range(8, 40))  # 32 tokens, all routed to the planted hot experts
HOT = ({1, 5}, {2, 6})  # planted hot experts of layer 0 and layer 1 (disjoint, so an off-by-one map is all cold)
PAD_EXPERTS = ({3, 7}, {0, 4})  # where padding goes, per layer
STEPS, LR = 60, 3e-2
MARGIN = 0.5  # nats of loss reduction hot must win by (measured: hot 0.985; cold, reversed, shifted, padding 0; random mean 0.23)


def planted_model():
    torch.manual_seed(0)
    model = tiny_moe_model("olmoe", seed=0, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32,
                           num_hidden_layers=2, num_experts=E, num_experts_per_tok=K)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        embed = torch.randn(VOCAB, HIDDEN, generator=g)
        embed[:, :2] = 0.0
        embed[TARGET_TOKENS, 0] = 6.0  # direction 0: "a target token"
        embed[PAD, 1] = 6.0  # direction 1: padding
        model.model.embed_tokens.weight.copy_(embed)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()  # no attention: a token's routing depends on the token only
            router = layer.mlp.gate.weight
            router.zero_()
            router[sorted(HOT[i]), 0] = 10.0
            router[sorted(PAD_EXPERTS[i]), 1] = 10.0
    return model


def task_rows(n: int = 64, length: int = 8):
    """Chains t, f(t), f(f(t)), ... under a fixed random permutation f of the target tokens."""
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(len(TARGET_TOKENS), generator=g)
    f = {t: TARGET_TOKENS[int(perm[j])] for j, t in enumerate(TARGET_TOKENS)}
    rows = []
    for i in range(n):
        row = [TARGET_TOKENS[i % len(TARGET_TOKENS)]]
        for _ in range(length - 1):
            row.append(f[row[-1]])
        rows.append(row)
    return torch.tensor(rows)


def profiling_data(count_padding: bool):
    """Rows of very different lengths, so padding outnumbers target tokens 4 to 1 in a padded batch. With
    ``count_padding`` the rows arrive pre-padded with an all-ones mask: the bug of counting padding as routing."""
    from datasets import Dataset

    chains = task_rows(16, 16).tolist()
    rows = [chains[0]] + [r[:2] for r in chains[1:]]
    if count_padding:
        rows = [r + [PAD] * (16 - len(r)) for r in rows]
    return Dataset.from_dict({"input_ids": rows})


def layer_names(model):
    return [f"model.layers.{i}.mlp.experts" for i in range(len(model.model.layers))]


def loss_of(model, data) -> float:
    with torch.no_grad():
        return float(model(input_ids=data, labels=data).loss)


def gain(hot_map) -> float:
    """Loss reduction on the lookup after training LoRA (r=4) on ``hot_map``'s experts only, from the planted base."""
    from peft import LoraConfig

    model = planted_model()
    data = task_rows()
    before = loss_of(model, data)
    torch.manual_seed(0)
    peft_model = apply_hellora(model, hot_map, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0), components="experts")
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        loss = peft_model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return before - loss_of(peft_model, data)


def pipeline_selection(count_padding: bool = False, shift_layers: bool = False):
    """The package's own path: forward profile of the target rows, then per-layer top-k selection."""
    model = planted_model()
    profile = profile_experts(model, profiling_data(count_padding), batch_size=16, progress=False)
    hot = selection.select_hot_experts(profile, K, "layer")
    if shift_layers:  # off-by-one layer names: layer i gets layer i+1's hot set
        names = list(hot)
        hot = {name: hot[names[(j + 1) % len(names)]] for j, name in enumerate(names)}
    return profile, hot


@pytest.fixture(scope="module")
def controls():
    model = planted_model()
    profile = profile_experts(model, profiling_data(False), batch_size=16, progress=False)
    cold = gain(selection.select_hot_experts(profile, K, "cold"))
    randoms = [gain(selection.select_hot_experts(profile, K, "random", seed=s)) for s in range(3)]
    return {"cold": cold, "random": sum(randoms) / len(randoms), "random_each": randoms}


def wins(hot_gain: float, controls: dict) -> bool:
    return hot_gain - controls["cold"] > MARGIN and hot_gain - controls["random"] > MARGIN


def test_planted_routing_is_what_the_profile_sees():
    profile, hot = pipeline_selection()
    assert hot == {name: sorted(h) for name, h in zip(layer_names(planted_model()), HOT)}
    for i, pads in enumerate(PAD_EXPERTS):  # padding never reaches the counts
        assert int(profile.counts[i, sorted(pads)].sum()) == 0, profile.counts


def test_hot_selection_beats_cold_and_random_by_the_margin(controls):
    _, hot = pipeline_selection()
    hot_gain = gain(hot)
    print(f"planted: hot {hot_gain:.3f}, cold {controls['cold']:.3f}, random {controls['random_each']}")
    assert hot_gain > 0.8, hot_gain  # the lookup is learnable through the hot experts
    assert wins(hot_gain, controls), (hot_gain, controls)


@pytest.mark.parametrize("bug", ["reversed_ranking", "off_by_one_layer", "counting_padding"])
def test_a_wrong_selection_cannot_reach_the_margin(bug, controls, monkeypatch):
    """Negative controls: each planted bug makes the same assertion as above fail."""
    if bug == "reversed_ranking":
        original = selection.rank_experts
        monkeypatch.setattr(selection, "rank_experts", lambda counts, descending=True: original(counts, not descending))
        _, hot = pipeline_selection()
    elif bug == "off_by_one_layer":
        _, hot = pipeline_selection(shift_layers=True)
    else:
        profile, hot = pipeline_selection(count_padding=True)
        assert int(profile.counts[0, sorted(PAD_EXPERTS[0])].sum()) > 0  # the bug is really planted
    assert all(set(h).isdisjoint(HOT[i]) for i, h in enumerate(hot.values())), hot
    wrong_gain = gain(hot)
    print(f"{bug}: selected {hot}, gain {wrong_gain:.3f} vs controls {controls}")
    assert not wins(wrong_gain, controls), (bug, wrong_gain, controls)
