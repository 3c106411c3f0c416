"""The offline default: generated GSM8K problems, the local tokenizer and the tiny MoE families."""

from __future__ import annotations

import ast
import operator
import re
import time

import pytest
import torch
from torch import nn

from hellora_trl.recipes.eval import extract_gsm8k_answer
from hellora_trl.recipes.offline import (
    MOE_FAMILIES,
    build_tokenizer,
    generate_math_problems,
    tiny_moe_config,
    tiny_moe_model,
)
from hellora_trl.registry import FAMILIES, config_value, find_moe_layers

# --------------------------------------------------------------------------------------------------------------
# Math problems
# --------------------------------------------------------------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(expr: str) -> float:
    """Arithmetic only (numbers and + - * /), so a bad annotation cannot run code."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unexpected expression {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def _exact_div(a: int, b: int) -> int:
    assert a % b == 0, f"{a}/{b} is not an integer"
    return a // b


# One independent solver per template: re-derive the answer from the numbers in the question text.
_SOLVERS = [
    (r"buys (\d+) [\w ]+ at \$(\d+) each\. \w+ pays with a \$(\d+) bill", lambda c, p, b: b - c * p),
    (
        r"bakes (\d+) trays of cookies with (\d+) cookies on each tray\. \w+ eats (\d+) of them and shares the rest "
        r"equally among (\d+) friends",
        lambda t, p, e, f: _exact_div(t * p - e, f),
    ),
    (
        r"at (\d+) miles per hour for (\d+) hours and then at (\d+) miles per hour for (\d+) hours",
        lambda s1, h1, s2, h2: s1 * h1 + s2 * h2,
    ),
    (r"cycles (\d+) kilometers at a steady speed of (\d+) kilometers per hour", lambda d, s: _exact_div(d * 60, s)),
    (r"is (\d+) years older than \w+\. In (\d+) years, \w+ will be (\d+) years old", lambda x, y, z: z - y + x),
    (
        r"is (\d+) times as old as \w+, who is (\d+) years old\. What will be the sum of their ages in (\d+) years",
        lambda m, b, y: m * b + b + 2 * y,
    ),
    (
        r"has (\d+) \w+\. She buys (\d+) more and then sells (\d+)\. Each of her \w+ lays (\d+) eggs a week\. "
        r"How many eggs do her \w+ lay in (\d+) weeks",
        lambda a, b, c, e, w: (a + b - c) * e * w,
    ),
    (
        r"has (\d+) pencils and packs them into boxes of (\d+)\. She gives away (\d+) boxes",
        lambda t, p, g: _exact_div(t, p) - g,
    ),
    (
        r"earns \$(\d+) an hour and works (\d+) hours a week\. After (\d+) weeks, \w+ spends \$(\d+)",
        lambda w, h, k, s: w * h * k - s,
    ),
]


def _final(answer: str) -> int:
    last = answer.splitlines()[-1]
    match = re.fullmatch(r"#### (\d+)", last)
    assert match, f"last line is not '#### <int>': {last!r}"
    return int(match.group(1))


def test_generated_problems_have_gsm8k_format_and_are_deterministic():
    problems = generate_math_problems(50, seed=3)
    assert len(problems) == 50
    for problem in problems:
        assert set(problem) == {"question", "answer"}
        assert isinstance(problem["question"], str) and problem["question"].endswith("?")
        assert problem["answer"].count("####") == 1
        assert len(problem["answer"].splitlines()) >= 3  # reasoning steps, then the final line
        assert extract_gsm8k_answer(problem["answer"]) == str(_final(problem["answer"]))
    assert generate_math_problems(50, seed=3) == problems
    assert generate_math_problems(50, seed=4) != problems
    assert generate_math_problems(10, seed=3) == problems[:10]  # a prefix, so small n is a subset of large n
    assert generate_math_problems(0) == []
    with pytest.raises(ValueError):
        generate_math_problems(-1)


def test_generated_answers_are_correct():
    problems = generate_math_problems(400, seed=0) + generate_math_problems(400, seed=7)
    used = set()
    for problem in problems:
        question, answer = problem["question"], problem["answer"]
        final = _final(answer)
        assert final > 0
        # Every calculator annotation is right, and the last one is the final answer.
        annotations = re.findall(r"<<([^=<>]+)=(\d+)>>(\d+)", answer)
        assert annotations, answer
        for expr, value, shown in annotations:
            assert _evaluate(expr) == int(value) == int(shown), (expr, value, shown)
        assert int(annotations[-1][1]) == final
        # An independent solver re-derives the answer from the question's numbers.
        matches = [(i, m) for i, (pattern, _) in enumerate(_SOLVERS) if (m := re.search(pattern, question))]
        assert len(matches) == 1, question
        index, match = matches[0]
        used.add(index)
        assert _SOLVERS[index][1](*map(int, match.groups())) == final, (question, answer)
    assert used == set(range(len(_SOLVERS))), "every template should appear in 400 problems"


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_build_tokenizer_is_fast_deterministic_and_has_special_tokens(tokenizer):
    start = time.perf_counter()
    again = build_tokenizer()
    assert time.perf_counter() - start < 5.0
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert len(tokenizer) == 512 == tiny_moe_config().vocab_size
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    config = tiny_moe_config()
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    # Byte-level: any text round-trips, and special tokens stay single tokens.
    text = "Ünïcode ✓ and code: def f(x):\n\treturn x ** 2  # 100%"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer("<|eos|>")["input_ids"] == [2]


def test_build_tokenizer_on_given_texts():
    texts = ["the cat sat on the mat"] * 20 + ["the dog sat on the log"] * 20
    tok = build_tokenizer(texts, vocab_size=300)
    assert len(tok) <= 300
    assert len(tok("the cat sat on the mat")["input_ids"]) < len("the cat sat on the mat")
    assert build_tokenizer(iter(texts), vocab_size=300).get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(texts, vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        build_tokenizer([])


def _masked_text(tokenizer, out) -> str:
    return tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])


def test_chat_template_assistant_mask_covers_assistant_content(tokenizer):
    messages = [
        {"role": "system", "content": "You solve math problems."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2+3 = <<2+3=5>>5\n#### 5"},
        {"role": "user", "content": "And 4 * 6?"},
        {"role": "assistant", "content": "4*6 = <<4*6=24>>24\n#### 24"},
    ]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert len(out["assistant_masks"]) == len(out["input_ids"])
    assert out["input_ids"][0] == tokenizer.bos_token_id
    # Exactly the two assistant contents, each with the end-of-sequence token the model must learn to emit.
    assert _masked_text(tokenizer, out) == "2+3 = <<2+3=5>>5\n#### 5<|eos|>4*6 = <<4*6=24>>24\n#### 24<|eos|>"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "You solve math problems." in rendered and "<|user|>" in rendered

    # The generation prompt is a token prefix of the full conversation (TRL's prompt-completion split relies on it).
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=True, return_dict=True, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages[:3], tokenize=True, return_dict=True)
    assert full["input_ids"][: len(prompt["input_ids"])] == prompt["input_ids"]
    assert tokenizer.decode(prompt["input_ids"]).endswith("<|assistant|>\n")

    with pytest.raises(Exception, match="Unsupported chat role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_chat_template_passes_trl_checks(tokenizer):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)


# --------------------------------------------------------------------------------------------------------------
# Tiny MoE families
# --------------------------------------------------------------------------------------------------------------

H, I, E = 64, 32, 8  # hidden, expert intermediate, experts

# (router attribute, experts class, shape of each expert parameter, shared-expert attributes) per family.
_LAYOUTS = {
    "olmoe": ("gate", "OlmoeExperts", {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}, ()),
    "mixtral": ("gate", "MixtralExperts", {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}, ()),
    "qwen2_moe": (
        "gate",
        "Qwen2MoeExperts",
        {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)},
        ("shared_expert", "shared_expert_gate"),
    ),
    "qwen3_moe": ("gate", "Qwen3MoeExperts", {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}, ()),
    "deepseek_v2": (
        "gate",
        "DeepseekV2Experts",
        {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)},
        ("shared_experts",),
    ),
    "deepseek_v3": (
        "gate",
        "DeepseekV3Experts",
        {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)},
        ("shared_experts",),
    ),
    "granitemoe": ("router", "GraniteMoeExperts", {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}, ()),
    "phimoe": ("router", "PhimoeExperts", {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}, ()),
    "gpt_oss": (
        "router",
        "GptOssExperts",
        {
            "gate_up_proj": (E, H, 2 * I),
            "gate_up_proj_bias": (E, 2 * I),
            "down_proj": (E, I, H),
            "down_proj_bias": (E, H),
        },
        (),
    ),
}


def test_every_family_has_a_layout_entry():
    assert set(MOE_FAMILIES) == set(_LAYOUTS)
    with pytest.raises(ValueError, match="Unknown MoE family"):
        tiny_moe_config("switch")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_tiny_family_builds_runs_and_has_fused_experts(family):
    config = tiny_moe_config(family)
    assert config.vocab_size == 512 and config.hidden_size == H and config.num_hidden_layers == 2
    assert config.max_position_embeddings == 512
    # The registry's keys find 8 experts and top-2 on every family.
    registry_family = FAMILIES[family]
    assert config_value(config, registry_family.num_experts_keys) == E
    assert config_value(config, registry_family.top_k_keys) == 2

    model = tiny_moe_model(family)
    assert next(model.parameters()).dtype == torch.float32
    router_attr, experts_class, shapes, shared_attrs = _LAYOUTS[family]
    assert len(model.model.layers) == 2
    for layer in model.model.layers:
        block = layer.block_sparse_moe if family == "granitemoe" else layer.mlp
        assert type(block.experts).__name__ == experts_class
        for name, shape in shapes.items():
            assert tuple(getattr(block.experts, name).shape) == shape, (family, name)
        assert tuple(getattr(block, router_attr).weight.shape) == (E, H)
        for attr in shared_attrs:
            assert isinstance(getattr(block, attr), nn.Module)
    assert registry_family.has_shared_experts(config) == bool(shared_attrs)

    ids = torch.randint(3, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.logits.shape == (2, 16, config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    experts = find_moe_layers(model)[0].experts
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0
    last = model.model.layers[-1]
    assert getattr(getattr(last, "mlp", None) or last.block_sparse_moe, router_attr).weight.grad is not None


def test_tiny_moe_model_is_seeded_and_overridable():
    a, b, c = tiny_moe_model("olmoe", seed=0), tiny_moe_model("olmoe", seed=0), tiny_moe_model("olmoe", seed=1)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))

    model = tiny_moe_model("qwen2_moe", num_hidden_layers=3, num_experts=4)
    assert len(model.model.layers) == 3
    assert model.model.layers[2].mlp.experts.gate_up_proj.shape[0] == 4
    assert tiny_moe_config("deepseek_v3").first_k_dense_replace == 0
