"""HELLoRATrainer on CUDA: 10 steps in bf16 with gradient checkpointing; the loss falls, cold experts and every base
weight stay bit-identical, and the adapter saves, reloads and merges to the same logits (gpu marker)."""

import pytest
import torch

from hellora_trl import find_moe_layers, load_hellora
from hellora_trl.config import HELLoRAConfig
from hellora_trl.recipes.data import synthetic_gsm8k
from hellora_trl.recipes.offline import build_tokenizer
from hellora_trl.trainer import HELLoRATrainer

from testing_utils import gpu_test_device, requires_gpu, tiny_model

pytestmark = [pytest.mark.gpu, requires_gpu]


def base_weights(model) -> dict[str, torch.Tensor]:
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_ten_bf16_steps_with_gradient_checkpointing(tmp_path):
    from hellora_trl import default_lora_config

    device = gpu_test_device()
    tokenizer = build_tokenizer()
    model = tiny_model("olmoe", dtype=torch.bfloat16)  # a bf16 base, float32 adapters (PEFT's autocast_adapter_dtype)
    before = {n: p.to(device) for n, p in base_weights(model).items()}
    args = HELLoRAConfig(
        output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=device == "cpu", bf16=True,
        gradient_checkpointing=True, max_length=96, seed=0, disable_tqdm=True, hellora_k=2,
        hellora_profile_mode="forward", hellora_warmup_fraction=0.25, hellora_plots=False,
    )
    trainer = HELLoRATrainer(model=model, args=args, train_dataset=synthetic_gsm8k(80, seed=0),
                             processing_class=tokenizer, peft_config=default_lora_config(r=8, lora_alpha=16))
    trainer.train()
    assert next(trainer.model.parameters()).device.type == device
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 10 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    # cold experts and every base weight bit-identical; the hot factors are float32 and trained
    after = base_weights(trainer.model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    factors = {n: p for n, p in trainer.model.named_parameters() if "experts.lora_" in n}
    assert factors and all(p.dtype == torch.float32 for p in factors.values())
    assert any(p.abs().sum() > 0 for n, p in factors.items() if "lora_down_B" in n)
    # save -> reload on a fresh base: the same logits bit for bit; merged: the same up to bf16 rounding of W + BA.
    # Every forward under the bf16 autocast that accelerate wraps around the trained model's forward.
    trainer.save_model()
    trained = trainer.model.eval()
    ids = tokenizer("Tom has 3 apples and buys 4 more.", return_tensors="pt")["input_ids"].to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        expected = trained(input_ids=ids).logits.float()
    loaded = load_hellora(tiny_model("olmoe", dtype=torch.bfloat16).to(device), tmp_path / "run").eval()
    assert sorted(loaded.get_base_model().get_submodule(l.name).hot_experts()
                  for l in find_moe_layers(loaded.get_base_model())) == sorted(trainer.hot_experts.values())
    with torch.no_grad(), autocast:
        assert torch.equal(loaded(input_ids=ids).logits.float(), expected)
        merged = loaded.merge_and_unload()
        merged_logits = merged(input_ids=ids).logits.float()
    err = (merged_logits - expected).abs().max().item()
    assert err <= 5e-2 * expected.abs().max().item(), err
    assert (merged_logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
