"""Selection quality on a freshly pretrained lab model: the first test where HELLoRA's choice, not only its
structure, can fail (issue 14, acceptance 6). Slow: pretrains the "small" lab recipe, then fine-tunes."""

from __future__ import annotations

import time

import pytest

SEEDS = (0, 1)


@pytest.mark.slow
def test_small_lab_model_routes_by_domain_and_hot_experts_beat_cold_and_random(tmp_path):
    import torch

    from hellora_trl.recipes import lab
    from hellora_trl.recipes import lab_quality as q

    torch.set_num_threads(1)
    recipe = lab.LAB_RECIPES["small"]
    started = time.perf_counter()
    path = lab.lab_model_path(recipe, cache_dir=tmp_path / "cache", progress=False)
    pretrain_seconds = time.perf_counter() - started
    assert pretrain_seconds < 180, f"pretraining the small lab model took {pretrain_seconds:.0f}s (budget 180s)"

    settings = q.FineTuneSettings(steps=80, eval_rows=64, generate_rows=0, domain_rows=8, train_rows=640)
    k, experts = recipe.num_experts_per_tok, recipe.num_experts
    model, tokenizer = q._load(path)
    for seed in SEEDS:
        train, held_out = q.target_data(settings, seed)
        # 1. routing on the target data is concentrated: top-k share >= 2x uniform in every MoE layer
        shares = q.routing_profile(model, tokenizer, held_out).concentration()
        assert min(shares) >= 2 * k / experts, (seed, shares)
        # 2. hot-k beats cold-k and random-k on held-out target loss
        profile_path = tmp_path / f"profile-{seed}.json"
        q.take_profile(path, train, settings, seed, profile_path)
        loss = {}
        for selection in ("layer", "cold", "random"):
            config = q.QualityConfig(selection, k=k, selection=selection)
            loss[selection] = q.finetune(config, path, train, settings, seed, profile_path, held_out, {})["target_loss"]
        assert loss["layer"] < loss["cold"] and loss["layer"] < loss["random"], (seed, loss)
