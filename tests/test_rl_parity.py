"""Drop-in parity (issue 21 item 7): ``DPOTrainer`` vs ``HELLoRADPOTrainer`` and ``GRPOTrainer`` vs
``HELLoRAGRPOTrainer`` on the same inputs, feature by feature.

Each case builds TRL's trainer (with a plain LoRA ``peft_config`` on the attention projections, the PEFT run a user
would swap out) and HELLoRA's (same arguments plus ``hellora_*`` fields), runs both 1-2 steps on a tiny OLMoE and
compares what a user sees: the dataset formats accepted, logged keys, callback events, optimizer steps under
gradient accumulation, evaluation metrics, checkpoint files and resume, tensorboard tags. The differences by design
(docs/rl.md, "Drop-in parity") are asserted as such: HELLoRA logs ``hellora/*`` metrics once at the end, its
checkpoints add ``hellora_profile.json``, and it refuses a ``PeftModel`` (it builds the adapter after profiling).
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

from hellora_trl import apply_hellora, default_lora_config
from hellora_trl.baselines import all_experts_hot
from hellora_trl.constants import PROFILE_FILE
from hellora_trl.recipes.data import synthetic_gsm8k
from hellora_trl.recipes.offline import build_tokenizer
from hellora_trl.recipes.rl import text_of
from hellora_trl.rl_trainers import HELLoRADPOConfig, HELLoRADPOTrainer, HELLoRAGRPOConfig, HELLoRAGRPOTrainer

from testing_utils import tiny_model

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
TRAINERS = {  # kind -> (TRL trainer, TRL config, HELLoRA trainer, HELLoRA config)
    "dpo": (DPOTrainer, DPOConfig, HELLoRADPOTrainer, HELLoRADPOConfig),
    "grpo": (GRPOTrainer, GRPOConfig, HELLoRAGRPOTrainer, HELLoRAGRPOConfig),
}
COMMON = dict(
    max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=5e-3, logging_steps=1,
    save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
)
PER_KIND = {"dpo": dict(max_length=128), "grpo": dict(num_generations=2, max_completion_length=6)}
HELLORA = dict(hellora_k=2, hellora_warmup_fraction=0.5, hellora_plots=False)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def length_reward(completions, **kwargs):
    return [float(len(text_of(c))) for c in completions]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def dataset(kind: str, fmt: str = "standard", n: int = 8) -> Dataset:
    """TRL's dataset formats: preference (standard, implicit prompt, conversational) and prompt-only
    (standard, conversational)."""
    rows = synthetic_gsm8k(n, seed=0)
    prompts, good = list(rows["prompt"]), list(rows["completion"])
    bad = [c + "0" for c in good]
    if kind == "grpo":
        return Dataset.from_dict({"prompt": [user(p) for p in prompts] if fmt == "conversational" else prompts})
    if fmt == "conversational":
        return Dataset.from_dict({"prompt": [user(p) for p in prompts], "chosen": [assistant(c) for c in good],
                                  "rejected": [assistant(c) for c in bad]})
    if fmt == "implicit_prompt":  # the prompt is the shared start of chosen and rejected
        return Dataset.from_dict({"chosen": [p + c for p, c in zip(prompts, good)],
                                  "rejected": [p + c for p, c in zip(prompts, bad)]})
    return Dataset.from_dict({"prompt": prompts, "chosen": good, "rejected": bad})


def build(kind: str, hellora: bool, tmp_path, tokenizer, data=None, model=None, eval_dataset=None, **overrides):
    trl_trainer, trl_config, hellora_trainer, hellora_config = TRAINERS[kind]
    name = "hellora" if hellora else "trl"
    values = {**COMMON, **PER_KIND[kind], **overrides, "output_dir": str(tmp_path / name)}
    args = hellora_config(**values, **HELLORA) if hellora else trl_config(**values)
    kwargs = dict(reward_funcs=length_reward) if kind == "grpo" else {}
    cls = hellora_trainer if hellora else trl_trainer
    return cls(
        model=model if model is not None else tiny_model("olmoe"), args=args,
        train_dataset=data if data is not None else dataset(kind), processing_class=tokenizer,
        eval_dataset=eval_dataset, peft_config=default_lora_config(r=4, lora_alpha=8, target_modules=ATTENTION),
        **kwargs,
    )


def logged_keys(trainer) -> set[str]:
    return {key for log in trainer.state.log_history for key in log}


def both(kind, tmp_path, tokenizer, **kwargs):
    return build(kind, False, tmp_path, tokenizer, **kwargs), build(kind, True, tmp_path, tokenizer, **kwargs)


def assert_same_logs(trl, hellora) -> None:
    """The same keys, except HELLoRA's ``hellora/*`` summary (by design, logged once at the end of train())."""
    ours, theirs = logged_keys(hellora), logged_keys(trl)
    assert theirs <= ours, theirs - ours
    assert {key for key in ours - theirs if not key.startswith("hellora/")} == set()
    assert {"hellora/profile_seconds", "hellora/profile_share"} <= ours


