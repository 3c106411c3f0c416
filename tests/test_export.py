"""Exports: the PEFT ``target_parameters`` layout loads with stock PEFT, the merged checkpoint with vanilla
transformers, and both reproduce the HELLoRA model's logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, OlmoeConfig

from hellora_trl import apply_hellora, default_lora_config, find_moe_layers
from hellora_trl.export import (
    ExportError,
    adapter_size_report,
    export_peft_target_parameters,
    merge_adapter,
)
from hellora_trl.recipes.offline import tiny_moe_config

from testing_utils import random_batch, tiny_model
from modulelist_model import LegacyMoEConfig, LegacyMoEForCausalLM
from testing_utils import randomize_factors

ATOL = 1e-5
HOT = (0, 3)


def hellora_model(family="olmoe", hot=HOT, r=4, alpha=8, **kwargs):
    model = tiny_model(family)
    hot_map = {layer.name: list(hot) for layer in find_moe_layers(model)}
    config_kwargs = {k: kwargs.pop(k) for k in ("use_rslora", "target_modules") if k in kwargs}
    peft_model = apply_hellora(model, hot_map, default_lora_config(r=r, lora_alpha=alpha, **config_kwargs), **kwargs)
    randomize_factors(peft_model, std=0.1)
    return peft_model.eval(), hot_map


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def saved(tmp_path, peft_model, name="adapter") -> Path:
    peft_model.save_pretrained(tmp_path / name)
    return tmp_path / name


def assert_stock_peft_only(model):
    """No hellora_trl layer in the loaded model: every adapter layer is PEFT's own."""
    kinds = {type(m).__module__ for m in model.modules() if hasattr(m, "lora_A")}
    assert kinds and all(k.startswith("peft.") for k in kinds), kinds


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe", "deepseek_v3"])
def test_peft_export_loads_with_stock_peft_and_matches(tmp_path, family):
    peft_model, _ = hellora_model(family)
    batch = random_batch(peft_model)
    expected = logits(peft_model, batch)
    out = export_peft_target_parameters(tiny_model(family), saved(tmp_path, peft_model), tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] and config["peft_type"] == "LORA"
    loaded = PeftModel.from_pretrained(tiny_model(family), out).eval()
    assert_stock_peft_only(loaded)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=ATOL)
    base = logits(tiny_model(family).eval(), batch)
    assert (expected - base).abs().max() > 1e-3  # the adapter does something, so the match above means something


@pytest.mark.parametrize(
    "kwargs",
    [
        {"components": "experts"},  # no target_modules at all
        {"fuse_gate_up": True},  # gate_up already one pair: rank r, no rank_pattern
        {"use_rslora": True},  # alpha/sqrt(r) scaling folded into B
        {"components": "router", "hot": (1, 2, 7)},
    ],
)
def test_peft_export_variants(tmp_path, kwargs):
    hot = kwargs.pop("hot", HOT)
    peft_model, _ = hellora_model("olmoe", hot=hot, **kwargs)
    batch = random_batch(peft_model)
    expected = logits(peft_model, batch)
    out = export_peft_target_parameters(peft_model, None, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(tiny_model("olmoe"), out).eval()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=ATOL)


def test_peft_export_zero_cold_experts_and_layout(tmp_path):
    peft_model, hot_map = hellora_model("olmoe", hot=(2, 5), r=4)
    out = export_peft_target_parameters(peft_model, None, tmp_path / "peft")
    weights = load_file(out / "adapter_model.safetensors")
    num_experts, r = 8, 4
    gate_up_a = weights["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"]
    gate_up_b = weights["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"]
    down_a = weights["base_model.model.model.layers.0.mlp.experts.lora_A.weight"]
    assert gate_up_a.shape == (num_experts * 2 * r, 64)  # separate gate/up -> one rank-2r pair
    assert down_a.shape == (num_experts * r, 32)
    per_expert_a = down_a.reshape(num_experts, r, -1).abs().sum(dim=(1, 2))
    assert (per_expert_a[[2, 5]] > 0).all() and per_expert_a[[0, 1, 3, 4, 6, 7]].eq(0).all()
    per_expert_b = gate_up_b.reshape(gate_up_b.shape[0], 2 * r, num_experts).abs().sum(dim=(0, 1))
    assert (per_expert_b[[2, 5]] > 0).all() and per_expert_b[[0, 1, 3, 4, 6, 7]].eq(0).all()
    assert "base_model.model.model.layers.0.mlp.gate.lora_A.weight" in weights
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["hellora_hot_experts"]) == hot_map
    assert not any("hot_experts" in k for k in weights)


