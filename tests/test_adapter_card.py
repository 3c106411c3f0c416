"""A saved HELLoRA adapter says what it is (issue 19 item 12): a `hellora` block in adapter_config.json that
load_hellora reads, and a model card tagged `hellora` with the hot-map summary and how to load or export it."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import yaml

from hellora_trl import apply_hellora, default_lora_config, find_moe_layers, load_hellora
from hellora_trl.adapter_card import CONFIG_KEY, read_block
from hellora_trl.recipes.offline import tiny_moe_model
from hellora_trl.recipes.models import OFFLINE_MODEL

HOT = [0, 3]


def base():
    return tiny_moe_model("olmoe", seed=42, **OFFLINE_MODEL)


@pytest.fixture()
def saved(tmp_path):
    model = base()
    peft_model = apply_hellora(model, {layer.name: HOT for layer in find_moe_layers(model)},
                               default_lora_config(r=2, lora_alpha=4))
    path = tmp_path / "adapter"
    peft_model.save_pretrained(path)
    peft_model.save_pretrained(path)  # a second save (as every checkpoint does) must not stack sections
    return path


def front_matter(text):
    return yaml.safe_load(text.split("---\n")[1])


def test_config_block_and_card(saved):
    block = json.loads((saved / "adapter_config.json").read_text())[CONFIG_KEY]
    layers = [layer.name for layer in find_moe_layers(base())]
    assert block["format"] == "hellora_trl.compact_adapter" and block["format_version"] == 1
    assert block["hot_experts"] == {name: HOT for name in layers}
    assert block["summary"] == {"moe_layers": len(layers), "num_experts": 16, "hot_per_layer": [2, 2],
                                "expert_adapters": 2 * len(layers)}
    assert "load_hellora" in block["load_with"] and "hellora export --format peft" in block["export_peft"]
    card = (saved / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "hellora-trl" and "hellora" in meta["tags"]
    assert card.count("## HELLoRA adapter (hellora_trl)") == 1
    assert "from hellora_trl import load_hellora" in card and "not a stock PEFT LoRA" in card
    assert "hellora export --format peft" in card and "2 of 16 experts in each of" in card


def test_load_hellora_reads_the_block(saved):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_hellora(base(), saved)
    assert not [w for w in caught if "Unexpected keyword arguments" in str(w.message)]
    config = json.loads((saved / "adapter_config.json").read_text())
    name = next(iter(config[CONFIG_KEY]["hot_experts"]))
    config[CONFIG_KEY]["hot_experts"][name] = [1, 2]
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="differs from the one in the adapter weights"):
        load_hellora(base(), saved)
    config[CONFIG_KEY]["format_version"] = 99
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 99.*upgrade hellora-trl"):
        load_hellora(base(), saved)
    del config[CONFIG_KEY]  # an adapter saved before the block existed still loads
    (saved / "adapter_config.json").write_text(json.dumps(config))
    assert read_block(saved) is None
    load_hellora(base(), saved)


def test_trainer_tags_its_card():
    from hellora_trl.trainer import HELLoRATrainer

    assert "hellora" in HELLoRATrainer._tag_names and {"trl", "sft"} <= set(HELLoRATrainer._tag_names)


STOCK = """
import sys
from peft import PeftModel
from transformers import AutoModelForCausalLM
assert "hellora_trl" not in sys.modules
try:
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2])
except Exception as err:
    print("stock PEFT failed:", type(err).__name__)
"""


@pytest.mark.slow  # a fresh interpreter loading transformers + PEFT: ~20 s on the CI box
def test_stock_peft_failure_names_the_block(saved, tmp_path):
    """Without hellora_trl, stock PEFT's failure comes with a warning naming the `hellora` key of the config."""
    base().save_pretrained(tmp_path / "base")
    proc = subprocess.run([sys.executable, "-c", STOCK, str(tmp_path / "base"), str(saved)], capture_output=True,
                          text=True, timeout=300)
    assert "stock PEFT failed" in proc.stdout, proc.stderr[-2000:]
    assert "Unexpected keyword arguments ['hellora']" in proc.stderr
