"""Lab pretraining is deterministic (issue 20 §2): same recipe + same thread count -> the same bits."""

from __future__ import annotations

import dataclasses

import torch

from hellora_trl.recipes.lab import model as lab


def test_tiny_recipe_rebuilt_twice_with_one_thread_has_identical_weights(tmp_path):
    recipe = lab.LAB_RECIPES["tiny"]
    threads_before = torch.get_num_threads()
    first = lab.pretrain_lab_model(recipe, tmp_path / "a", progress=False, threads=1)
    second = lab.pretrain_lab_model(recipe, tmp_path / "b", progress=False, threads=1)
    assert torch.get_num_threads() == threads_before  # restored
    card_a, card_b = lab.read_card(first), lab.read_card(second)
    assert lab.weights_sha256(first) == lab.weights_sha256(second) == card_a["weights_sha256"] == card_b["weights_sha256"]
    assert card_a["threads"] == 1 and card_a["losses"] == card_b["losses"]
    seeds = card_a["seeds"]
    assert seeds["init"] == seeds["block_order"] == seeds["document_shuffle"] == recipe.seed
    assert seeds["corpus"] == {"math": 0, "code": 1, "safety": 2, "prose": 3}
    assert set(seeds["heldout_documents"]) == set(seeds["corpus"])
    # and the hash tells builds apart: another pretraining seed gives other weights
    other = lab.pretrain_lab_model(dataclasses.replace(recipe, seed=1), tmp_path / "c", progress=False, threads=1)
    assert lab.read_card(other)["weights_sha256"] != card_a["weights_sha256"]
    assert lab.read_card(other)["seeds"]["corpus"]["math"] == 1000
