"""The embedded offline default: generated data, a locally trained tokenizer and tiny random MoE models.

Everything here runs without network access and without downloading anything, so tests, examples and smoke
runs work on an air-gapped CPU box. Nothing in this module is meant to be a good model; it only has to have the
same *structure* as the real thing (GSM8K answer format, chat template with assistant masks, fused MoE experts).

Layout of the tiny models in transformers 5.23 (found by building each one, see ``tests/recipes/test_offline.py``).
All families store the routed experts fused in ``layers[i].mlp.experts`` (E = 8 experts, H = 64, I = 32) and,
on CPU, default to ``config._experts_implementation == "grouped_mm"``:

- ``olmoe``: router ``mlp.gate`` (``OlmoeTopKRouter``, ``weight`` (E, H), softmax then top-k);
  ``OlmoeExperts`` with ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I); no shared expert.
  Config: ``num_experts`` (alias ``num_local_experts``), ``num_experts_per_tok``; experts use ``intermediate_size``.
- ``mixtral``: router ``mlp.gate`` (``MixtralTopKRouter``, ``weight`` (E, H)); ``MixtralExperts`` with
  ``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I); no shared expert.
  Config: ``num_local_experts`` (alias ``num_experts``), ``num_experts_per_tok``; experts use ``intermediate_size``.
- ``qwen2_moe``: router ``mlp.gate`` (``Qwen2MoeTopKRouter``, ``weight`` (E, H)); ``Qwen2MoeExperts``
  (E, 2I, H) / (E, H, I); shared expert ``mlp.shared_expert`` (``Qwen2MoeMLP`` with ``gate_proj``/``up_proj``/
  ``down_proj`` ``nn.Linear``) scaled by ``mlp.shared_expert_gate`` (``nn.Linear(H, 1)``, sigmoid).
  Config: ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``, ``shared_expert_intermediate_size``;
  MoE only on layers with ``(i + 1) % decoder_sparse_step == 0`` and ``i not in mlp_only_layers``.
- ``qwen3_moe``: router ``mlp.gate`` (``Qwen3MoeTopKRouter``, ``weight`` (E, H)); ``Qwen3MoeExperts``
  (E, 2I, H) / (E, H, I); no shared expert. Config: ``num_experts`` (``num_local_experts`` also set),
  ``num_experts_per_tok``, ``moe_intermediate_size``.
- ``deepseek_v2``: router ``mlp.gate`` (``DeepseekV2TopkRouter``, ``weight`` (E, H), softmax, "greedy" top-k,
  times ``routed_scaling_factor``); ``DeepseekV2Experts`` (E, 2I, H) / (E, H, I); shared experts
  ``mlp.shared_experts`` (``DeepseekV2MLP``, width ``moe_intermediate_size * n_shared_experts``).
  Config: ``n_routed_experts`` (alias ``num_experts``), ``num_experts_per_tok``, ``n_shared_experts``;
  layers below ``first_k_dense_replace`` are dense.
- ``deepseek_v3``: router ``mlp.gate`` (``DeepseekV3TopkRouter``, ``weight`` (E, H) plus the buffer
  ``e_score_correction_bias`` (E,), sigmoid scores, grouped top-k over ``n_group``/``topk_group``);
  ``DeepseekV3Experts`` (E, 2I, H) / (E, H, I); shared experts ``mlp.shared_experts`` (``DeepseekV3MLP``).
  Config: ``n_routed_experts`` (alias ``num_local_experts``; ``num_experts`` is *not* set), ``num_experts_per_tok``.
- ``gpt_oss``: router ``mlp.router`` (``GptOssTopKRouter``, ``weight`` (E, H) and ``bias`` (E,), top-k on logits
  then softmax); ``GptOssExperts`` stores the *transposed, interleaved* layout with biases:
  ``gate_up_proj`` (E, H, 2I) (gate = ``[..., ::2]``, up = ``[..., 1::2]``), ``gate_up_proj_bias`` (E, 2I),
  ``down_proj`` (E, I, H), ``down_proj_bias`` (E, H); no shared expert; ``GptOssMLP.forward`` returns a tuple
  ``(hidden, router_scores)``. Config: ``num_local_experts`` (alias ``num_experts``), ``num_experts_per_tok``.

DeepSeek's multi-head latent attention has no grouped KV heads: ``num_key_value_heads`` must equal
``num_attention_heads`` (with 2 KV heads eager attention fails on a shape mismatch, SDPA silently ignores it).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..constants import TINY_FAMILIES

__all__ = [
    "CHAT_TEMPLATE",
    "MATH_WORDS",
    "MOE_FAMILIES",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "generate_math_problems",
    "tiny_moe_config",
    "tiny_moe_model",
]

# --------------------------------------------------------------------------------------------------------------
# GSM8K-style word problems
# --------------------------------------------------------------------------------------------------------------

_NAMES: tuple[tuple[str, str], ...] = (
    ("Natalia", "she"),
    ("James", "he"),
    ("Weng", "she"),
    ("Betty", "she"),
    ("Julie", "she"),
    ("Mark", "he"),
    ("Tina", "she"),
    ("Carlos", "he"),
    ("Aisha", "she"),
    ("Omar", "he"),
    ("Mei", "she"),
    ("Lucas", "he"),
    ("Priya", "she"),
    ("Tom", "he"),
    ("Greta", "she"),
    ("Kenji", "he"),
)
_ITEMS: tuple[str, ...] = (
    "notebooks", "apples", "pencils", "toy cars", "cupcakes", "comic books", "mangoes", "stickers"
)
_ANIMALS: tuple[str, ...] = ("chickens", "ducks", "geese", "quails")
# The word lists above, read-only, for material that must stay inside a lab model's vocabulary (the lab's
# in-vocabulary forgetting documents, hellora_trl.recipes.lab.targets.forgetting_texts_v2).
MATH_WORDS: Mapping[str, tuple] = MappingProxyType({"people": _NAMES, "items": _ITEMS, "animals": _ANIMALS})

# A template draws its numbers from the rng and returns (question, reasoning lines, final answer).
_Problem = tuple[str, list[str], int]


def _calc(expr: str, value: int) -> str:
    """A GSM8K calculator annotation, e.g. ``4*3 = <<4*3=12>>12``."""
    return f"{expr} = <<{expr}={value}>>{value}"


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_NAMES)


def _two_people(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(_NAMES, 2)
    return first[0], second[0]


def _shopping(rng: random.Random) -> _Problem:
    name, he = _person(rng)
    item = rng.choice(_ITEMS)
    count, price = rng.randint(2, 9), rng.randint(2, 12)
    cost = count * price
    bill = next(b for b in (20, 50, 100, 200) if b > cost)
    change = bill - cost
    question = (
        f"{name} buys {count} {item} at ${price} each. {he.capitalize()} pays with a ${bill} bill. "
        f"How much change, in dollars, does {he} get back?"
    )
    steps = [
        f"The {item} cost {_calc(f'{count}*{price}', cost)} dollars.",
        f"{name} gets {_calc(f'{bill}-{cost}', change)} dollars in change.",
    ]
    return question, steps, change


def _sharing(rng: random.Random) -> _Problem:
    name, he = _person(rng)
    while True:  # rejection sampling keeps every division exact
        friends, each, eaten = rng.randint(2, 6), rng.randint(2, 12), rng.randint(1, 9)
        rest = friends * each
        total = rest + eaten
        trays = [t for t in range(2, 7) if total % t == 0]
        if trays:
            break
    tray_count = rng.choice(trays)
    per_tray = total // tray_count
    question = (
        f"{name} bakes {tray_count} trays of cookies with {per_tray} cookies on each tray. {he.capitalize()} eats "
        f"{eaten} of them and shares the rest equally among {friends} friends. How many cookies does each friend get?"
    )
    steps = [
        f"{name} bakes {_calc(f'{tray_count}*{per_tray}', total)} cookies.",
        f"After eating {eaten}, {_calc(f'{total}-{eaten}', rest)} cookies are left.",
        f"Each friend gets {_calc(f'{rest}/{friends}', each)} cookies.",
    ]
    return question, steps, each


def _train_distance(rng: random.Random) -> _Problem:
    speed1, hours1 = rng.randint(3, 12) * 5, rng.randint(1, 5)
    speed2, hours2 = rng.randint(3, 12) * 5, rng.randint(1, 5)
    d1, d2 = speed1 * hours1, speed2 * hours2
    total = d1 + d2
    question = (
        f"A train travels at {speed1} miles per hour for {hours1} hours and then at {speed2} miles per hour "
        f"for {hours2} hours. How many miles does it travel in total?"
    )
    steps = [
        f"First it covers {_calc(f'{speed1}*{hours1}', d1)} miles.",
        f"Then it covers {_calc(f'{speed2}*{hours2}', d2)} miles.",
        f"In total it travels {_calc(f'{d1}+{d2}', total)} miles.",
    ]
    return question, steps, total


def _ride_minutes(rng: random.Random) -> _Problem:
    name, _ = _person(rng)
    speed, hours = rng.choice((8, 10, 12, 15, 18, 20, 24)), rng.randint(2, 6)
    distance = speed * hours
    minutes = hours * 60
    question = (
        f"{name} cycles {distance} kilometers at a steady speed of {speed} kilometers per hour. "
        f"How many minutes does the ride take?"
    )
    steps = [
        f"The ride takes {_calc(f'{distance}/{speed}', hours)} hours.",
        f"That is {_calc(f'{hours}*60', minutes)} minutes.",
    ]
    return question, steps, minutes


def _ages_difference(rng: random.Random) -> _Problem:
    older, younger = _two_people(rng)
    gap, years, younger_now = rng.randint(2, 30), rng.randint(2, 10), rng.randint(5, 40)
    future = younger_now + years
    older_now = younger_now + gap
    question = (
        f"{older} is {gap} years older than {younger}. In {years} years, {younger} will be {future} years old. "
        f"How old is {older} now?"
    )
    steps = [
        f"{younger} is {_calc(f'{future}-{years}', younger_now)} years old now.",
        f"So {older} is {_calc(f'{younger_now}+{gap}', older_now)} years old.",
    ]
    return question, steps, older_now


def _ages_times(rng: random.Random) -> _Problem:
    parent, child = _two_people(rng)
    factor, child_age, years = rng.randint(2, 5), rng.randint(3, 15), rng.randint(1, 10)
    parent_age = factor * child_age
    parent_later, child_later = parent_age + years, child_age + years
    total = parent_later + child_later
    question = (
        f"{parent} is {factor} times as old as {child}, who is {child_age} years old. "
        f"What will be the sum of their ages in {years} years?"
    )
    steps = [
        f"{parent} is {_calc(f'{factor}*{child_age}', parent_age)} years old.",
        f"In {years} years {parent} will be {_calc(f'{parent_age}+{years}', parent_later)} years old.",
        f"In {years} years {child} will be {_calc(f'{child_age}+{years}', child_later)} years old.",
        f"The sum of their ages will be {_calc(f'{parent_later}+{child_later}', total)}.",
    ]
    return question, steps, total


def _farm_eggs(rng: random.Random) -> _Problem:
    animal = rng.choice(_ANIMALS)
    start, bought = rng.randint(5, 30), rng.randint(2, 15)
    sold = rng.randint(1, start + bought - 1)
    eggs, weeks = rng.randint(2, 7), rng.randint(2, 4)
    after_buy = start + bought
    now = after_buy - sold
    weekly = now * eggs
    total = weekly * weeks
    question = (
        f"A farmer has {start} {animal}. She buys {bought} more and then sells {sold}. Each of her {animal} lays "
        f"{eggs} eggs a week. How many eggs do her {animal} lay in {weeks} weeks?"
    )
    steps = [
        f"After buying she has {_calc(f'{start}+{bought}', after_buy)} {animal}.",
        f"After selling she has {_calc(f'{after_buy}-{sold}', now)} {animal}.",
        f"They lay {_calc(f'{now}*{eggs}', weekly)} eggs a week.",
        f"In {weeks} weeks they lay {_calc(f'{weekly}*{weeks}', total)} eggs.",
    ]
    return question, steps, total


def _packing_boxes(rng: random.Random) -> _Problem:
    per_box, boxes = rng.randint(4, 24), rng.randint(3, 15)
    given = rng.randint(1, boxes - 1)
    total = per_box * boxes
    left = boxes - given
    question = (
        f"A teacher has {total} pencils and packs them into boxes of {per_box}. She gives away {given} boxes. "
        f"How many boxes does she have left?"
    )
    steps = [
        f"She fills {_calc(f'{total}/{per_box}', boxes)} boxes.",
        f"She has {_calc(f'{boxes}-{given}', left)} boxes left.",
    ]
    return question, steps, left


def _wages(rng: random.Random) -> _Problem:
    name, he = _person(rng)
    wage, hours, weeks = rng.randint(8, 25), rng.randint(5, 20), rng.randint(2, 6)
    weekly = wage * hours
    earned = weekly * weeks
    spent = rng.randint(1, (earned - 1) // 10) * 10  # earned >= 80, so 10 <= spent < earned
    left = earned - spent
    question = (
        f"{name} earns ${wage} an hour and works {hours} hours a week. After {weeks} weeks, {he} spends ${spent} "
        f"on a bike. How many dollars does {he} have left?"
    )
    steps = [
        f"{name} earns {_calc(f'{wage}*{hours}', weekly)} dollars a week.",
        f"In {weeks} weeks {he} earns {_calc(f'{weekly}*{weeks}', earned)} dollars.",
        f"After the bike {he} has {_calc(f'{earned}-{spent}', left)} dollars left.",
    ]
    return question, steps, left


_TEMPLATES: tuple[Callable[[random.Random], _Problem], ...] = (
    _shopping,
    _sharing,
    _train_distance,
    _ride_minutes,
    _ages_difference,
    _ages_times,
    _farm_eggs,
    _packing_boxes,
    _wages,
)


def generate_math_problems(n: int, seed: int = 0) -> list[dict]:
    """``n`` GSM8K-format word problems (``question``, ``answer`` ending in ``#### <int>``), same list per seed.

    Used as the offline stand-in for GSM8K: the answers carry GSM8K's calculator annotations (``<<a*b=c>>``)
    and final line, so answer extraction and evaluation code paths are exercised exactly as on the real data.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        question, steps, answer = rng.choice(_TEMPLATES)(rng)
        problems.append({"question": question, "answer": "\n".join([*steps, f"#### {answer}"])})
    return problems


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>")
# Ids 0..5 in this order; tests and ``conftest.random_batch`` rely on pad/bos/eos being 0/1/2.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)

# The end-of-sequence token sits inside {% generation %} so TRL's assistant-only loss trains the model to stop,
# and the prompt rendered with add_generation_prompt is a token prefix of the full conversation.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\n' -}}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('Unsupported chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

# A few non-math lines so code and refusal data (CodeAlpaca, Saferpaca) get some merges too.
_GENERIC_LINES: tuple[str, ...] = (
    "Write a Python function that returns the sum of a list of numbers.",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i)",
    "Give three tips for staying healthy.",
    "I'm sorry, but I can't help with that request.",
    "Explain why the sky is blue in one short paragraph.",
    "Question: What is 2 + 2?\nAnswer: 2 + 2 = 4.\n#### 4",
)


