"""HELLoRATrainer end to end on a tiny OLMoE and generated GSM8K-style problems (CPU, no downloads)."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from hellora_trl import ExpertProfile, apply_hellora, default_lora_config, find_moe_layers
from hellora_trl.config import CHECKPOINTING_FIELD, HELLoRAConfig
from hellora_trl.recipes.data import synthetic_gsm8k
from hellora_trl.recipes.offline import build_tokenizer
from hellora_trl.trainer import HEATMAP_FILE, PROFILE_FILE, HELLoRATrainer

from testing_utils import tiny_model

LORA = dict(r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return synthetic_gsm8k(40, seed=0)


def make_args(tmp_path, **overrides) -> HELLoRAConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=96,
        seed=0,
        disable_tqdm=True,
        hellora_k=2,
        hellora_profile_mode="forward",
        hellora_warmup_fraction=0.25,
        hellora_plots=False,
    )
    kwargs.update(overrides)
    return HELLoRAConfig(**kwargs)


def make_trainer(tmp_path, tokenizer, dataset, model=None, **overrides) -> HELLoRATrainer:
    return HELLoRATrainer(
        model=model if model is not None else tiny_model("olmoe"),
        args=make_args(tmp_path, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=default_lora_config(**LORA),
    )


def base_weights(model) -> dict[str, torch.Tensor]:
    """Base parameters by their original names (PEFT inserts `.base_layer`), adapters excluded."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return {
        n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n
    }


