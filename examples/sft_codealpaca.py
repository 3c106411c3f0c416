"""HELLoRA SFT on codealpaca: profile routing, adapt the hot experts only, train, evaluate.

    accelerate launch examples/sft_codealpaca.py --config configs/<recipe>.yaml [--any_HELLoRAConfig_field value]

Every field of TRL's SFTConfig, HELLoRAConfig (hellora_*) and ModelConfig (model_name_or_path, lora_r...) is
accepted on the command line or in the YAML; `--help` lists them.
"""

from hellora_trl.recipes.sft import main

if __name__ == "__main__":
    main(task="codealpaca")