def _default_corpus() -> list[str]:
    texts = [f"Question: {p['question']}\nAnswer: {p['answer']}" for p in generate_math_problems(400, seed=1234)]
    return texts + list(_GENERIC_LINES) * 4


def build_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 512
) -> transformers.PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer locally (no download) with special tokens and a chat template.

    Byte-level BPE can encode any text, so the tokenizer works on real datasets too, just with long sequences.
    Special tokens: ``<|pad|>`` (0), ``<|bos|>`` (1), ``<|eos|>`` (2) and the role markers ``<|system|>``,
    ``<|user|>``, ``<|assistant|>``. The chat template supports ``add_generation_prompt`` and TRL's
    ``assistant_only_loss`` (``{% generation %}`` around the assistant content and its ``<|eos|>``).
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be at least {minimum} (256 byte symbols + special tokens), got {vocab_size}."
        )
    corpus = _default_corpus() if texts is None else [str(t) for t in texts]
    if not corpus:
        raise ValueError("build_tokenizer got an empty list of texts; pass some texts or None for the default corpus.")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
        model_max_length=512,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# Tiny MoE configs and models
# --------------------------------------------------------------------------------------------------------------

_COMMON: dict = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
_DEEPSEEK_MLA: dict = {
    "num_key_value_heads": 4,  # MLA: one KV head per query head
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 0,
    "n_group": 1,
    "topk_group": 1,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
}
_FAMILY_SETTINGS: dict[str, tuple[str, dict]] = {
    "olmoe": ("OlmoeConfig", {"num_experts": 8, "num_experts_per_tok": 2}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
    "granitemoe": ("GraniteMoeConfig", {"num_local_experts": 8, "num_experts_per_tok": 2}),
    # router_jitter_noise 0: sparsemixer jitter would make the tiny model stochastic in train mode.
    "phimoe": ("PhimoeConfig", {"num_local_experts": 8, "num_experts_per_tok": 2, "router_jitter_noise": 0.0}),
    "deepseek_v2": ("DeepseekV2Config", dict(_DEEPSEEK_MLA)),
    "deepseek_v3": ("DeepseekV3Config", dict(_DEEPSEEK_MLA)),
    "gpt_oss": (
        "GptOssConfig",
        {
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "head_dim": 16,
            "sliding_window": 128,
            # GPT-OSS uses YaRN; keep it but make the factor agree with max_position_embeddings (512 / 128).
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 128,
            },
        },
    ),
}
MOE_FAMILIES: tuple[str, ...] = TINY_FAMILIES  # the CLI's --tiny choices; one settings entry per name
if set(_FAMILY_SETTINGS) != set(TINY_FAMILIES):
    raise ImportError(f"constants.TINY_FAMILIES {TINY_FAMILIES} and the tiny model settings {tuple(_FAMILY_SETTINGS)} "
                      "differ: add the family to both.")


def tiny_moe_config(family: str = "olmoe", **overrides) -> transformers.PretrainedConfig:
    """A tiny random-init config (hidden 64, 2 layers, 8 experts, top-2, vocab 512) of a real MoE family.

    Every layer is an MoE layer; ``overrides`` are passed to the config class last, so any field can be changed.
    """
    if family not in _FAMILY_SETTINGS:
        raise ValueError(f"Unknown MoE family {family!r}; choose one of {list(MOE_FAMILIES)}.")
    class_name, settings = _FAMILY_SETTINGS[family]
    config_class = getattr(transformers, class_name)
    return config_class(**{**_COMMON, **settings, **overrides})


def tiny_moe_model(family: str = "olmoe", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny float32 causal-LM of ``family`` with weights fixed by ``seed`` (same weights on every call)."""
    config = tiny_moe_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.float()