def test_train_profiles_selects_and_adapts_hot_experts_only(tmp_path, tokenizer, dataset):
    model = tiny_model("olmoe")
    before = base_weights(model)
    trainer = make_trainer(
        tmp_path, tokenizer, dataset, model=model, max_steps=24, hellora_plots=True, learning_rate=1e-2
    )
    trainer.train()
    trainer.save_model()
    out = tmp_path / "run"
    # one profile with exactly k hot experts per MoE layer, matching the adapted model
    profiles = list(out.rglob(PROFILE_FILE))
    assert profiles == [out / PROFILE_FILE]
    saved = json.loads(profiles[0].read_text())
    layers = [l.name for l in find_moe_layers(model)]
    assert sorted(saved["hot_experts"]) == sorted(layers)
    assert all(len(ids) == 2 for ids in saved["hot_experts"].values())
    assert trainer.hot_experts == saved["hot_experts"]
    assert ExpertProfile.load(profiles[0]).source["mode"] == "forward"
    assert (out / HEATMAP_FILE).stat().st_size > 0
    # the adapter file holds factors for the hot experts only
    weights = load_file(out / "adapter_model.safetensors")
    for layer in layers:
        prefix = f"base_model.model.{layer}."
        assert weights[prefix + "lora_hot_experts"].tolist() == saved["hot_experts"][layer]
        for proj in ("gate", "up", "down"):
            assert weights[prefix + f"lora_{proj}_A"].shape[0] == 2
    # base and cold-expert weights bit-identical; only adapters trained
    after = base_weights(trainer.model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    # the task is learnable: loss goes down
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses
    assert trainer.state.log_history[-1]["hellora/profile_seconds"] > 0


def test_lora_warmup_mode_discards_warmup_adapters(tmp_path, tokenizer, dataset):
    model = tiny_model("olmoe")
    before = base_weights(model)
    trainer = make_trainer(tmp_path, tokenizer, dataset, model=model, hellora_profile_mode="lora_warmup", max_steps=1)
    trainer.train()
    profile = trainer.hellora_profile
    # the 10-row slice (25% of 40) is capped by the rows this 1-step run trains: 1 x 4 (issue 19 item 13)
    assert profile.source["mode"] == "lora_warmup" and profile.source["warmup_rows"] == 4
    # warm-up trained LoRA on all experts for one step over those 4 rows, counting every routed token
    assert profile.counts.sum() == profile.tokens_seen * 2 * len(profile.layer_names)
    assert profile.source["warmup_loss"] is not None
    # the warm-up adapters are gone: the final model adapts 2 experts per layer, and the base is untouched
    for layer in find_moe_layers(trainer.model.get_base_model()):
        module = trainer.model.get_base_model().get_submodule(layer.name)
        assert module.lora_down_A["default"].shape[0] == 2
    assert list(trainer.model.peft_config) == ["default"]
    after = base_weights(trainer.model)
    for name, value in before.items():
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize("mode", ["forward", "lora_warmup"])
def test_same_seed_same_profile_and_hot_map(tmp_path, tokenizer, dataset, mode):
    runs = []
    for i in range(2):
        trainer = make_trainer(
            tmp_path / str(i), tokenizer, dataset, hellora_profile_mode=mode, max_steps=1, hellora_selection="layer"
        )
        trainer.train()
        runs.append(trainer)
    assert torch.equal(runs[0].hellora_profile.counts, runs[1].hellora_profile.counts)
    assert runs[0].hot_experts == runs[1].hot_experts


def test_profile_path_skips_profiling(tmp_path, tokenizer, dataset):
    first = make_trainer(tmp_path / "a", tokenizer, dataset, max_steps=1, hellora_profile_path=str(tmp_path / "p.json"))
    first.train()
    assert (tmp_path / "p.json").is_file()  # a missing profile path is where the new profile is written

    model = tiny_model("olmoe")
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    second = make_trainer(
        tmp_path / "b", tokenizer, dataset, model=model, max_steps=2, hellora_profile_path=str(tmp_path / "p.json")
    )
    second.train()
    assert len(forwards) == 2  # the two training steps; not one profiling pass
    assert second.hot_experts == first.hot_experts
    assert second.state.log_history[-1]["hellora/profile_seconds"] == 0


def test_resume_reuses_hot_map_and_never_reprofiles(tmp_path, tokenizer, dataset, monkeypatch):
    first = make_trainer(tmp_path, tokenizer, dataset, max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / PROFILE_FILE).is_file()

    def no_profiling(self):
        raise AssertionError("resume must not profile again")

    monkeypatch.setattr(HELLoRATrainer, "run_profiling", no_profiling)
    resumed = make_trainer(tmp_path, tokenizer, dataset, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.hot_experts == first.hot_experts
    assert resumed.state.global_step == 4
    losses_first = [l["loss"] for l in first.state.log_history if "loss" in l]
    losses_resumed = [l["loss"] for l in resumed.state.log_history if "loss" in l]
    assert losses_resumed[-2:] == pytest.approx(losses_first[-2:], rel=1e-4)  # the loss curve continues


def test_gradient_accumulation_checkpointing_and_packing_run(tmp_path, tokenizer, dataset):
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        dataset,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **{CHECKPOINTING_FIELD: True},
        packing=True,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(torch.tensor(l["loss"])) for l in trainer.state.log_history if "loss" in l)


def test_router_aux_loss_is_used_when_turned_on(tmp_path, tokenizer, dataset):
    model = tiny_model("olmoe", output_router_logits=True, router_aux_loss_coef=0.5)
    trainer = make_trainer(tmp_path, tokenizer, dataset, model=model, max_steps=1)
    trainer.train()
    assert any("aux_loss" in log for log in trainer.state.log_history)


def test_bad_inputs_fail_early(tmp_path, tokenizer, dataset):
    model = tiny_model("olmoe")
    peft_model = apply_hellora(model, {l.name: [0] for l in find_moe_layers(model)}, default_lora_config(**LORA))
    with pytest.raises(ValueError, match="needs the base model"):
        make_trainer(tmp_path, tokenizer, dataset, model=peft_model)
    with pytest.raises(ValueError, match="target_parameters"):
        HELLoRATrainer(
            model=tiny_model("olmoe"),
            args=make_args(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(target_parameters=["mlp.experts.gate_up_proj"]),
        )
    with pytest.raises(ValueError, match="hellora_profile_mode"):
        make_args(tmp_path, hellora_profile_mode="backward")
    with pytest.raises(ValueError, match="hellora_warmup_fraction"):
        make_args(tmp_path, hellora_warmup_fraction=0.0)


def test_config_fields_come_from_yaml_and_cli(tmp_path):
    from trl import TrlParser

    config = tmp_path / "recipe.yaml"
    config.write_text("output_dir: out\nhellora_k: 3\nhellora_selection: mass\nhellora_warmup_fraction: 0.2\n")
    parser = TrlParser((HELLoRAConfig,))
    (args,) = parser.parse_args_and_config(["--config", str(config), "--hellora_profile_mode", "forward"])
    assert (args.hellora_k, args.hellora_selection, args.hellora_warmup_fraction) == (3, "mass", 0.2)
    assert args.hellora_profile_mode == "forward"
    help_text = parser.format_help()
    assert "--hellora_warmup_fraction" in help_text and "Share of the training set" in help_text


def test_bf16_default_follows_the_hardware(tmp_path):
    from transformers.utils import is_torch_bf16_gpu_available

    assert HELLoRAConfig(output_dir=str(tmp_path)).bf16 == is_torch_bf16_gpu_available()
    assert HELLoRAConfig(output_dir=str(tmp_path), bf16=False).bf16 is False


def lora_tensors(model, letter: str) -> dict[str, torch.Tensor]:
    import re

    pattern = re.compile(rf"lora_(\w+_)?{letter}\b")
    return {n: p.detach().clone() for n, p in model.named_parameters() if pattern.search(n)}


def test_lori_d_keeps_a_frozen_and_trains_b(tmp_path, tokenizer, dataset):
    trainer = make_trainer(tmp_path, tokenizer, dataset, max_steps=2, hellora_variant="lori_d")
    original_train_step = trainer.training_step
    a_before = {}

    def capture(*args, **kwargs):  # snapshot A right before the first update
        if not a_before:
            a_before.update(lora_tensors(trainer.model, "A"))
        return original_train_step(*args, **kwargs)

    trainer.training_step = capture
    trainer.train()
    assert a_before and all(torch.equal(lora_tensors(trainer.model, "A")[n], v) for n, v in a_before.items())
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if n in a_before)
    assert any(v.abs().sum() > 0 for v in lora_tensors(trainer.model, "B").values())
    optimizer_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimizer_params for n, p in trainer.model.named_parameters() if n in a_before)


