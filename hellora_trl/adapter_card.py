"""What a saved HELLoRA adapter says about itself: a ``hellora`` block in ``adapter_config.json`` and a model card.

A HELLoRA adapter looks like a stock PEFT LoRA (``peft_type: LORA``) but is not one: its expert factors are in
hellora_trl's compact hot-expert layout, so stock ``PeftModel.from_pretrained`` fails on the experts module. Every
``save_pretrained`` of a HELLoRA model (the adapter-state saver calls :meth:`AdapterCard.save`) therefore adds:

* to ``adapter_config.json``, a ``hellora`` block (:data:`CONFIG_KEY`): format, version, the hot map and how to load
  or export. :func:`hellora_trl.load_hellora` reads it (:func:`check_block`): a newer format or a hot map that
  disagrees with the weights is refused. Stock PEFT ignores unknown keys with a warning that names ``hellora``.
* to ``README.md``, ``library_name: hellora-trl``, the ``hellora`` tag and a section with the hot-map summary and
  how to load it (``load_hellora``) or turn it into a stock-PEFT or merged checkpoint (``hellora export``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .utils import atomic_write_text

CONFIG_KEY = "hellora"
CARD_FORMAT = "hellora_trl.compact_adapter"
CARD_FORMAT_VERSION = 1
LIBRARY_NAME = "hellora-trl"
TAGS = ("hellora", "hot-expert-lora", "mixture-of-experts")
SECTION_START, SECTION_END = "<!-- hellora:start -->", "<!-- hellora:end -->"

# PEFT's LoraConfig does not know the block: it drops it with an "upgrade PEFT" warning. hellora_trl reads the block
# itself, so in processes that import hellora_trl that warning is noise; without hellora_trl it names 'hellora'.
PEFT_WARNING = r"Unexpected keyword arguments \['hellora'\]"
warnings.filterwarnings("ignore", message=PEFT_WARNING, category=UserWarning)


def read_lora_config(directory: str | os.PathLike):
    """``LoraConfig.from_pretrained`` of a saved HELLoRA adapter, without PEFT's warning about the hellora block."""
    from peft import LoraConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_WARNING, category=UserWarning)
        return LoraConfig.from_pretrained(str(directory))


def _hot_summary(hot: Mapping[str, list[int]], num_experts: int) -> dict[str, Any]:
    sizes = [len(ids) for ids in hot.values()]
    return {
        "moe_layers": len(hot),
        "num_experts": num_experts,
        "hot_per_layer": [min(sizes), max(sizes)] if sizes else [0, 0],
        "expert_adapters": sum(sizes),
    }


def load_instructions(base: str | None) -> dict[str, str]:
    base = base or "<base model>"
    return {
        "load_with": f"hellora_trl.load_hellora(AutoModelForCausalLM.from_pretrained({base!r}), <this folder>)",
        "export_peft": f"hellora export --format peft --model_name_or_path {base} --adapter <this folder> "
                       "--output_dir <peft folder>",
        "export_merged": f"hellora export --format merged --model_name_or_path {base} --adapter <this folder> "
                         "--output_dir <merged folder>",
    }


