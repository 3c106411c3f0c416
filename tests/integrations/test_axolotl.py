"""The Axolotl plugin against a minimal stand-in of Axolotl's documented plugin contract.

Axolotl cannot be installed next to this stack (its releases for Python 3.11 pin transformers 5.16, peft 0.20,
trl 1.9), so ``axolotl.integrations.base`` / ``axolotl.common.datasets`` are faked in ``sys.modules`` with the
hook names and signatures of Axolotl 0.19: ``BasePlugin.load_adapter(model, cfg, inference, config_only)``,
``get_adapter_capabilities() -> [AdapterCapabilities]``, ``get_input_args() -> "module.Class"``. The last test
runs against the real Axolotl package when it is importable.
"""

import importlib
import json
import logging
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("pydantic")
from datasets import Dataset  # noqa: E402
from peft import PeftModel  # noqa: E402

import hellora_trl.integrations.axolotl as axo  # noqa: E402
from hellora_trl import hot_map_from_model, profile_experts, select_hot_experts  # noqa: E402
from hellora_trl.constants import COMPONENTS  # noqa: E402
from hellora_trl.constants import PROFILE_MODES  # noqa: E402
from hellora_trl.profiling import warmup_slice  # noqa: E402
from hellora_trl.constants import STRATEGIES  # noqa: E402

from testing_utils import random_batch, tiny_model  # noqa: E402

CONFIG_YAML = Path(__file__).resolve().parents[2] / "configs" / "axolotl" / "olmoe_gsm8k.yaml"


class DictDefault(dict):
    """Axolotl's config object answers None for missing keys, by attribute or item."""

    def __getattr__(self, key):
        return self.get(key)


def tokenized_rows(n=24, vocab=512, seed=0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        length = 6 + i % 7
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["labels"].append([-100] * 2 + ids[2:])  # prompt masked, as Axolotl's tokenizers do
    return Dataset.from_dict(rows)


@pytest.fixture
def fake_axolotl(monkeypatch):
    """Install the stand-in modules; returns the list that records load_datasets calls."""
    base = types.ModuleType("axolotl.integrations.base")

    class BasePlugin:
        def __init__(self):
            pass

        def register(self, cfg):
            pass

        def get_input_args(self):
            return None

        def get_adapter_capabilities(self):
            return []

        def load_adapter(self, model, cfg, inference=False, config_only=False):
            return None

        def pre_lora_load(self, cfg, model):
            pass

        def post_lora_load(self, cfg, model):
            pass

        def get_trainer_cls(self, cfg):
            return None

    @dataclass(frozen=True)
    class AdapterCapabilities:
        name: str
        lora_like: bool = False
        relora: bool = False

    base.BasePlugin, base.AdapterCapabilities = BasePlugin, AdapterCapabilities
    calls = []
    common = types.ModuleType("axolotl.common.datasets")

    def load_datasets(*, cfg, cli_args=None, debug=False):
        calls.append(cfg)
        return types.SimpleNamespace(train_dataset=tokenized_rows(), eval_dataset=None, total_num_steps=None)

    common.load_datasets = load_datasets
    for name, module in {
        "axolotl": types.ModuleType("axolotl"),
        "axolotl.integrations": types.ModuleType("axolotl.integrations"),
        "axolotl.integrations.base": base,
        "axolotl.common": types.ModuleType("axolotl.common"),
        "axolotl.common.datasets": common,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(vars(axo), "HELLoRAPlugin", raising=False)
    yield calls
    vars(axo).pop("HELLoRAPlugin", None)


def load_plugin(path=axo.PLUGIN_PATH):
    """What Axolotl's load_plugin does with a `plugins:` entry."""
    module, cls = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)()


def cfg(tmp_path, **overrides) -> DictDefault:
    values = dict(
        adapter="hellora", lora_r=4, lora_alpha=8, micro_batch_size=4, learning_rate=1e-3, seed=42,
        output_dir=str(tmp_path / "out"), hellora_k=2, hellora_warmup_fraction=0.5, hellora_profile_mode="forward",
    )
    values.update(overrides)
    return DictDefault(values)


def test_missing_axolotl_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "axolotl", None)
    monkeypatch.delitem(vars(axo), "HELLoRAPlugin", raising=False)
    with pytest.raises(ImportError, match="pip install axolotl"):
        axo.HELLoRAPlugin
    assert axo.HELLoRAArgs().hellora_selection == "layer"  # the args model needs no Axolotl


