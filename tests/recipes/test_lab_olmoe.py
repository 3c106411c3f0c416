"""The OLMoE-shaped lab recipe (issue 20 §5): the paper's routing shape, checked at tiny sizes only."""

from __future__ import annotations

import dataclasses

from hellora_trl.recipes.lab import LAB_RECIPES, lab_config
from hellora_trl.recipes.lab import model as lab

OLMOE = LAB_RECIPES["olmoe"]


def test_olmoe_recipe_has_the_papers_routing_shape():
    assert OLMOE.num_experts == 64 and OLMOE.num_experts_per_tok == 8 and 4 <= OLMOE.num_hidden_layers <= 8
    config = lab_config(OLMOE)
    assert config.model_type == "olmoe" and config.num_experts == 64 and config.num_experts_per_tok == 8
    # active expert width per token equals the default recipe's (8 x 32 = 2 x 128): a like-for-like comparison
    default = LAB_RECIPES["default"]
    assert OLMOE.num_experts_per_tok * OLMOE.intermediate_size == default.num_experts_per_tok * default.intermediate_size
    assert len({OLMOE.key(), default.key(), LAB_RECIPES["small"].key(), LAB_RECIPES["tiny"].key()}) == 4


def test_olmoe_shape_builds_and_profiles_at_tiny_size(tmp_path):
    """64 experts, top-8, shrunk everywhere else: pretraining, the card and its routing profile run."""
    shrunk = dataclasses.replace(OLMOE, hidden_size=32, intermediate_size=8, num_hidden_layers=2, vocab_size=300,
                                 seq_len=32, batch_size=4, steps=3, warmup_steps=1, docs_per_domain=12)
    path = lab.pretrain_lab_model(shrunk, tmp_path / "m", progress=False, threads=1)
    card = lab.read_card(path)
    assert card["recipe"]["num_experts"] == 64 and card["recipe"]["num_experts_per_tok"] == 8
    # routing concentration is measured per layer on the 64-expert router (uniform top-8 share: 0.125)
    assert all(len(v) == 2 and all(0.125 - 1e-9 <= x <= 1 for x in v) for v in card["routing_concentration"].values())
