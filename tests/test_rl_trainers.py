"""HELLoRADPOTrainer and HELLoRAGRPOTrainer (issue 21) on a tiny OLMoE (CPU, seconds each)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from hellora_trl import apply_hellora, default_lora_config
from hellora_trl.baselines import all_experts_hot
from hellora_trl.config import HELLoRAConfig
from hellora_trl.constants import PROFILE_FILE
from hellora_trl.recipes.data import synthetic_gsm8k
from hellora_trl.recipes.offline import build_tokenizer
from hellora_trl.rl_trainers import HELLoRADPOConfig, HELLoRADPOTrainer, HELLoRAGRPOConfig, HELLoRAGRPOTrainer
from hellora_trl.trainer import HELLoRATrainer

from testing_utils import randomize_factors, tiny_model

LORA = dict(r=4, lora_alpha=8)
COMMON = dict(
    max_steps=2,
    per_device_train_batch_size=2,
    learning_rate=5e-3,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    seed=0,
    disable_tqdm=True,
    hellora_k=2,
    hellora_warmup_fraction=0.5,
    hellora_plots=False,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def wrong(completion: str) -> str:
    answer = int(completion.rsplit("####", 1)[1])
    return completion.rsplit("####", 1)[0] + f"#### {answer + 7}"


@pytest.fixture(scope="module")
def pairs():
    rows = synthetic_gsm8k(8, seed=0)
    return Dataset.from_dict(
        {"prompt": rows["prompt"], "chosen": rows["completion"], "rejected": [wrong(c) for c in rows["completion"]]}
    )


@pytest.fixture(scope="module")
def prompts():
    return Dataset.from_dict({"prompt": synthetic_gsm8k(8, seed=1)["prompt"]})


def dpo_args(tmp_path, **overrides) -> HELLoRADPOConfig:
    return HELLoRADPOConfig(output_dir=str(tmp_path / "dpo"), max_length=128, **{**COMMON, **overrides})


def grpo_args(tmp_path, **overrides) -> HELLoRAGRPOConfig:
    kwargs = dict(num_generations=2, max_completion_length=6, temperature=1.0)
    return HELLoRAGRPOConfig(output_dir=str(tmp_path / "grpo"), **{**COMMON, **kwargs, **overrides})


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def make_dpo(tmp_path, tokenizer, pairs, model=None, **overrides):
    return HELLoRADPOTrainer(
        model=model if model is not None else tiny_model("olmoe"),
        args=dpo_args(tmp_path, **overrides),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=default_lora_config(**LORA),
    )


def make_grpo(tmp_path, tokenizer, prompts, reward=length_reward, model=None, **overrides):
    return HELLoRAGRPOTrainer(
        model=model if model is not None else tiny_model("olmoe"),
        reward_funcs=reward,
        args=grpo_args(tmp_path, **overrides),
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=default_lora_config(**LORA),
    )


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ------------------------------------------------------------------------------------------------- DPO
def test_dpo_profiles_prompt_and_chosen_builds_hot_adapter_and_trains(tmp_path, tokenizer, pairs):
    trainer = make_dpo(tmp_path, tokenizer, pairs)
    assert trainer.ref_model is None  # no reference copy loaded: the adapter-disabled base is the reference
    trainer.train()
    hot = trainer.hot_experts
    assert hot and all(len(ids) == 2 for ids in hot.values())
    record = json.loads((tmp_path / "dpo" / PROFILE_FILE).read_text())
    assert record["source"]["mode"] == "forward"
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)


def test_dpo_rejected_counting_changes_the_profile(tmp_path, tokenizer, pairs):
    """'chosen' and 'chosen_rejected' count different tokens (the switch is wired to the profile)."""
    counts = {}
    for source in ("chosen", "chosen_rejected"):
        trainer = make_dpo(tmp_path / source, tokenizer, pairs, hellora_profile_source=source)
        counts[source] = trainer.run_profiling().counts.sum().item()
    assert counts["chosen_rejected"] > counts["chosen"] > 0


def test_dpo_reference_logps_are_the_base_models(tmp_path, tokenizer, pairs):
    trainer = make_dpo(tmp_path, tokenizer, pairs, max_steps=1)
    trainer.train()
    randomize_factors(trainer.model, seed=3)  # a policy clearly away from the base
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    base = tiny_model("olmoe").eval()  # same seed: the weights the trainer started from
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = (logps * (labels != -100)).sum(-1)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        policy = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    policy_logps = torch.log_softmax(policy.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert not torch.allclose((policy_logps * (labels != -100)).sum(-1), expected, atol=1e-3)


def test_lora_warmup_is_refused_naming_forward(tmp_path, tokenizer, pairs, prompts):
    with pytest.raises(ValueError, match=re.escape("hellora_profile_mode='forward'")):
        make_dpo(tmp_path, tokenizer, pairs, hellora_profile_mode="lora_warmup")
    with pytest.raises(ValueError, match=re.escape("hellora_profile_mode='forward'")):
        make_grpo(tmp_path, tokenizer, prompts, hellora_profile_mode="lora_warmup")


def test_sft_config_is_converted_and_its_warmup_mode_refused(tmp_path, tokenizer, pairs):
    sft = HELLoRAConfig(output_dir=str(tmp_path / "x"), use_cpu=True, report_to=[], hellora_plots=False)
    with pytest.raises(ValueError, match="hellora_profile_mode='forward'"):
        HELLoRADPOTrainer(model=tiny_model("olmoe"), args=sft, train_dataset=pairs, processing_class=tokenizer)


def test_peft_model_is_refused(tmp_path, tokenizer, pairs):
    base = tiny_model("olmoe")
    model = apply_hellora(base, all_experts_hot(base), default_lora_config(**LORA))
    with pytest.raises(ValueError, match="needs the base model"):
        make_dpo(tmp_path, tokenizer, pairs, model=model)


def test_wrong_dataset_format_is_one_clear_line(tmp_path, tokenizer, prompts, pairs):
    sft_rows = synthetic_gsm8k(4, seed=0)  # prompt/completion: an SFT dataset
    with pytest.raises(ValueError, match="prompt/chosen/rejected or chosen/rejected"):
        make_dpo(tmp_path, tokenizer, sft_rows)
    with pytest.raises(ValueError, match=r"columns prompt; got \['chosen', 'rejected'\]"):
        make_grpo(tmp_path, tokenizer, pairs.remove_columns("prompt"))
    assert not (tmp_path / "dpo").exists() and not (tmp_path / "grpo").exists()


# ------------------------------------------------------------------------------------------------- GRPO
def test_grpo_trains_hot_adapter(tmp_path, tokenizer, prompts):
    trainer = make_grpo(tmp_path, tokenizer, prompts)
    trainer.train()
    assert trainer.hot_experts and all(len(ids) == 2 for ids in trainer.hot_experts.values())
    assert (tmp_path / "grpo" / PROFILE_FILE).is_file()
    assert any("reward" in log for log in trainer.state.log_history)


def test_grpo_generation_and_inference_after_training_run_the_trained_expert_adapter(tmp_path, tokenizer, prompts):
    """Regression (item 6's reload test found it): GRPO generates under no_grad while B == 0 on its first step,
    and the expert layer cached "B is zero" on version counters the fused AdamW does not bump, so every later
    generation (and inference after training) ran the base experts. Now the in-memory policy equals the saved
    adapter reloaded."""
    from hellora_trl import load_hellora

    trainer = make_grpo(tmp_path, tokenizer, prompts, hellora_profile_source="prompts")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    batch = tokenizer(["What is 12 times 7?"], return_tensors="pt")
    trainer.model.eval()
    reloaded = load_hellora(tiny_model("olmoe"), tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(**batch).logits, reloaded(**batch).logits, rtol=1e-5, atol=1e-5)


def test_grpo_with_kl_uses_the_adapter_disabled_base_as_reference(tmp_path, tokenizer, prompts):
    """beta > 0: no reference copy is loaded (TRL would load one from the hub id of a bare model); the KL term is
    taken against the adapter-disabled base and training runs."""
    trainer = make_grpo(tmp_path, tokenizer, prompts, beta=0.1, max_steps=1, hellora_profile_source="prompts")
    assert trainer.ref_model is None
    trainer.train()
    assert any("kl" in log for log in trainer.state.log_history)


def test_grpo_rollouts_count_more_tokens_than_prompts(tmp_path, tokenizer, prompts):
    counts = {}
    for source in ("prompts", "rollouts"):
        trainer = make_grpo(tmp_path / source, tokenizer, prompts, hellora_profile_source=source)
        counts[source] = trainer.run_profiling().counts.sum().item()
    assert counts["rollouts"] > counts["prompts"] > 0


def test_raising_reward_function_is_named_before_profiling(tmp_path, tokenizer, prompts):
    def broken_reward(completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(ValueError, match="Reward function 'broken_reward' raised KeyError"):
        make_grpo(tmp_path, tokenizer, prompts, reward=broken_reward)
    assert not (tmp_path / "grpo" / PROFILE_FILE).exists()


def test_profile_source_defaults(tmp_path):
    """The defaults docs/rl.md states: DPO counts prompt + chosen; GRPO counts base-policy rollouts (measured)."""
    assert dpo_args(tmp_path).hellora_profile_source == "chosen"
    assert grpo_args(tmp_path).hellora_profile_source == "rollouts"
    assert dpo_args(tmp_path).hellora_profile_mode == grpo_args(tmp_path).hellora_profile_mode == "forward"


def test_reward_function_of_the_wrong_length_is_refused(tmp_path, tokenizer, prompts):
    def one_reward(completions, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match="Reward function 'one_reward' returned list of length 1 for 2 completions"):
        make_grpo(tmp_path, tokenizer, prompts, reward=one_reward)


def test_unknown_profile_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="hellora_profile_source must be one of"):
        grpo_args(tmp_path, hellora_profile_source="chosen")


# ------------------------------------------------------------------------------------------------- from an SFT adapter
@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("sft") / "run"
    args = HELLoRAConfig(
        output_dir=str(out), max_length=96, hellora_profile_mode="forward", **{**COMMON, "max_steps": 1}
    )
    trainer = HELLoRATrainer(
        model=tiny_model("olmoe"), args=args, train_dataset=synthetic_gsm8k(8, seed=0),
        processing_class=tokenizer, peft_config=default_lora_config(**LORA),
    )
    trainer.train()
    randomize_factors(trainer.model, seed=5)  # factors distinct from a fresh adapter (B = 0)
    trainer.save_model(str(out))
    return out, lora_state(trainer.model), trainer.hot_experts


class FirstWeights(TrainerCallback):
    def __init__(self):
        self.weights = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = lora_state(model)


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_init_adapter_skips_profiling_and_keeps_training_the_sft_factors(tmp_path, tokenizer, pairs, prompts, sft_adapter, kind):
    path, sft_weights, sft_hot = sft_adapter
    profile_before = (path / PROFILE_FILE).read_bytes()
    if kind == "dpo":
        trainer = make_dpo(tmp_path, tokenizer, pairs, hellora_init_adapter=str(path))
    else:
        trainer = make_grpo(tmp_path, tokenizer, prompts, hellora_init_adapter=str(path))
    trainer.run_profiling = lambda: pytest.fail("profiling ran although the adapter brings its profile")
    first = FirstWeights()
    trainer.add_callback(first)
    trainer.train()
    assert trainer.hot_experts == sft_hot
    assert trainer.hellora_timings["profiling"] == 0.0
    assert first.weights.keys() == sft_weights.keys()
    for name, value in sft_weights.items():
        torch.testing.assert_close(first.weights[name], value)
    after = lora_state(trainer.model)
    assert any(not torch.equal(after[n], sft_weights[n]) for n in sft_weights)  # the factors kept training
    assert (path / PROFILE_FILE).read_bytes() == profile_before  # nothing written over the SFT run


def test_init_adapter_without_profile_is_refused(tmp_path, tokenizer, pairs, sft_adapter):
    path, _, _ = sft_adapter
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match=f"holds no {PROFILE_FILE}"):
        make_dpo(tmp_path, tokenizer, pairs, hellora_init_adapter=str(bare))


def test_init_adapter_hot_map_must_fit_the_model(tmp_path, tokenizer, pairs, sft_adapter):
    path, _, _ = sft_adapter
    other = tiny_model("olmoe", num_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="does not fit this model"):
        make_dpo(tmp_path, tokenizer, pairs, model=other, hellora_init_adapter=str(path))


# ------------------------------------------------------------------------------------------------- drop-in pieces
class Seen(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_checkpoint_resume_callbacks_and_accumulation(kind, tmp_path, tokenizer, pairs, prompts):
    """A user callback runs, gradient accumulation counts optimizer steps, a checkpoint carries the hot map and
    resuming from it rebuilds the adapter without profiling again."""
    opts = dict(save_strategy="steps", save_steps=1, max_steps=2, gradient_accumulation_steps=2,
                hellora_profile_source="prompts" if kind == "grpo" else "chosen")
    make = (lambda: make_dpo(tmp_path, tokenizer, pairs, **opts)) if kind == "dpo" else (
        lambda: make_grpo(tmp_path, tokenizer, prompts, **opts))
    first = make()
    seen = Seen()
    first.add_callback(seen)
    first.train()
    assert seen.steps == 2 and first.state.global_step == 2
    checkpoint = tmp_path / kind / "checkpoint-1"
    assert (checkpoint / PROFILE_FILE).is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    again = make()
    again.run_profiling = lambda: pytest.fail("resume profiled again")
    again.train(resume_from_checkpoint=str(checkpoint))
    assert again.state.global_step == 2 and again.hot_experts == first.hot_experts


# The 2-process DDP and ZeRO-3 runs of both trainers: tests/distributed/test_rl_distributed.py (slow).