def test_plugin_contract(fake_axolotl):
    plugin = load_plugin()
    base = sys.modules["axolotl.integrations.base"]
    assert isinstance(plugin, base.BasePlugin)
    args_cls = getattr(importlib.import_module(plugin.get_input_args().rsplit(".", 1)[0]), "HELLoRAArgs")
    assert args_cls is axo.HELLoRAArgs
    assert plugin.get_adapter_capabilities() == [base.AdapterCapabilities(name="hellora", lora_like=True)]
    assert plugin.get_trainer_cls(DictDefault()) is None
    assert plugin.load_adapter(tiny_model(), DictDefault(adapter="lora")) is None  # other adapters untouched


def test_args_validate_and_track_the_package_choices():
    fields = axo.HELLoRAArgs.model_fields
    assert set(fields["hellora_selection"].annotation.__args__) == set(STRATEGIES)
    assert set(fields["hellora_profile_mode"].annotation.__args__) == set(PROFILE_MODES)
    assert set(fields["hellora_components"].annotation.__args__) == set(COMPONENTS)
    for bad in ({"hellora_warmup_fraction": 0}, {"hellora_selection": "hottest"}, {"hellora_k": 0}):
        with pytest.raises(ValueError):
            axo.HELLoRAArgs(**bad)
    with pytest.raises(ValueError, match="lora_target_parameters"):
        axo.lora_config_from_cfg(DictDefault(lora_target_parameters=["experts.down_proj"]))
    config = axo.lora_config_from_cfg(DictDefault(lora_r=16, lora_alpha=32, lora_target_linear=True))
    assert (config.r, config.lora_alpha, config.target_modules) == (16, 32, "all-linear")


def test_forward_profile_selects_the_same_hot_experts_as_the_library(fake_axolotl, tmp_path):
    plugin = load_plugin()
    settings = cfg(tmp_path)
    model = tiny_model()
    peft_model, lora_config = plugin.load_adapter(model, settings)
    assert isinstance(peft_model, PeftModel) and lora_config.r == 4
    assert len(fake_axolotl) == 1  # the prepared training set was read once
    # Independently: the same seeded slice, forward profile, per-layer top-2.
    rows = warmup_slice(tokenized_rows(), 0.5, 42)
    expected = select_hot_experts(profile_experts(tiny_model(), rows, batch_size=4, progress=False), k=2)
    assert hot_map_from_model(peft_model) == expected
    saved = json.loads((tmp_path / "out" / axo.PROFILE_FILE).read_text())
    assert saved["hot_experts"] == expected and saved["source"]["warmup_rows"] == 12


