"""A tiny Mixtral-style model with per-expert nn.Linear experts (the pre-5.x / remote-code layout)."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class LegacyMoEConfig(PretrainedConfig):
    model_type = "mixtral_modulelist"

    def __init__(self, vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                 num_local_experts=6, num_experts_per_tok=2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        super().__init__(**kwargs)


class Expert(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoe(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.intermediate_size) for _ in range(cfg.num_local_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, index = torch.topk(torch.softmax(self.gate(x), -1), self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(h, h, bias=False))
        self.block_sparse_moe = SparseMoe(cfg)

    def forward(self, x):
        a = self.self_attn
        q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
        x = x + a.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.block_sparse_moe(x)


class LegacyMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LegacyMoEConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutput(loss=loss, logits=logits)


class DeepseekStyleConfig(PretrainedConfig):
    """Config keys of DeepSeek-MoE 16B's remote code (model_type "deepseek")."""

    model_type = "deepseek"

    def __init__(self, vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2,
                 n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.moe_intermediate_size, self.num_hidden_layers = moe_intermediate_size, num_hidden_layers
        self.n_routed_experts, self.num_experts_per_tok = n_routed_experts, num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        super().__init__(**kwargs)


class GatedMLP(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Like the remote code: a bare weight, returns (topk_idx, topk_weight, aux_loss) rather than logits."""

    def __init__(self, cfg):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.randn(cfg.n_routed_experts, cfg.hidden_size) * 0.5)

    def forward(self, x):
        scores = F.linear(x.reshape(-1, x.shape[-1]), self.weight).softmax(-1)
        weight, index = torch.topk(scores, self.top_k, dim=-1)
        return index, weight, None


class DeepseekStyleMoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = MoEGate(cfg)
        self.experts = nn.ModuleList(GatedMLP(h, i) for _ in range(cfg.n_routed_experts))
        self.shared_experts = GatedMLP(h, i * cfg.n_shared_experts)

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        index, weights, _ = self.gate(x)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return (out + self.shared_experts(flat)).reshape(shape)


class DeepseekStyleForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DeepseekStyleConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList()
        for _ in range(cfg.num_hidden_layers):
            block = nn.Module()
            block.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(block.self_attn, name, nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False))
            block.mlp = DeepseekStyleMoE(cfg)
            self.layers.append(block)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        x = self.embed(input_ids)
        for layer in self.layers:
            a = layer.self_attn
            x = x + a.o_proj(F.scaled_dot_product_attention(a.q_proj(x), a.k_proj(x), a.v_proj(x), is_causal=True))
            x = x + layer.mlp(x)
        return CausalLMOutput(logits=self.lm_head(x))