def test_lori_s_runs_both_stages_and_keeps_masked_entries_zero(tmp_path, tokenizer, dataset):
    trainer = make_trainer(
        tmp_path, tokenizer, dataset, max_steps=2, hellora_variant="lori_s", hellora_lori_density=0.1
    )
    trainer.train()
    trainer.save_model()
    out = tmp_path / "run"
    assert (out / "lori_d" / "adapter_model.safetensors").is_file()
    assert (out / "hellora_masks.safetensors").is_file()
    # LoRI-S reuses the LoRI-D run's frozen A
    stage_one = load_file(out / "lori_d" / "adapter_model.safetensors")
    final = load_file(out / "adapter_model.safetensors")
    a_keys = [k for k in final if re.search(r"lora_(\w+_)?A\b", k)]
    assert a_keys and all(torch.equal(final[k], stage_one[k]) for k in a_keys)
    b = {k: v for k, v in final.items() if re.search(r"lora_(\w+_)?B\b", k)}
    nonzero = sum(int((v != 0).sum()) for v in b.values())
    total = sum(v.numel() for v in b.values())
    assert 0 < nonzero <= round(0.1 * total) + 1


def test_stored_hot_map_is_used_unless_reselect(tmp_path, tokenizer, dataset):
    """`hellora select` writes the hot map next to the counts; the trainer must train exactly that map."""
    first = make_trainer(tmp_path / "a", tokenizer, dataset, max_steps=1)
    first.train()
    chosen = {name: [5, 6] for name in first.hellora_profile.layer_names}  # not what top-2 would pick
    assert chosen != first.hot_experts
    first.hellora_profile.save(tmp_path / "selected.json", extra={"hot_experts": chosen})

    stored = make_trainer(tmp_path / "b", tokenizer, dataset, max_steps=1, hellora_profile_path=str(tmp_path / "selected.json"))
    stored.train()
    assert stored.hot_experts == chosen
    again = make_trainer(
        tmp_path / "c", tokenizer, dataset, max_steps=1, hellora_profile_path=str(tmp_path / "selected.json"),
        hellora_reselect=True,
    )
    again.train()
    assert again.hot_experts == first.hot_experts