def test_peft_export_modulelist_layout(tmp_path):
    torch.manual_seed(0)
    model = LegacyMoEForCausalLM(LegacyMoEConfig()).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hot_map = {layer.name: [1, 4] for layer in find_moe_layers(model)}
    peft_model = apply_hellora(model, hot_map, default_lora_config(r=4, lora_alpha=8)).eval()
    randomize_factors(peft_model, std=0.1)
    batch = {"input_ids": torch.randint(0, 64, (2, 7))}
    expected = logits(peft_model, batch)
    out = export_peft_target_parameters(peft_model, None, tmp_path / "peft")
    fresh = LegacyMoEForCausalLM(LegacyMoEConfig())
    fresh.load_state_dict(state)
    loaded = PeftModel.from_pretrained(fresh, out).eval()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=ATOL)


def test_peft_export_is_loadable_without_hellora_imported(tmp_path):
    """The real claim: a separate interpreter with only transformers + PEFT reproduces our logits."""
    peft_model, _ = hellora_model("olmoe")
    batch = random_batch(peft_model)
    torch.save({"batch": batch, "logits": logits(peft_model, batch)}, tmp_path / "expected.pt")
    tiny_model("olmoe").save_pretrained(tmp_path / "base")
    export_peft_target_parameters(peft_model, None, tmp_path / "peft")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        "d = sys.argv[1]\n"
        "m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d + '/base'), d + '/peft').eval()\n"
        "e = torch.load(d + '/expected.pt')\n"
        "with torch.no_grad():\n"
        "    got = m(**e['batch']).logits\n"
        "assert not any(k.startswith('hellora') for k in sys.modules), 'hellora_trl was imported'\n"
        "print('maxdiff', (got - e['logits']).abs().max().item())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split("maxdiff")[-1]) < ATOL


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_merged_export_loads_with_vanilla_transformers(tmp_path, family):
    peft_model, _ = hellora_model(family)
    batch = random_batch(peft_model)
    expected = logits(peft_model, batch)
    out = merge_adapter(tiny_model(family), saved(tmp_path, peft_model), tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=0, atol=ATOL)
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())  # no temp dir left behind


def test_merge_from_a_base_path_copies_the_tokenizer(tmp_path):
    from hellora_trl.recipes.offline import build_tokenizer

    peft_model, _ = hellora_model("olmoe")
    batch = random_batch(peft_model)
    expected = logits(peft_model, batch)
    tiny_model("olmoe").save_pretrained(tmp_path / "base")
    build_tokenizer().save_pretrained(tmp_path / "base")
    out = merge_adapter(str(tmp_path / "base"), saved(tmp_path, peft_model), tmp_path / "merged")
    assert (out / "tokenizer_config.json").is_file()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out).eval(), batch), expected, rtol=0, atol=ATOL)
    # A base without tokenizer files: warn, and write no placeholder tokenizer (transformers would make one up).
    tiny_model("olmoe").save_pretrained(tmp_path / "bare")
    with pytest.warns(UserWarning, match="no tokenizer files"):
        bare = merge_adapter(str(tmp_path / "bare"), tmp_path / "adapter", tmp_path / "merged_bare")
    assert not any(bare.glob("tokenizer*"))