CASES = [("dpo", "standard"), ("dpo", "implicit_prompt"), ("dpo", "conversational"),
         ("grpo", "standard"), ("grpo", "conversational")]


@pytest.mark.parametrize("kind, fmt", CASES)
def test_same_dataset_formats_train_and_log_the_same_keys(kind, fmt, tmp_path, tokenizer):
    trl, ours = both(kind, tmp_path, tokenizer, data=dataset(kind, fmt))
    trl.train()
    ours.train()
    assert trl.state.global_step == ours.state.global_step == 2
    assert_same_logs(trl, ours)
    assert ours.hot_experts and all(len(ids) == 2 for ids in ours.hot_experts.values())


class Events(TrainerCallback):
    def __init__(self):
        self.seen: list[str] = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            seen = object.__getattribute__(self, "seen")
            return lambda *a, **k: seen.append(name)
        return object.__getattribute__(self, name)


@pytest.mark.parametrize("kind", TRAINERS)
def test_callbacks_see_the_same_events_and_accumulation_the_same_steps(kind, tmp_path, tokenizer):
    """A user callback gets the same events in the same order (HELLoRA adds one on_log: its summary), and
    gradient accumulation counts optimizer steps the same way."""
    trainers = both(kind, tmp_path, tokenizer, gradient_accumulation_steps=2)
    events = []
    for trainer in trainers:
        recorder = Events()
        trainer.add_callback(recorder)
        trainer.train()
        events.append(recorder.seen)
    theirs, ours = events
    assert [e for e in ours if e != "on_log"] == [e for e in theirs if e != "on_log"]
    assert ours.count("on_log") == theirs.count("on_log") + 1
    assert [t.state.global_step for t in trainers] == [2, 2]
    assert ours.count("on_substep_end") == theirs.count("on_substep_end") == 2  # 2 steps x 2 micro-batches - 2


@pytest.mark.parametrize("kind", TRAINERS)
def test_eval_dataset_gives_the_same_metrics(kind, tmp_path, tokenizer):
    trainers = both(kind, tmp_path, tokenizer, eval_dataset=dataset(kind, n=4), eval_strategy="steps", eval_steps=1)
    for trainer in trainers:
        trainer.train()
    eval_keys = [{k for log in t.state.log_history for k in log if k.startswith("eval_")} for t in trainers]
    assert eval_keys[0] == eval_keys[1] and "eval_loss" in eval_keys[0]
    assert [sum("eval_loss" in log for log in t.state.log_history) for t in trainers] == [2, 2]


@pytest.mark.parametrize("kind", TRAINERS)
def test_checkpoints_hold_the_same_files_and_resume_the_same_way(kind, tmp_path, tokenizer):
    files, resumed = [], []
    for hellora in (False, True):
        options = dict(save_strategy="steps", save_steps=1)
        first = build(kind, hellora, tmp_path, tokenizer, **options)
        first.train()
        checkpoint = tmp_path / ("hellora" if hellora else "trl") / "checkpoint-1"
        files.append({p.name for p in checkpoint.iterdir()})
        again = build(kind, hellora, tmp_path, tokenizer, **options)
        again.train(resume_from_checkpoint=str(checkpoint))
        resumed.append(again.state.global_step)
    theirs, ours = files
    assert theirs <= ours and ours - theirs == {PROFILE_FILE}  # by design: the hot map travels with the checkpoint
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= theirs
    assert resumed == [2, 2]