def test_save_model_publishes_through_a_staging_folder(tmp_path, tokenizer, dataset, monkeypatch):
    from hellora_trl.trainer import STAGING_DIR

    trainer = make_trainer(tmp_path, tokenizer, dataset, max_steps=1)
    trainer.train()
    out = tmp_path / "run"
    trainer.save_model()
    good = (out / "adapter_model.safetensors").read_bytes()
    assert (out / PROFILE_FILE).is_file() and not (out / STAGING_DIR).exists()

    # a save that dies half-way leaves the published adapter untouched
    import peft

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.save_model()
    assert (out / "adapter_model.safetensors").read_bytes() == good
    monkeypatch.undo()
    trainer.save_model()  # the next save clears the leftover staging folder
    assert not (out / STAGING_DIR).exists()


def test_resume_from_a_checkpoint_without_hot_map_fails_clearly(tmp_path, tokenizer, dataset, olmoe):
    from hellora_trl import profile_experts
    from testing_utils import random_batch

    checkpoint = tmp_path / "checkpoint-1"
    profile_experts(olmoe, [random_batch(olmoe)], progress=False).save(checkpoint / PROFILE_FILE)  # counts only
    for name in ("trainer_state.json", "adapter_config.json"):  # otherwise complete
        (checkpoint / name).write_text("{}")
    trainer = make_trainer(tmp_path, tokenizer, dataset, max_steps=1)
    with pytest.raises(ValueError, match="holds no hot_experts map"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


# ------------------------------------------------------------------------------------- output folders (#13 §2)
def checkpointed(tmp_path, tokenizer, dataset, **overrides):
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=2)
    kwargs.update(overrides)
    return make_trainer(tmp_path, tokenizer, dataset, **kwargs)


def test_resume_true_never_takes_another_runs_checkpoint(tmp_path, tokenizer, dataset):
    """Review W2/5.9: `--resume_from_checkpoint true` in a reused output_dir took run A's checkpoint-4, trained 0
    steps and published A's k=2 adapter over run B (k=3)."""
    checkpointed(tmp_path, tokenizer, dataset, hellora_k=2).train()  # run A: checkpoint-2, checkpoint-4
    run_b = checkpointed(tmp_path, tokenizer, dataset, hellora_k=3, max_steps=6)
    with pytest.raises(ValueError, match=r"No checkpoint of this run.*checkpoint-4: from another run \(hellora\.hellora_k: 2 \(checkpoint\) != 3"):
        run_b.train(resume_from_checkpoint=True)
    # an explicit path of another run (review 5.11: --hellora_k 4 silently trained k=2) is refused too
    with pytest.raises(ValueError, match=r"belongs to another run: hellora\.hellora_k: 2 \(checkpoint\) != 3"):
        checkpointed(tmp_path, tokenizer, dataset, hellora_k=3).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


def test_resume_true_picks_this_runs_newest_checkpoint_among_another_runs(tmp_path, tokenizer, dataset, caplog):
    checkpointed(tmp_path, tokenizer, dataset, hellora_k=2, max_steps=6).train()  # run A: checkpoints 2, 4, 6
    run_b = checkpointed(tmp_path, tokenizer, dataset, hellora_k=3, max_steps=2, save_steps=1,
                         hellora_overwrite_output_dir=True)
    run_b.train()  # run B: checkpoints 1, 2 (its checkpoint-2 replaces A's)
    # review 5.10: a new run let in beside another run's checkpoints is told what happens to them
    assert "holds checkpoints this run did not write (checkpoint-2, checkpoint-4, checkpoint-6)" in caplog.text
    resumed = checkpointed(tmp_path, tokenizer, dataset, hellora_k=3, max_steps=3, save_steps=1)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3  # resumed at B's step 2, not A's step 6 (0 steps)
    assert all(len(ids) == 3 for ids in resumed.hot_experts.values())
    assert "not resuming from checkpoint-6: from another run (hellora.hellora_k: 2 (checkpoint) != 3" in caplog.text


def test_a_new_run_is_refused_beside_another_runs_checkpoints(tmp_path, tokenizer, dataset):
    """Issue 19 item 2: a new run in a reused output_dir overwrote run A's same-numbered checkpoints and
    save_total_limit deleted the rest, after only a warning."""
    checkpointed(tmp_path, tokenizer, dataset, hellora_k=2).train()  # run A: checkpoint-2, checkpoint-4
    out = tmp_path / "run"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    run_b = checkpointed(tmp_path, tokenizer, dataset, hellora_k=3, save_total_limit=1)
    with pytest.raises(ValueError) as err:
        run_b.train()
    message = str(err.value)
    assert "checkpoint-2, checkpoint-4" in message and "--hellora_overwrite_output_dir true" in message
    assert f"{out}-2" in message and "\n" not in message
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    assert run_b.state.global_step == 0 and not isinstance(run_b.model, PeftModel)  # refused before any work