def test_lora_warmup_profiles_then_leaves_the_base_untouched(fake_axolotl, tmp_path):
    plugin = load_plugin()
    profile_path = tmp_path / "profile.json"
    settings = cfg(
        tmp_path, hellora_profile_mode="lora_warmup", hellora_profile_path=str(profile_path), gradient_checkpointing=True
    )
    model = tiny_model()
    batch = random_batch(model)
    peft_model, _ = plugin.load_adapter(model, settings)
    assert all(len(ids) == 2 for ids in hot_map_from_model(peft_model).values())
    with torch.no_grad():  # fresh adapter (B = 0) on an untouched base == the base model
        torch.testing.assert_close(peft_model(**batch).logits, tiny_model()(**batch).logits, rtol=0, atol=0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    saved = json.loads(profile_path.read_text())
    assert saved["source"]["mode"] == "lora_warmup" and saved["source"]["warmup_loss"] > 0
    # One epoch over the slice, each real token counted once (no recount under gradient checkpointing).
    rows = warmup_slice(tokenized_rows(), 0.5, 42)
    assert saved["tokens_seen"] == sum(len(ids) for ids in rows["input_ids"])
    # Second run: the saved profile is reused, no dataset is read.
    again, _ = load_plugin().load_adapter(tiny_model(), settings)
    assert hot_map_from_model(again) == hot_map_from_model(peft_model) and len(fake_axolotl) == 1


def test_lora_model_dir_reloads_the_trained_adapter(fake_axolotl, tmp_path):
    from testing_utils import randomize_factors

    plugin = load_plugin()
    peft_model, _ = plugin.load_adapter(tiny_model(), cfg(tmp_path))
    randomize_factors(peft_model, std=0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    batch = random_batch(peft_model)
    with torch.no_grad():
        expected = peft_model.eval()(**batch).logits
    reloaded, config = plugin.load_adapter(tiny_model(), cfg(tmp_path, lora_model_dir=str(tmp_path / "adapter")), inference=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=0)
    assert config.r == 4 and len(fake_axolotl) == 1  # no profiling on reload
    assert plugin.load_adapter(tiny_model(), cfg(tmp_path), config_only=True)[0] is None


def axolotl_merge_dispatch(cfg) -> str:
    """What Axolotl's merge-lora does with cfg.merge_method (0.21): legacy/standard -> the plugin's load path,
    anything else -> the memory-efficient merge that skips the hot-expert factors."""
    method = str(getattr(cfg, "merge_method", "") or "").strip().lower().replace("-", "_")
    return "legacy" if method in {"legacy", "standard"} else "memory_efficient"


def test_merge_lora_defaults_to_the_exact_merge_and_refuses_the_lossy_one(fake_axolotl):
    """Ecosystem review (issue 19 item 11): Axolotl's default `merge-lora` silently dropped the hot-expert
    updates. The plugin's args, merged into Axolotl's schema, now make the legacy merge the default."""
    from pydantic import BaseModel

    class AxolotlInput(BaseModel):  # the part of Axolotl's config schema the merge reads
        adapter: str | None = None
        merge_method: str | None = None

    class Merged(AxolotlInput, axo.HELLoRAArgs):  # what merge_input_args builds from the plugins' args
        pass

    parsed = Merged(adapter="hellora", hellora_k=2)
    assert parsed.merge_method == "legacy" and axolotl_merge_dispatch(parsed) == "legacy"
    assert Merged(adapter="hellora", merge_method="standard").merge_method == "standard"
    assert Merged(adapter="lora").merge_method is None  # other adapters keep Axolotl's default
    for lossy in ("memory_efficient", "memory-efficient"):
        with pytest.raises(ValueError, match="--merge-method legacy.*hellora export --format merged"):
            Merged(adapter="hellora", merge_method=lossy)
    raw = {"adapter": "hellora", "hellora_k": 2}  # the raw YAML dict the plugin sees at register()
    load_plugin().register(raw)
    assert raw["merge_method"] == "legacy"
    assert axo.HELLoRAArgs(hellora_k=2).hellora_k == 2  # standalone use (hellora_args) is unchanged


def test_example_config_has_valid_plugin_keys():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(CONFIG_YAML.read_text())
    assert axo.PLUGIN_PATH in config["plugins"] and config["adapter"] == axo.ADAPTER
    args = axo.hellora_args(config)
    assert args.hellora_k == 8 and args.hellora_profile_mode == "lora_warmup"
    axo.lora_config_from_cfg(config)


def test_against_real_axolotl_schema(tmp_path):
    """Runs only where Axolotl imports (a separate venv): real PluginManager and config schema."""
    pytest.importorskip("axolotl.integrations.config")
    yaml = pytest.importorskip("yaml")
    from axolotl.integrations.base import PluginManager
    from axolotl.integrations.config import merge_input_args

    vars(axo).pop("HELLoRAPlugin", None)
    manager = PluginManager.get_instance()
    manager.register(axo.PLUGIN_PATH)
    assert manager.supports_adapter("hellora")
    _, input_config = merge_input_args()
    raw = yaml.safe_load(CONFIG_YAML.read_text())
    parsed = input_config(**raw)
    assert parsed.adapter == "hellora" and parsed.hellora_k == 8
    assert parsed.merge_method == "legacy"  # axolotl merge-lora takes the exact path
    with pytest.raises(ValueError):
        input_config(**{**raw, "hellora_warmup_fraction": 0})
    settings = DictDefault({**cfg(tmp_path), "hellora_profile_mode": "forward"})
    plugin = manager.plugins[axo.PLUGIN_PATH]
    plugin.training_dataset = lambda _cfg: tokenized_rows()
    peft_model, _ = manager.load_adapter(tiny_model(), settings)
    assert isinstance(peft_model, PeftModel) and all(len(v) == 2 for v in hot_map_from_model(peft_model).values())


# ---------------------------------------------------------------------------- issue 19 item 13 (Axolotl part)
PLUGIN_LOGGER = "axolotl.integrations.hellora"


def test_profiling_is_logged_on_axolotls_logger(fake_axolotl, tmp_path, caplog):
    """The review saw ~45 s of profiling with no line from the plugin."""
    caplog.set_level(logging.INFO, logger=PLUGIN_LOGGER)
    load_plugin().load_adapter(tiny_model(), cfg(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.name == PLUGIN_LOGGER]
    assert any(line.startswith("HELLoRA: profiling routing (forward) on 12 warm-up rows of 24") for line in lines), lines
    assert any("hot experts chosen in" in line and "2 per layer" in line and "hellora_profile.json" in line
               for line in lines), lines


@pytest.mark.parametrize("resume", [{"resume_from_checkpoint": "checkpoint-3"}, {"auto_resume_from_checkpoints": True}])
def test_resume_reuses_the_saved_profile_instead_of_profiling_again(fake_axolotl, tmp_path, caplog, resume):
    """The review: on --resume-from-checkpoint the plugin re-profiled (about 14 s); Axolotl's checkpoints hold no
    profile, the run's own output_dir/hellora_profile.json does."""
    first, _ = load_plugin().load_adapter(tiny_model(), cfg(tmp_path))
    (tmp_path / "out" / "checkpoint-3").mkdir()
    caplog.set_level(logging.INFO, logger=PLUGIN_LOGGER)
    again, _ = load_plugin().load_adapter(tiny_model(), cfg(tmp_path, **resume))
    assert len(fake_axolotl) == 1  # the old code read the training set and profiled again
    assert hot_map_from_model(again) == hot_map_from_model(first)
    assert "resuming: reusing the routing profile and hot experts" in caplog.text


def test_resume_without_a_saved_profile_profiles_again_and_says_so(fake_axolotl, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=PLUGIN_LOGGER)
    load_plugin().load_adapter(tiny_model(), cfg(tmp_path, resume_from_checkpoint="checkpoint-3"))
    assert len(fake_axolotl) == 1 and "is missing: profiling again" in caplog.text


# ------------------------------------------------------------------------------------------------- rl: dpo / grpo
# What Axolotl's RL path does with a plugin, as read from its source (axolotl-ai-cloud/axolotl):
# * src/axolotl/loaders/model.py, ModelLoader._load_adapters: for rl dpo/ipo/kto with an adapter it calls load_lora(...,
#   config_only=True) directly (no plugin load_adapter) and keeps the bare model; for grpo it calls load_adapter,
#   which asks plugins first. ModelLoader.load then calls post_model_load(cfg, model) on every plugin.
# * src/axolotl/core/builders/rl.py, HFRLTrainerBuilder._get_trainer_cls: with plugins, a non-None
#   get_trainer_cls(cfg) is used with NO positional arguments; build() then calls
#   trainer_cls(args=..., train_dataset=..., callbacks=..., processing_class=..., peft_config=... (not for grpo)).
def axolotl_rl_run(plugin, settings, model, **trainer_kwargs):
    """The stand-in of that path: model loading hooks, then the builder's call of the plugin's trainer class."""
    if axo.rl_kind(settings) == "grpo":
        model, _ = plugin.load_adapter(model, settings)  # what load_adapter returns becomes the model
    plugin.post_model_load(settings, model)
    trainer_cls = plugin.get_trainer_cls(settings)
    return trainer_cls(**trainer_kwargs)


def rl_settings(tmp_path, rl, **overrides):
    return cfg(tmp_path, rl=rl, lora_target_modules=["q_proj", "v_proj"], **overrides)


def rl_args(tmp_path, config_class, **extra):
    """Axolotl's own DPO/GRPO config class: the TRL config plus Axolotl fields (one stands in for them here)."""
    axolotl_config = dataclass(type("AxolotlConfig", (config_class,), {"__annotations__": {"axolotl_extra": int},
                                                                         "axolotl_extra": 1}))
    return axolotl_config(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, **extra)


def test_rl_dpo_builds_a_hellora_dpo_trainer_from_the_hooks(fake_axolotl, tmp_path):
    from transformers import TrainerCallback
    from trl import DPOConfig

    from hellora_trl.recipes.offline import build_tokenizer
    from hellora_trl.rl_trainers import HELLoRADPOConfig, HELLoRADPOTrainer

    plugin = load_plugin()
    settings = rl_settings(tmp_path, "dpo")
    pairs = Dataset.from_dict({"prompt": ["1+1=", "2+2=", "3+3=", "4+4="], "chosen": [" 2", " 4", " 6", " 8"],
                               "rejected": [" 3", " 5", " 7", " 9"]})
    callback = TrainerCallback()
    trainer = axolotl_rl_run(
        plugin, settings, tiny_model(), args=rl_args(tmp_path, DPOConfig, max_length=64), train_dataset=pairs,
        callbacks=[callback], processing_class=build_tokenizer(), eval_dataset=None,
        peft_config=object(),  # Axolotl's plain LoraConfig from load_lora: replaced by the lora_* keys' shape
    )
    assert isinstance(trainer, HELLoRADPOTrainer) and isinstance(trainer.args, HELLoRADPOConfig)
    assert trainer.args.hellora_k == 2 and trainer.args.max_steps == 1 and callback in trainer.callback_handler.callbacks
    assert trainer.hellora_peft_config.r == 4 and set(trainer.hellora_peft_config.target_modules) == {"q_proj", "v_proj"}
    assert not fake_axolotl  # the SFT profiling route (load_datasets) was not taken
    trainer.train()
    assert all(len(ids) == 2 for ids in trainer.hot_experts.values())
    assert (tmp_path / "out" / axo.PROFILE_FILE).is_file()


def test_rl_grpo_keeps_the_bare_model_and_takes_axolotls_reward_functions(fake_axolotl, tmp_path, monkeypatch):
    from trl import GRPOConfig

    from hellora_trl.recipes.offline import build_tokenizer
    from hellora_trl.rl_trainers import HELLoRAGRPOTrainer

    def length_reward(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]

    grpo = types.ModuleType("axolotl.core.trainers.grpo")

    class GRPOStrategy:  # Axolotl resolves trl.reward_funcs into one positional list
        @classmethod
        def set_trainer_args(cls, cfg):
            return [[length_reward]] if cfg.trl and cfg.trl.get("reward_funcs") else []

        @classmethod
        def set_trainer_kwargs(cls, cfg):
            return {}

    grpo.GRPOStrategy = GRPOStrategy
    for name in ("axolotl.core", "axolotl.core.trainers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "axolotl.core.trainers.grpo", grpo)
    plugin = load_plugin()
    model = tiny_model()
    settings = rl_settings(tmp_path, "grpo", trl={"reward_funcs": ["rewards.length_reward"]})
    kwargs = dict(args=rl_args(tmp_path, GRPOConfig, num_generations=2, max_completion_length=4),
                  train_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+2=", "3+3=", "4+4="]}),
                  callbacks=[], processing_class=build_tokenizer())
    trainer = axolotl_rl_run(plugin, settings, model, **kwargs)
    assert isinstance(trainer, HELLoRAGRPOTrainer) and trainer.model is model  # no adapter before profiling
    assert trainer.reward_funcs == [length_reward]
    trainer.train()
    assert isinstance(trainer.model, PeftModel) and all(len(ids) == 2 for ids in trainer.hot_experts.values())
    assert not fake_axolotl
    bare = rl_settings(tmp_path / "b", "grpo")
    fresh = load_plugin()
    with pytest.raises(ValueError, match="trl.reward_funcs"):
        axolotl_rl_run(fresh, bare, tiny_model(), **{**kwargs, "args": rl_args(tmp_path / "b", GRPOConfig,
                                                                              num_generations=2)})


@pytest.mark.parametrize("rl", ["kto", "orpo", "simpo"])
def test_rl_kinds_without_a_hellora_trainer_are_refused(fake_axolotl, tmp_path, rl):
    plugin = load_plugin()
    with pytest.raises(ValueError, match=f"rl: {rl} has no HELLoRA trainer"):
        plugin.get_trainer_cls(rl_settings(tmp_path, rl))
    assert plugin.get_trainer_cls(cfg(tmp_path)) is None  # SFT: Axolotl's own trainer


def test_rl_trainer_without_a_loaded_model_says_what_is_missing(fake_axolotl, tmp_path):
    from trl import DPOConfig

    plugin = load_plugin()
    trainer_cls = plugin.get_trainer_cls(rl_settings(tmp_path, "dpo"))
    with pytest.raises(ValueError, match="did not call post_model_load"):
        trainer_cls(args=rl_args(tmp_path, DPOConfig), train_dataset=None)