def test_output_dir_is_not_clobbered_and_overwrite_replaces(tmp_path):
    peft_model, _ = hellora_model("olmoe")
    adapter = saved(tmp_path, peft_model)
    out = tmp_path / "peft"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_peft_target_parameters(tiny_model("olmoe"), adapter, out)
    assert (out / "keep.txt").read_text() == "user data"
    export_peft_target_parameters(tiny_model("olmoe"), adapter, out, overwrite=True)
    assert (out / "adapter_config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "peft"]


def test_clear_errors_for_bad_input(tmp_path):
    peft_model, _ = hellora_model("olmoe")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        export_peft_target_parameters(tiny_model("olmoe"), tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="adapter_dir is required"):
        merge_adapter(tiny_model("olmoe"), None, tmp_path / "out")
    with pytest.raises(ValueError, match="already a PeftModel"):
        export_peft_target_parameters(peft_model, tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="not found"):
        export_peft_target_parameters(peft_model, None, tmp_path / "out", adapter_name="other")
    with pytest.raises(TypeError, match="base_model"):
        merge_adapter(42, tmp_path, tmp_path / "out")
    # A stock PEFT whole-stack adapter is not a HELLoRA adapter: no silent pass-through.
    plain = get_peft_model(tiny_model("olmoe"), LoraConfig(r=2, target_parameters=["experts.down_proj"]))
    with pytest.raises(ExportError, match="ParamWrapper"):
        export_peft_target_parameters(plain, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_size_report_matches_files_and_olmoe_numbers(tmp_path):
    peft_model, _ = hellora_model("olmoe", r=4)
    compact = load_file(saved(tmp_path, peft_model) / "adapter_model.safetensors")
    exported = load_file(export_peft_target_parameters(peft_model, None, tmp_path / "peft") / "adapter_model.safetensors")
    report = adapter_size_report(tiny_moe_config("olmoe"), k=2, r=4)
    assert report["compact"] == sum(v.numel() for k, v in compact.items() if "hot_experts" not in k)
    assert report["peft_target_parameters"] == sum(v.numel() for v in exported.values())
    # OLMoE-1B-7B (hidden 2048, 64 experts of 1024, 16 layers), k=8, r=32, computed by hand:
    # per layer: attention 4*32*(2048+2048) + router 32*(2048+64) + 8 hot * 3 * 32*(2048+1024).
    olmoe = adapter_size_report(OlmoeConfig(intermediate_size=1024), k=8, r=32)
    per_layer = 4 * 32 * 4096 + 32 * 2112 + 8 * 3 * 32 * 3072
    assert olmoe["compact"] == 16 * per_layer == 47_218_688
    # PEFT: every expert, gate_up as one rank-64 pair (64*(2048+2048)) plus down 32*(1024+2048).
    assert olmoe["peft_target_parameters"] == 16 * (4 * 32 * 4096 + 32 * 2112 + 64 * (64 * 4096 + 32 * 3072))
    assert 6.9e9 < olmoe["merged_model"] < 7.0e9


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
@pytest.mark.parametrize("kind", ["merge", "peft"])
def test_output_dir_overlapping_the_inputs_is_refused_even_with_overwrite(tmp_path, where, kind):
    """Issue 13 / review 7.29: `merge --output_dir <adapter dir> --overwrite` deleted the adapter and checkpoints."""
    peft_model, _ = hellora_model("olmoe")
    run = tmp_path / "run"
    adapter = saved(run, peft_model, name="checkpoint-5")
    (run / "hellora_summary.json").write_text("{}")
    out = {"same": adapter, "parent": run, "inside": adapter / "merged"}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    export = merge_adapter if kind == "merge" else export_peft_target_parameters
    with pytest.raises(ValueError, match="would delete the input"):
        export(tiny_model("olmoe"), adapter, out, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_output_dir_holding_a_base_model_path_is_refused(tmp_path):
    peft_model, _ = hellora_model("olmoe")
    adapter = saved(tmp_path, peft_model)
    base = tmp_path / "models" / "base"
    tiny_model("olmoe").save_pretrained(base)
    with pytest.raises(ValueError, match="contains the input"):
        merge_adapter(str(base), adapter, tmp_path / "models", overwrite=True)
    assert (base / "config.json").is_file()
