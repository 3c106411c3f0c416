"""Profiling follows the run's settings (issue 19 item 13, part): the warm-up slice is capped by the rows a
max_steps run trains, and `trainer.model.print_trainable_parameters()` before train() explains itself."""

from __future__ import annotations

import pytest

from hellora_trl.config import HELLoRAConfig
from hellora_trl.recipes.data import synthetic_gsm8k
from hellora_trl.recipes.offline import build_tokenizer
from hellora_trl.profiling import warmup_indices, warmup_row_cap
from hellora_trl.trainer import ADAPTER_NOT_BUILT, HELLoRATrainer

from testing_utils import tiny_model


def test_row_cap_and_capped_indices():
    assert warmup_row_cap(-1, 8) is None and warmup_row_cap(None, 8) is None  # epochs decide: no cap
    assert warmup_row_cap(1, 8) == 8 and warmup_row_cap(3, 4) == 12
    capped = warmup_indices(200, 0.5, seed=0, max_rows=8)
    assert len(capped) == 8 and capped == sorted(capped) and capped == warmup_indices(200, 0.5, 0, max_rows=8)
    assert warmup_indices(200, 0.02, 0, max_rows=8) == warmup_indices(200, 0.02, 0)  # under the cap: unchanged


def trainer(tmp_path, **overrides):
    args = dict(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, save_strategy="no",
                report_to=[], use_cpu=True, max_length=96, seed=0, disable_tqdm=True, hellora_k=2,
                hellora_profile_mode="forward", hellora_warmup_fraction=0.5, hellora_plots=False)
    args.update(overrides)
    return HELLoRATrainer(model=tiny_model("olmoe"), args=HELLoRAConfig(**args),
                          train_dataset=synthetic_gsm8k(40, seed=0), processing_class=build_tokenizer(),
                          peft_config=None)


@pytest.mark.parametrize("mode", ["forward", "lora_warmup"])
def test_a_one_step_run_warms_up_on_one_steps_rows(tmp_path, mode):
    """Ecosystem review N5: a max_steps=1 run still trained 12 warm-up steps (all of a 24-row slice)."""
    profile = trainer(tmp_path, hellora_profile_mode=mode).run_profiling()
    assert profile.source["warmup_rows"] == 2 and profile.source["warmup_max_rows"] == 2  # 1 step x 2 rows
    profile = trainer(tmp_path / "acc", gradient_accumulation_steps=3, max_steps=2).run_profiling()
    assert profile.source["warmup_rows"] == 12  # 2 steps x 2 rows x 3 accumulation, under the 20-row slice
    profile = trainer(tmp_path / "epochs", max_steps=-1, num_train_epochs=1).run_profiling()
    assert profile.source["warmup_rows"] == 20 and profile.source["warmup_max_rows"] is None


def test_print_trainable_parameters_before_train_says_what_to_call(tmp_path, capsys):
    """Ecosystem review: `trainer.model.print_trainable_parameters()` raised AttributeError before train()."""
    t = trainer(tmp_path)
    t.model.print_trainable_parameters()
    t.print_trainable_parameters()
    out = capsys.readouterr().out
    assert out.count(ADAPTER_NOT_BUILT) == 2 and "after train()" in out
    t.train()
    t.print_trainable_parameters()
    assert "trainable params:" in capsys.readouterr().out  # PEFT's own summary once the adapter exists