@pytest.mark.parametrize("kind", TRAINERS)
def test_report_to_tensorboard_gets_the_same_scalars(kind, tmp_path, tokenizer):
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = []
    for trainer in both(kind, tmp_path, tokenizer, report_to=["tensorboard"]):
        trainer.train()
        runs = list((tmp_path / ("hellora" if "HELLoRA" in type(trainer).__name__ else "trl")).rglob("events.out.*"))
        assert len({p.parent for p in runs}) == 1
        tags.append(set(EventAccumulator(str(runs[0].parent)).Reload().Tags()["scalars"]))
    theirs, ours = tags
    assert theirs <= ours and all(tag.startswith("train/hellora/") for tag in ours - theirs)


@pytest.mark.parametrize("kind", TRAINERS)
def test_a_peft_model_is_refused_as_for_sft(kind, tmp_path, tokenizer):
    """TRL takes a PeftModel and trains it; HELLoRA (like HELLoRATrainer) needs the base model, since it builds
    the adapter after profiling, and says so in one line before any work."""
    base = tiny_model("olmoe")
    peft_model = apply_hellora(base, all_experts_hot(base), default_lora_config(r=4, lora_alpha=8))
    with pytest.raises(ValueError, match="needs the base model") as error:
        build(kind, True, tmp_path, tokenizer, model=peft_model)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "hellora").exists()


@pytest.mark.parametrize("kind", TRAINERS)
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--use_peft", "false"], "use_peft=false asks for full fine-tuning"),
        (["--use_peft=False"], "use_peft=false asks for full fine-tuning"),
        (["--load_in_4bit", "true"], "fused 3-D parameters"),
        (["--load_in_8bit", "true"], "fused 3-D parameters"),
        (["--lora_target_parameters", "mlp.experts.gate_up_proj"], "places expert adapters itself"),
    ],
)
def test_model_config_flags_are_refused_as_for_sft(kind, argv, message, tmp_path):
    """`hellora dpo` / `hellora grpo` parse TRL's ModelConfig like `hellora train`, and refuse the same flags with
    the same one line (use_peft=false names `trl dpo` / `trl grpo` for full fine-tuning) before any model loads."""
    from hellora_trl.recipes import rl
    from hellora_trl.recipes.sft import lora_config_from
    from hellora_trl.recipes.sft import parse_args as sft_parse_args

    base = ["--output_dir", str(tmp_path / "out"), "--report_to", "none"]

    def refusal(parse, build):
        with pytest.raises(ValueError, match=message) as error:
            build(*parse([*base, *argv]))
        return str(error.value)

    ours = refusal(lambda a: rl.parse_args(kind, a), lambda script, args, model: rl.build(kind, script, args, model))
    sft = refusal(sft_parse_args, lambda script, args, model: lora_config_from(model))
    assert ours == sft.replace("`trl sft`", f"`trl {kind}`") and "\n" not in ours
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", TRAINERS)
def test_a_trl_config_is_converted_like_for_sft(kind, tmp_path, tokenizer):
    """Keeping TRL's own config and swapping only the trainer class: the values are kept, the hellora_* fields
    come at their defaults. (GRPOConfig derives generation_batch_size from steps_per_generation in __post_init__,
    and re-initialising with both failed: 'can not be both configured at the same time'.)"""
    _, trl_config, hellora_trainer, hellora_config = TRAINERS[kind]
    args = trl_config(output_dir=str(tmp_path / "x"), **{**COMMON, **PER_KIND[kind], "learning_rate": 3e-3, "seed": 7})
    kwargs = dict(reward_funcs=length_reward) if kind == "grpo" else {}
    trainer = hellora_trainer(model=tiny_model("olmoe"), args=args, train_dataset=dataset(kind),
                              processing_class=tokenizer, **kwargs)
    assert isinstance(trainer.args, hellora_config)
    assert (trainer.args.learning_rate, trainer.args.seed) == (3e-3, 7)
    assert trainer.args.hellora_profile_mode == "forward" and trainer.args.hellora_k is None
    if kind == "grpo":
        assert (trainer.args.generation_batch_size, trainer.args.steps_per_generation) == (
            args.generation_batch_size, args.steps_per_generation)
