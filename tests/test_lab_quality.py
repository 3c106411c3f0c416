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
    from hellora_trl.recipes.lab import quality as q

    torch.set_num_threads(1)
    recipe = lab.LAB_RECIPES["small"]
    started, cpu_started = time.perf_counter(), time.process_time()
    path = lab.lab_model_path(recipe, cache_dir=tmp_path / "cache", progress=False)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"small lab model: pretrained in {wall:.0f}s wall, {cpu:.0f}s CPU; card {lab.read_card(path)['routing_concentration']}")
    # CPU time of this one-thread process: what a quiet machine would need, robust to other jobs on a shared box
    assert cpu < 180, f"pretraining the small lab model took {cpu:.0f}s of CPU (budget 180s; {wall:.0f}s wall)"

    settings = q.FineTuneSettings(steps=100, eval_rows=64, generate_rows=0, domain_rows=8, train_rows=640)
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
        print(f"seed {seed}: top-k share {[round(x, 3) for x in shares]}, target loss {loss}")
        assert loss["layer"] < loss["cold"] and loss["layer"] < loss["random"], (seed, loss)