@dataclass
class AdapterCard:
    """The adapter-state entry (:mod:`hellora_trl.adapter_state`) that describes one HELLoRA adapter when saved."""

    hot_experts: dict[str, list[int]]
    num_experts: int

    def changeable_entries(self) -> dict:
        return {}  # describes the adapter; changes no trainable entry

    def block(self, base: str | None) -> dict[str, Any]:
        return {
            "format": CARD_FORMAT,
            "format_version": CARD_FORMAT_VERSION,
            "note": "Not a stock PEFT LoRA: the expert factors use hellora_trl's compact hot-expert layout. Load "
                    "with hellora_trl.load_hellora, or export with `hellora export --format peft|merged`.",
            **load_instructions(base),
            "summary": _hot_summary(self.hot_experts, self.num_experts),
            "hot_experts": {name: list(ids) for name, ids in self.hot_experts.items()},
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Add the ``hellora`` block to ``adapter_config.json`` and the HELLoRA section to ``README.md``."""
        directory = Path(directory)
        config_path = directory / "adapter_config.json"
        if not config_path.is_file():
            return
        config = json.loads(config_path.read_text())
        base = config.get("base_model_name_or_path")
        config[CONFIG_KEY] = self.block(base)
        atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_model_card(directory, self.block(base))


def _front_matter(text: str) -> tuple[dict[str, Any], str]:
    import yaml

    match = re.match(r"\A---\n(.*?)\n---\n?", text, flags=re.S)
    if not match:
        return {}, text
    data = yaml.safe_load(match.group(1)) or {}
    return (data if isinstance(data, dict) else {}), text[match.end():]


def card_section(block: Mapping[str, Any]) -> str:
    summary = block["summary"]
    low, high = summary["hot_per_layer"]
    per_layer = f"{low}" if low == high else f"{low}-{high}"
    lines = [
        SECTION_START,
        "## HELLoRA adapter (hellora_trl)",
        "",
        "This is a HELLoRA hot-expert LoRA, **not a stock PEFT LoRA**: LoRA on attention/router plus adapters on the "
        f"hot experts only ({per_layer} of {summary['num_experts']} experts in each of {summary['moe_layers']} MoE "
        f"layers, {summary['expert_adapters']} expert adapters), stored in hellora_trl's compact layout. Stock "
        "`PeftModel.from_pretrained` / `AutoPeftModelForCausalLM` fail on it (`Target module ...Experts(...) is "
        "not supported`).",
        "",
        "Load it with hellora_trl (`pip install hellora-trl`):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from hellora_trl import load_hellora",
        "",
        f"model = {block['load_with'].removeprefix('hellora_trl.')}",
        "```",
        "",
        "or turn it into a stock-PEFT adapter or a plain merged checkpoint (exact):",
        "",
        "```bash",
        block["export_peft"],
        block["export_merged"],
        "```",
        "",
        f"The hot map per layer is in `adapter_config.json` under `{CONFIG_KEY}.hot_experts`.",
        SECTION_END,
    ]
    return "\n".join(lines)


def write_model_card(directory: str | os.PathLike, block: Mapping[str, Any]) -> Path:
    """Tag ``README.md`` as HELLoRA (library ``hellora-trl``, tag ``hellora``) and add or replace its HELLoRA
    section; the rest of the card (PEFT's or TRL's) is kept."""
    import yaml

    path = Path(directory) / "README.md"
    data, body = _front_matter(path.read_text() if path.is_file() else "")
    data["library_name"] = LIBRARY_NAME
    tags = [t for t in (data.get("tags") or []) if isinstance(t, str)]
    data["tags"] = tags + [t for t in TAGS if t not in tags]
    section = card_section(block)
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END), flags=re.S)
    if pattern.search(body):
        body = pattern.sub(lambda _: section, body)
    else:
        body = section + "\n\n" + body.lstrip("\n")
    front = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return atomic_write_text(path, f"---\n{front}---\n\n{body.rstrip()}\n")


def read_block(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``hellora`` block of a saved adapter's ``adapter_config.json`` (None: saved before it existed)."""
    path = Path(directory) / "adapter_config.json"
    try:
        block = json.loads(path.read_text()).get(CONFIG_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return block if isinstance(block, dict) else None


def check_block(directory: str | os.PathLike, hot: Mapping[str, list[int]] | None = None) -> dict[str, Any] | None:
    """What :func:`hellora_trl.load_hellora` reads: refuse a block of a newer format, or (given the hot map read
    from the weights) one whose hot map disagrees with them."""
    block = read_block(directory)
    if block is None:
        return None
    version = block.get("format_version", CARD_FORMAT_VERSION)
    if not isinstance(version, int) or version > CARD_FORMAT_VERSION:
        raise ValueError(
            f"{directory}: adapter_config.json's '{CONFIG_KEY}' block has format_version {version!r}; this "
            f"hellora_trl reads up to {CARD_FORMAT_VERSION} (upgrade hellora-trl)."
        )
    stored = block.get("hot_experts")
    if hot is not None and isinstance(stored, dict):
        stored = {name: sorted(int(e) for e in ids) for name, ids in stored.items()}
        current = {name: sorted(int(e) for e in ids) for name, ids in hot.items()}
        if stored != current:
            raise ValueError(
                f"{directory}: the hot map in adapter_config.json ('{CONFIG_KEY}.hot_experts') differs from the one "
                "in the adapter weights; the folder mixes files of two saves. Save the adapter again."
            )
    return block
