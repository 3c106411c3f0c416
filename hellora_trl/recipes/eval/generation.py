"""Generation backends: greedy completions with Hugging Face ``generate`` (sharded over ranks) or vLLM.

torch, accelerate and vLLM are imported inside the functions that use them, so the scoring modules of this
package load without them.
"""

from __future__ import annotations

import os
from typing import Sequence

__all__ = ["check_backend", "cut_at_stops", "generate_batched"]


def _require_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError("backend='vllm' needs vLLM, which is not installed: pip install vllm") from err
    return vllm


def check_backend(backend: str) -> None:
    """Fail early on an unknown backend, or on ``vllm`` when vLLM is not installed."""
    if backend not in ("hf", "vllm"):
        raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}")
    if backend == "vllm":
        _require_vllm()


def _chat_texts(tokenizer, prompts: Sequence[str]) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True but the tokenizer has no chat_template")
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def _generate_vllm(model, tokenizer, texts: list[str], max_new_tokens: int, progress: bool) -> list[str]:
    """Greedy decoding with vLLM; ``model`` is a ``vllm.LLM`` or a model path/name for one."""
    vllm = _require_vllm()
    llm = vllm.LLM(model=model) if isinstance(model, (str, os.PathLike)) else model
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outputs = llm.generate(texts, params, use_tqdm=progress)
    return [out.outputs[0].text for out in outputs]


def generate_batched(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    chat: bool = False,
    progress: bool = True,
    backend: str = "hf",
) -> list[str]:
    """Greedy completions for ``prompts``, in order; each is only the newly generated text.

    Left padding (so every row's continuation starts at the same column); prompts are sorted by
    length to waste less padding. ``chat=True`` wraps each prompt as a single user turn with the
    tokenizer's chat template. The tokenizer's padding side (and pad token, borrowed from EOS if
    unset) and the model's train/eval mode are restored afterwards.

    In a distributed run every rank must call it with the same prompts: each rank generates its contiguous
    share (padded to an equal count, so every rank runs the same number of ``generate`` calls), with
    ``synced_gpus`` when the weights are sharded (ZeRO-3, FSDP), and every rank returns all completions.
    """
    check_backend(backend)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    prompts = list(prompts)
    if not prompts:
        return []
    texts = _chat_texts(tokenizer, prompts) if chat else prompts
    if backend == "vllm":
        return _generate_vllm(model, tokenizer, texts, max_new_tokens, progress)
    world, rank = _world()
    if world > 1:
        return _generate_sharded(model, tokenizer, texts, world, rank, max_new_tokens, batch_size, chat, progress)
    return _generate_hf(model, tokenizer, texts, max_new_tokens, batch_size, chat, progress)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _generate_sharded(model, tokenizer, texts, world, rank, max_new_tokens, batch_size, chat, progress) -> list[str]:
    """This rank's share, generated in lockstep with the others, then all shares gathered in order."""
    from accelerate.utils import gather_object

    from ...distributed import shard_bounds

    per_rank = -(-len(texts) // world)  # ceil: equal work (and generate calls) on every rank
    start, end = shard_bounds(len(texts), world, rank)
    mine = texts[start:end]
    filler = (mine or texts)[-1:] * (per_rank - len(mine))  # discarded, only keeps the ranks in step
    outputs = _generate_hf(model, tokenizer, mine + filler, max_new_tokens, batch_size, chat, progress,
                           synced_gpus=_sharded_weights(model))
    shares = gather_object([outputs[: len(mine)]])
    return [text for share in shares for text in share]


def _sharded_weights(model) -> bool:
    """ZeRO-3 partitioned or FSDP (DTensor) parameters: every rank must take part in every forward."""
    from ...utils import is_zero3_param

    return any(is_zero3_param(p) or type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"
               for p in model.parameters())


def _generate_hf(model, tokenizer, texts, max_new_tokens, batch_size, chat, progress, synced_gpus=False) -> list[str]:

    import torch
    from tqdm.auto import tqdm

    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    # MoE models trained with the router aux loss keep output_router_logits on; transformers then computes that
    # loss during cached decoding with a prompt-length attention mask and fails. Generation needs no aux loss.
    config = getattr(model, "config", None)
    saved_router_logits = getattr(config, "output_router_logits", None)
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    outputs: list[str] = [""] * len(texts)
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    try:
        tokenizer.padding_side = "left"
        model.eval()
        if saved_router_logits:
            config.output_router_logits = False
        bar = tqdm(total=len(texts), desc="generate", disable=not progress)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=not chat)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, synced_gpus=synced_gpus,
                    temperature=None, top_p=None, top_k=None,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                )
            new = out[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, new):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
            bar.update(len(idx))
        bar.close()
    finally:
        tokenizer.padding_side = saved_side
        if saved_pad is None:
            tokenizer.pad_token = None
        if saved_router_logits:
            config.output_router_logits = saved_router_logits
        model.train(was_training)
    return outputs


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest of ``stops``; all of it when none occurs."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]
