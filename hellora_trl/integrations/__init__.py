"""Integrations of HELLoRA into other training frameworks.

* :mod:`hellora_trl.integrations.axolotl` -- an Axolotl plugin (``adapter: hellora``); Axolotl is imported
  only when the plugin class is first used;
* :mod:`hellora_trl.integrations.warmup` -- the LoRA warm-up profile for frameworks that own the training loop.
"""
