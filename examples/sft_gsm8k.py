"""HELLoRA SFT on GSM8K: profile routing, adapt the hot experts only, train, evaluate.

With no arguments it runs the embedded offline default (tiny OLMoE-architecture model, local tokenizer,
generated GSM8K-style problems; a few minutes on 2 CPU cores) and writes everything to outputs/.

    accelerate launch examples/sft_gsm8k.py --config configs/<recipe>.yaml [--any_HELLoRAConfig_field value]

Every field of TRL's SFTConfig, HELLoRAConfig (hellora_*) and ModelConfig (model_name_or_path, lora_r...) is
accepted on the command line or in the YAML; `--help` lists them.
"""

from hellora_trl.sft import main

if __name__ == "__main__":
    main(task="gsm8k")
