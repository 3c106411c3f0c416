"""HELLoRA SFT on GSM8K: profile routing, adapt the hot experts only, train, evaluate.

With no arguments it runs the embedded offline default: the lab model (a small OLMoE pretrained in-project on a
generated multi-domain corpus, cached after the first run) fine-tuned on generated arithmetic problems it never
saw, with base vs adapted numbers in the summary (minutes on 2 CPU cores), and writes everything to outputs/.

    accelerate launch examples/sft_gsm8k.py --config configs/<recipe>.yaml [--any_HELLoRAConfig_field value]

Every field of TRL's SFTConfig, HELLoRAConfig (hellora_*) and ModelConfig (model_name_or_path, lora_r...) is
accepted on the command line or in the YAML; `--help` lists them. The same script is `hellora train`.

Outputs in --output_dir: the adapter, hellora_profile.json (profile + hot experts), the figures,
eval/results.{json,md} and hellora_summary.json.
"""

import os

from hellora_trl import HELLoRATrainer
from hellora_trl.distributed import end_distributed
from hellora_trl.recipes.sft import (
    build_model_and_tokenizer,
    evaluate_and_write,
    lab_baseline,
    load_task_data,
    lora_config_from,
    parse_args,
    resume_checkpoint,
)


def main(script_args, training_args, model_args):
    # Model and data: a checkpoint (--model_name_or_path) or the cached lab model (pretrained in-project on first
    # use); GSM8K, or generated arithmetic problems held out by content (answers and calculator steps)
    model, tokenizer = build_model_and_tokenizer(model_args, training_args, script_args.lab_recipe)
    train_dataset, held_out = load_task_data(script_args, seed=training_args.seed)

    # The trainer profiles routing (LoRA warm-up), selects the hot experts, attaches HELLoRA and trains
    trainer = HELLoRATrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config_from(model_args),
    )
    lab = lab_baseline(trainer, tokenizer, script_args, held_out, model_args)  # lab model: base numbers first
    output = trainer.train(resume_from_checkpoint=resume_checkpoint(training_args.resume_from_checkpoint))

    # Held-out accuracy on every rank (sharded), then eval/results.{json,md} and hellora_summary.json
    evaluate_and_write(trainer, tokenizer, script_args, held_out, output.metrics, lab)
    trainer.save_model(training_args.output_dir)  # last: it clears the folder's in-progress marker


if __name__ == "__main__":
    script_args, training_args, model_args = parse_args(task="gsm8k")
    os.makedirs(training_args.output_dir, exist_ok=True)
    try:
        main(script_args, training_args, model_args)
    finally:
        end_distributed()  # multi-process runs exit cleanly (barrier + destroy_process_group)
