"""Integrations of HELLoRA into other training frameworks.

* :mod:`hellora_trl.integrations.axolotl` -- an Axolotl plugin (``adapter: hellora``); Axolotl is imported
  only when the plugin class is first used.
"""

from .profiling import lora_warmup_profile, padded_batches

__all__ = ["lora_warmup_profile", "padded_batches"]