def test_a_new_run_is_refused_in_a_folder_holding_a_model(tmp_path, tokenizer, dataset):
    """Issue 19 ("an output folder that holds ... a model is refused"; probe 5.8m of tools/reliability_probes.py):
    `hellora train --output_dir <a model folder>` wrote its adapter and tokenizer there with rc 0, and
    transformers then tried to attach that adapter whenever the folder was loaded as a model (it failed)."""
    out = tmp_path / "run"
    tiny_model("olmoe").save_pretrained(out)
    tokenizer.save_pretrained(out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    trainer = make_trainer(tmp_path, tokenizer, dataset, max_steps=1)
    with pytest.raises(ValueError) as err:
        trainer.train()
    message = str(err.value)
    assert "holds a model (config.json, model.safetensors)" in message and "\n" not in message
    assert "--hellora_overwrite_output_dir true" in message and f"{out}-2" in message
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    assert trainer.state.global_step == 0 and not isinstance(trainer.model, PeftModel)  # refused before any work
    # the explicit flag lets it in; a folder holding this recipe's own adapter (a rerun) was never refused
    make_trainer(tmp_path, tokenizer, dataset, max_steps=1, hellora_overwrite_output_dir=True).train()
    rerun = tmp_path / "rerun"
    make_trainer(rerun, tokenizer, dataset, max_steps=1).train()
    trainer = make_trainer(rerun, tokenizer, dataset, max_steps=1)
    trainer.train()
    trainer.save_model()
    trainer = make_trainer(rerun, tokenizer, dataset, max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1


def test_rotation_never_deletes_checkpoints_this_run_did_not_write(tmp_path, tokenizer, dataset):
    checkpointed(tmp_path, tokenizer, dataset, hellora_k=2, max_steps=6).train()  # run A: 2, 4, 6
    out = tmp_path / "run"
    a4, a6 = (out / "checkpoint-4" / PROFILE_FILE).read_bytes(), (out / "checkpoint-6" / PROFILE_FILE).read_bytes()
    checkpointed(tmp_path, tokenizer, dataset, hellora_k=3, max_steps=3, save_steps=1, save_total_limit=1,
                 hellora_overwrite_output_dir=True).train()  # run B: 1, 2 (replaces A's), 3
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-3", "checkpoint-4", "checkpoint-6"]  # B keeps its newest; A's stay (old code: gone)
    assert (out / "checkpoint-4" / PROFILE_FILE).read_bytes() == a4 and (out / "checkpoint-6" / PROFILE_FILE).read_bytes() == a6


def test_torn_checkpoint_is_skipped_with_the_reason(tmp_path, tokenizer, dataset, caplog):
    """Review W6/5.3-5.6: a kill mid-save left checkpoint-4 torn; resume said 'not written by HELLoRATrainer'
    (or a raw Errno 2) instead of taking checkpoint-2."""
    checkpointed(tmp_path, tokenizer, dataset).train()
    torn = tmp_path / "run" / "checkpoint-4"
    (torn / "trainer_state.json").unlink()  # the Trainer writes it last: killed before that
    (torn / PROFILE_FILE).unlink()
    with pytest.raises(ValueError, match="checkpoint-4: incomplete: no trainer_state.json"):
        checkpointed(tmp_path, tokenizer, dataset).train(resume_from_checkpoint=str(torn))
    resumed = checkpointed(tmp_path, tokenizer, dataset, max_steps=5)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 5  # from checkpoint-2
    assert "checkpoint-4: incomplete: no trainer_state.json" in caplog.text
    # review 5.13: a checkpoint path that does not exist says so
    with pytest.raises(ValueError, match="nope/checkpoint-5 does not exist"):
        checkpointed(tmp_path, tokenizer, dataset).train(resume_from_checkpoint=str(tmp_path / "nope" / "checkpoint-5"))


def test_output_dir_is_marked_in_progress_until_the_final_adapter_is_saved(tmp_path, tokenizer, dataset):
    """Review 5.8/8.3: an interrupted rerun left the previous adapter next to the new profile, unmarked."""
    from hellora_trl import load_hellora
    from hellora_trl.constants import RUN_MARKER_FILE

    first = make_trainer(tmp_path, tokenizer, dataset, max_steps=1)
    first.train()
    marker = tmp_path / "run" / RUN_MARKER_FILE
    assert json.loads(marker.read_text())["run"]["hellora"]["hellora_k"] == 2
    first.save_model()
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_hellora(tiny_model("olmoe"), tmp_path / "run")  # no warning for a finished folder

    rerun = make_trainer(tmp_path, tokenizer, dataset, max_steps=1, hellora_k=3)
    rerun.train()  # "interrupted" before save_model: the folder now holds run 1's adapter and run 2's profile
    assert marker.exists()
    with pytest.warns(UserWarning, match="did not save its final adapter"):
        load_hellora(tiny_model("olmoe"), tmp_path / "run")


# ------------------------------------------------------------------------------------------ TRL parity (#13 §4)
def test_warmup_sub_run_ignores_eval_on_start_padding_free_and_trackers(tmp_path, tokenizer, dataset):
    """Ecosystem review: under the default lora_warmup profiling, `eval_on_start=True` failed with 'evaluation
    requires an eval_dataset' and `padding_free=True` with 'Passing a custom data collator is not supported'."""
    args = make_args(
        tmp_path, max_steps=2, hellora_profile_mode="lora_warmup", eval_on_start=True, eval_strategy="steps",
        eval_steps=1, padding_free=True, max_length=None, per_device_eval_batch_size=4,
    )
    trainer = HELLoRATrainer(
        model=tiny_model("olmoe"), args=args, train_dataset=dataset, eval_dataset=dataset.select(range(4)),
        processing_class=tokenizer, peft_config=default_lora_config(**LORA),
    )
    phase = trainer.hellora_phase_args("hellora_warmup")
    assert not phase.eval_on_start and not phase.padding_free and phase.report_to == []
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.hellora_profile.source["mode"] == "lora_warmup"
    assert any("eval_loss" in log for log in trainer.state.log_history)


def test_report_to_tensorboard_gets_scalars_and_figures(tmp_path, tokenizer, dataset):
    """Ecosystem review: `report_to="tensorboard"` (every recipe YAML) crashed after profiling with
    `'HELLoRAConfig' object has no attribute 'logging_dir'`."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(tmp_path, tokenizer, dataset, max_steps=2, report_to=["tensorboard"], hellora_plots=True)
    trainer.train()
    runs = [p.parent for p in (tmp_path / "run" / "runs").rglob("events.out.tfevents.*")]
    assert len(set(runs)) == 1  # figures and scalars in the Trainer's one run directory
    board = EventAccumulator(str(runs[0]), size_guidance={"images": 0}).Reload()
    assert {"hellora/expert_heatmap", "hellora/concentration", "hellora/overhead"} <= set(board.Tags()["images"])
    assert "train/hellora/profile_seconds" in board.Tags()["scalars"]
    assert set(trainer.hellora_figures.sent) >= {"hellora/expert_heatmap", "hellora/overhead"}


def test_default_plots_without_matplotlib_warn_instead_of_failing(tmp_path, tokenizer, dataset, monkeypatch, caplog):
    """Ecosystem review: a plain install (no `plots` extra) raised ImportError right after profiling, since
    hellora_plots defaults to True."""
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    trainer = make_trainer(tmp_path, tokenizer, dataset, max_steps=1, hellora_plots=True)
    trainer.train()
    assert trainer.state.global_step == 1
    assert "matplotlib is not installed" in caplog.text
    assert (tmp_path / "run" / PROFILE_FILE).is_file() and not list((tmp_path / "run").glob("*.png"))


def test_an_sft_config_is_converted_like_sft_trainer_converts_training_arguments(tmp_path, tokenizer, dataset):
    """Ecosystem review: keeping an SFTConfig and swapping only the trainer class gave a TypeError."""
    from trl import SFTConfig

    sft_args = SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, learning_rate=5e-3,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, max_length=96, seed=3, disable_tqdm=True,
    )
    trainer = HELLoRATrainer(
        model=tiny_model("olmoe"), args=sft_args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=default_lora_config(**LORA),
    )
    assert isinstance(trainer.args, HELLoRAConfig)
    assert (trainer.args.learning_rate, trainer.args.max_length, trainer.args.seed) == (5e-3, 96, 3)
    assert trainer.args.hellora_selection == "layer" and trainer.args.hellora_k is None
    with pytest.raises(TypeError, match="needs a HELLoRAConfig"):
        HELLoRATrainer(model=tiny_model("olmoe"), args={"output_dir": "x"}, train_dataset=dataset)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"hellora_k": True}, "hellora_k must be a whole number"),
        ({"hellora_k": 2.5}, "hellora_k must be a whole number"),
        ({"hellora_k": "3"}, "hellora_k must be a whole number"),
        ({"hellora_k": float("inf")}, "hellora_k must be a whole number"),
        ({"hellora_min_k": 0}, "hellora_min_k must be a whole number >= 1"),
        ({"hellora_min_k": 5, "hellora_max_k": 3}, "hellora_max_k must be a whole number >= hellora_min_k"),
    ],
)
def test_bad_k_settings_fail_in_the_config(tmp_path, overrides, match):
    """Review 2.20-2.24: float/inf/bool/str k and min_k > max_k passed HELLoRAConfig and failed after profiling."""
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)


@pytest.mark.parametrize("overrides", [{"hellora_k": 100}, {"hellora_selection": "mass", "hellora_max_k": 9}])
def test_k_larger_than_the_experts_fails_before_profiling(tmp_path, tokenizer, dataset, overrides):
    """Review 2.14/2.18: hellora_k=100 on 8 experts failed only after the whole LoRA warm-up sub-run."""
    with pytest.raises(ValueError, match=r"exceeds the 8 experts per MoE layer"):
        make_trainer(tmp_path, tokenizer, dataset, hellora_profile_mode="lora_warmup", **overrides)


def test_an_empty_prepared_training_set_says_why(tmp_path, tokenizer, dataset):
    """Review 4.14: rows all cut off by max_length gave 'sample_fraction got an empty dataset'."""
    trainer = make_trainer(tmp_path, tokenizer, dataset)
    trainer.train_dataset = trainer.train_dataset.select([])
    with pytest.raises(ValueError, match="training set is empty after TRL's preparation"):
        trainer.train()


def test_fingerprint_hashes_every_prepared_row(tmp_path, tokenizer, dataset):
    """Issue 23 (claim 10): the 'prepared-data hash' hashed the row count and 16 sampled rows, so a dataset of the
    same size with another row 1 (not among the sampled rows of 40) passed as the same run."""
    changed = dataset.map(lambda row, i: {"prompt": ("Q" if i == 1 else "") + row["prompt"]}, with_indices=True)
    same = make_trainer(tmp_path, tokenizer, dataset).run_fingerprint()["data"]
    again = make_trainer(tmp_path, tokenizer, dataset).run_fingerprint()["data"]
    other = make_trainer(tmp_path, tokenizer, changed).run_fingerprint()["data"]
    assert same == again and same["rows"] == other["rows"] == len(dataset)
    assert same["sha256"] != other["sha256"]


def test_data_fingerprint_sees_order_and_token_boundaries():
    from datasets import Dataset

    from hellora_trl.checkpoints import data_fingerprint

    rows = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6]] * 20})
    assert data_fingerprint(rows) == data_fingerprint(rows.select(range(60)))
    assert data_fingerprint(rows) != data_fingerprint(rows.select(list(reversed(range(60)))))
    moved = Dataset.from_dict({"input_ids": [[1, 2], [3, 4, 5], [6]] * 20})  # same tokens, other row boundaries
    assert data_fingerprint(rows) != data_fingerprint(moved)
    assert data_fingerprint(iter([])) is None  # no length: no fingerprint


def test_overhead_figure_and_summary_share_one_definition(tmp_path, tokenizer, dataset):
    """Issue 18 polish: hellora_overhead.png and hellora_summary.json's profile_seconds come from one definition,
    which the figure states; a later run that loads its profile (0 s profiling) redraws the figure instead of
    leaving the earlier run's numbers beside its own summary."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from hellora_trl.constants import OVERHEAD_FILE, SUMMARY_FILE
    from hellora_trl.recipes.sft import write_run_outputs
    from hellora_trl.trainer import OVERHEAD_DEFINITION

    out = tmp_path / "run"
    for expect_profiling in (True, False):
        trainer = make_trainer(
            tmp_path, tokenizer, dataset, max_steps=1, hellora_plots=True, hellora_profile_path=str(tmp_path / "p.json")
        )
        output = trainer.train()
        write_run_outputs(output.metrics, {}, out)
        summary = json.loads((out / SUMMARY_FILE).read_text())
        figure = Image.open(out / OVERHEAD_FILE).text
        drawn = json.loads(figure["hellora_seconds"])
        assert drawn == trainer.overhead_seconds()
        assert drawn["profiling"] == summary["profile_seconds"] == output.metrics["hellora/profile_seconds"]
        assert (summary["profile_seconds"] > 0) is expect_profiling
        assert figure["Description"] == OVERHEAD_DEFINITION and "hellora_summary.json" in OVERHEAD_DEFINITION


def test_configs_do_not_warn_about_the_deprecated_checkpointing_name(tmp_path):
    """Issue 18 polish: TRL's default gradient_checkpointing=True made every config print transformers'
    FutureWarning (three times in the main job). The switch still defaults to on and the old name still works."""
    from hellora_trl.config import CHECKPOINTING_FIELD

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = make_args(tmp_path)
        off = make_args(tmp_path, **{CHECKPOINTING_FIELD: False})
    assert getattr(args, CHECKPOINTING_FIELD) is True and args.gradient_checkpointing is True
    assert getattr(off, CHECKPOINTING_FIELD) is False and off.gradient_checkpointing is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = make_args(tmp_path, gradient_checkpointing=False)  # the deprecated spelling is still honoured
    assert getattr(old, CHECKPOINTING_FIELD) is False
    model = tiny_model("olmoe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_hellora(model, {layer.name: [0, 1] for layer in find_moe_layers(model)}, default_lora_config(**LORA))
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]  # PEFT's alias read, silenced


def test_positional_args_and_the_core_knows_nothing_of_dynamic_rank(tmp_path, tokenizer, dataset):
    """The mixin finds ``args`` by position in the wrapped trainer's signature too; HELLoRAConfig has no
    dynamic-rank field any more (experimental.dynamic_rank_trainer owns them)."""
    import inspect

    import hellora_trl.trainer as trainer_module
    from hellora_trl.config import hellora_defaults

    args = make_args(tmp_path, seed=5)
    trainer = HELLoRATrainer(tiny_model("olmoe"), args, None, dataset, processing_class=tokenizer,
                             peft_config=default_lora_config(**LORA))
    assert trainer.args is args and len(trainer.train_dataset) == len(dataset)
    assert not [name for name in hellora_defaults() if "dynamic" in name or name.startswith("hellora_dr_")]
    assert "dynamic" not in inspect.getsource(trainer_module).lower()


def test_the_mixin_fronts_a_trainer_whose_args_come_later(tmp_path, tokenizer, dataset):
    """HELLoRAMixin finds `args` in the wrapped trainer's own signature (DPOTrainer has ref_model before it), and
    HELLoRAArguments mixes into another TRL config: a preference trainer is a few lines."""
    from dataclasses import dataclass

    from trl import DPOConfig, SFTTrainer

    from hellora_trl.config import HELLoRAArguments
    from hellora_trl.trainer import HELLoRAMixin

    @dataclass
    class PreferenceConfig(HELLoRAArguments, DPOConfig):
        pass

    config = PreferenceConfig(output_dir=str(tmp_path / "dpo"), use_cpu=True, hellora_k=3)
    assert (config.hellora_k, config.beta) == (3, DPOConfig(output_dir="x", use_cpu=True).beta)

    class ReferenceFirst(SFTTrainer):  # stands in for a trainer with another positional before args
        def __init__(self, model, ref_model=None, args=None, **kwargs):
            self.ref = ref_model
            super().__init__(model, args, **kwargs)

    class Fronted(HELLoRAMixin, ReferenceFirst):
        hellora_phase_trainer = HELLoRATrainer.hellora_phase_trainer

    args = make_args(tmp_path, seed=7)
    trainer = Fronted(tiny_model("olmoe"), "reference", args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=default_lora_config(**LORA))
    assert trainer.args is args and trainer.ref == "reference"
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.hot_experts
