"""One rank of the effective-batch test: parse a shipped recipe YAML under `accelerate launch` and write what this
rank will train with to ``<out>/rank<i>.json`` (a file per rank: nothing to untangle from interleaved stdout)."""

import json
import sys
from pathlib import Path

from hellora_trl.recipes.sft import parse_args

if __name__ == "__main__":
    config, out = sys.argv[1], Path(sys.argv[2])
    script_args, training_args, _ = parse_args(
        ["--config", config, "--bf16", "false", "--use_cpu", "true", "--report_to", "none",
         "--output_dir", str(out / "run")]
    )
    record = {
        "process_index": training_args.process_index,
        "world_size": training_args.world_size,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "effective_batch_size": script_args.effective_batch_size,
    }
    (out / f"rank{training_args.process_index}.json").write_text(json.dumps(record))
