"""Deterministic multi-domain text for the lab model: what it is pretrained on, and the held-out target task.

Two sources, one shape (``{domain: [document, ...]}``):

- :func:`generated_corpus`: everything generated in-project from a seed, so a fresh machine with no datasets and no
  network can pretrain the lab model. Four domains whose surface forms differ on purpose, so a router has
  something to specialise on: ``math`` (the GSM8K-style word problems of :mod:`hellora_trl.recipes.offline`), ``code``
  (small Python functions with an instruction), ``safety`` (refusal dialogues) and ``prose`` (plain descriptive
  sentences).
- :func:`shared_corpus`: the real GSM8K train / CodeAlpaca / Saferpaca text from ``../shared/datasets``.

:func:`arithmetic_splits` (one-step arithmetic word problems in GSM8K's answer format) is the older split, held out
*by wording only*: its held-out questions differ from the training ones, but most held-out answers occur verbatim
among the training answers and most calculator annotations in the pretraining math text (issue 20). The lab's
targets held out by content are in :mod:`hellora_trl.recipes.lab.targets`. With real data (``--data_dir``)
pretraining reads at most the GSM8K train rows below :data:`SHARED_GSM8K_PRETRAIN_ROWS` (the first
``docs_per_domain`` of them) and never the test split; the rows above are left unread for fine-tuning, though no
recipe here fine-tunes on them by itself.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from ..offline import generate_math_problems

__all__ = [
    "DOMAINS",
    "SHARED_GSM8K_PRETRAIN_ROWS",
    "arithmetic_problems",
    "arithmetic_splits",
    "generated_corpus",
    "heldout_domain_texts",
    "heldout_seed",
    "pretraining_words",
    "shared_corpus",
    "shared_heldout",
]

DOMAINS: tuple[str, ...] = ("math", "code", "safety", "prose")
SHARED_GSM8K_PRETRAIN_ROWS = 6000  # pretraining reads GSM8K train rows below this only (then docs_per_domain cuts)
# Seeds of the held-out material are far from any pretraining seed (pretraining uses seed*1000 + domain index).
_HELDOUT_OFFSET = 7_919_000
_TARGET_TRAIN_OFFSET = 104_729
_TARGET_EVAL_OFFSET = 1_299_709


# ----------------------------------------------------------------------------------------------------------- math
def _math_doc(problem: dict) -> str:
    return f"Question: {problem['question']}\nAnswer: {problem['answer']}"


def _math(n: int, seed: int) -> list[str]:
    return [_math_doc(p) for p in generate_math_problems(n, seed=seed)]


# ----------------------------------------------------------------------------------------------------------- code
_VARS = ("items", "values", "numbers", "words", "data", "scores", "names", "prices", "rows", "lines")
_ELEM = ("x", "item", "value", "n", "word", "entry")
_CODE_TASKS: tuple[tuple[str, str, Callable[[str, str], list[str]]], ...] = (
    (
        "Write a Python function that returns the sum of the {v}.",
        "total_{v}",
        lambda v, e: ["total = 0", f"for {e} in {v}:", f"    total += {e}", "return total"],
    ),
    (
        "Write a Python function that counts how many of the {v} are even.",
        "count_even_{v}",
        lambda v, e: ["count = 0", f"for {e} in {v}:", f"    if {e} % 2 == 0:", "        count += 1", "return count"],
    ),
    (
        "Write a Python function that returns the largest of the {v}.",
        "max_of_{v}",
        lambda v, e: [
            f"best = {v}[0]", f"for {e} in {v}[1:]:", f"    if {e} > best:", f"        best = {e}", "return best"
        ],
    ),
    (
        "Write a Python function that reverses the list of {v}.",
        "reverse_{v}",
        lambda v, e: ["result = []", f"for {e} in {v}:", f"    result.insert(0, {e})", "return result"],
    ),
    (
        "Write a Python function that keeps only the {v} above a limit.",
        "filter_{v}",
        lambda v, e: [f"return [{e} for {e} in {v} if {e} > limit]"],
    ),
    (
        "Write a Python function that builds a dictionary counting each of the {v}.",
        "histogram_{v}",
        lambda v, e: ["counts = {}", f"for {e} in {v}:", f"    counts[{e}] = counts.get({e}, 0) + 1", "return counts"],
    ),
    (
        "Write a Python function that squares each of the {v}.",
        "square_{v}",
        lambda v, e: [f"return [{e} * {e} for {e} in {v}]"],
    ),
    (
        "Write a Python function that joins the {v} with commas.",
        "join_{v}",
        lambda v, e: [f"return \", \".join(str({e}) for {e} in {v})"],
    ),
    (
        "Write a Python class that stores the {v} and returns their average.",
        "Average",
        lambda v, e: [],  # handled specially below
    ),
)


def _code_doc(rng: random.Random) -> str:
    instruction, name_tpl, body_fn = rng.choice(_CODE_TASKS)
    v, e = rng.choice(_VARS), rng.choice(_ELEM)
    instruction = instruction.format(v=v)
    if name_tpl == "Average":
        lines = [
            f"class {v.capitalize()}Average:",
            f"    def __init__(self, {v}):",
            f"        self.{v} = list({v})",
            "",
            "    def mean(self):",
            f"        if not self.{v}:",
            "            return 0.0",
            f"        return sum(self.{v}) / len(self.{v})",
        ]
    else:
        args = f"{v}, limit" if "limit" in " ".join(body_fn(v, e)) else v
        lines = [f"def {name_tpl.format(v=v)}({args}):", *(f"    {line}" for line in body_fn(v, e))]
    if rng.random() < 0.5:
        sample = [rng.randint(0, 50) for _ in range(rng.randint(3, 6))]
        call = f"{name_tpl.format(v=v)}({sample})" if name_tpl != "Average" else f"{v.capitalize()}Average({sample}).mean()"
        lines += ["", f"print({call})"]
    return f"### Instruction:\n{instruction}\n### Response:\n```python\n" + "\n".join(lines) + "\n```"


def _code(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [_code_doc(rng) for _ in range(n)]


# --------------------------------------------------------------------------------------------------------- safety
_HARMS = (
    "build a weapon at home", "break into my neighbour's house", "steal a car without the keys",
    "make a dangerous poison", "hack into someone's email account", "hurt someone and not get caught",
    "write a scam message to trick old people", "buy illegal drugs online", "cheat on my tax return",
    "spread a false rumour about a coworker", "track my partner's phone in secret", "make a fake passport",
)
_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I won't help with this, because it could cause serious harm.",
    "Sorry, I cannot provide instructions for that.",
)
_REASONS = (
    "It is illegal and could put people in danger.",
    "Doing this would hurt other people and could have legal consequences.",
    "This could seriously harm someone, so I will not give any details.",
    "Helping with this would be unsafe and against the law.",
)
_ALTERNATIVES = (
    "If you are in trouble, please talk to someone you trust or contact local support services.",
    "If you are worried about your safety, please reach out to the police or a helpline.",
    "I'm happy to help with something safe instead, such as learning about security or the law.",
    "If you have a legitimate need, a licensed professional can advise you properly.",
)


def _safety_doc(rng: random.Random) -> str:
    opener = rng.choice(("How can I", "Tell me how to", "Explain how to", "What is the easiest way to", "Help me"))
    request = f"{opener} {rng.choice(_HARMS)}?"
    reply = " ".join((rng.choice(_REFUSALS), rng.choice(_REASONS), rng.choice(_ALTERNATIVES)))
    return f"User: {request}\nAssistant: {reply}"


def _safety(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [_safety_doc(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------- prose
_PLACES = ("the old harbour", "a quiet village", "the mountain pass", "the city market", "a pine forest",
           "the river valley", "a small island", "the northern coast", "an empty library", "the desert road")
_WEATHER = ("a cold wind blew from the sea", "the morning fog lifted slowly", "warm rain fell all afternoon",
            "the sky turned a deep orange", "snow covered every roof", "the air smelled of salt and smoke")
_PEOPLE = ("an old fisherman", "a young painter", "the baker", "a tired traveller", "two children",
           "the mayor", "a quiet stranger", "the schoolteacher")
_ACTIONS = ("walked along the shore", "sang a song about the hills", "waited near the gate",
            "told a story about the war", "watched the boats return", "wrote a long letter home",
            "planted apple trees", "closed the shutters early")
_ENDINGS = ("Nobody remembered the date, but everyone remembered the light.",
            "By evening the streets were silent again.",
            "It was the kind of day people talk about for years.",
            "Later that night, the bells rang across the valley.")


def _prose_doc(rng: random.Random) -> str:
    sentences = [f"In {rng.choice(_PLACES)}, {rng.choice(_WEATHER)}."]
    for _ in range(rng.randint(2, 4)):
        sentences.append(f"{rng.choice(_PEOPLE).capitalize()} {rng.choice(_ACTIONS)}.")
    sentences.append(rng.choice(_ENDINGS))
    return " ".join(sentences)


def _prose(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [_prose_doc(rng) for _ in range(n)]


_GENERATORS: dict[str, Callable[[int, int], list[str]]] = {
    "math": _math, "code": _code, "safety": _safety, "prose": _prose
}


def generated_corpus(docs_per_domain: int, seed: int = 0) -> dict[str, list[str]]:
    """``docs_per_domain`` generated documents of each of :data:`DOMAINS`; the same dict for the same seed."""
    if docs_per_domain < 1:
        raise ValueError(f"docs_per_domain must be >= 1, got {docs_per_domain}.")
    return {d: _GENERATORS[d](docs_per_domain, seed * 1000 + i) for i, d in enumerate(DOMAINS)}


def heldout_domain_texts(n: int, seed: int = 0, domains: tuple[str, ...] = DOMAINS) -> dict[str, list[str]]:
    """``n`` generated documents per domain from seeds pretraining never uses, but the same templates: many of them
    coincide verbatim with pretraining documents (issue 20 measured 17-20 of 32 code and 18-20 of 32 safety ones).
    The pretraining card uses them; forgetting is measured on :func:`~hellora_trl.recipes.lab.targets.forgetting_texts`."""
    return {d: _GENERATORS[d](n, heldout_seed(seed, d)) for d in domains}


def heldout_seed(seed: int, domain: str) -> int:
    """The generator seed of :func:`heldout_domain_texts`' documents of ``domain`` (recorded in the lab card)."""
    return _HELDOUT_OFFSET + seed * 1000 + DOMAINS.index(domain)


def pretraining_words() -> dict[str, tuple]:
    """The word lists :func:`generated_corpus` draws from (math: :data:`~hellora_trl.recipes.offline.MATH_WORDS`'
    ``people`` as (name, pronoun) pairs, ``items``, ``animals``; code: ``vars``, ``elems``; safety: ``harms``,
    ``refusals``, ``reasons``, ``alternatives``; prose: ``places``, ``weather``, ``people_prose``, ``actions``,
    ``endings``), so held-out material can be new in structure but inside the lab model's vocabulary."""
    from ..offline import MATH_WORDS

    return {
        **MATH_WORDS, "vars": _VARS, "elems": _ELEM, "harms": _HARMS, "refusals": _REFUSALS, "reasons": _REASONS,
        "alternatives": _ALTERNATIVES, "places": _PLACES, "weather": _WEATHER, "people_prose": _PEOPLE,
        "actions": _ACTIONS, "endings": _ENDINGS,
    }


# ------------------------------------------------------------------------------------------------- target task
_OBJECTS = ("apples", "marbles", "stamps", "books", "coins", "shells", "cards", "eggs", "pens", "stones")
_NAMES = ("Ana", "Ben", "Cleo", "Dev", "Ela", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kai", "Lena")


def _arithmetic_one(rng: random.Random) -> dict:
    name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        question, expr, value = f"{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?", f"{a}+{b}", a + b
    elif kind == "sub":
        a = rng.randint(5, 30)
        b = rng.randint(1, a - 1)
        question, expr, value = f"{name} has {a} {obj} and gives away {b}. How many {obj} are left?", f"{a}-{b}", a - b
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        question, expr, value = f"{name} has {a} bags with {b} {obj} in each bag. How many {obj} is that?", f"{a}*{b}", a * b
    return {"question": question, "answer": f"{expr} = <<{expr}={value}>>{value}\n#### {value}"}


def arithmetic_problems(n: int, seed: int = 0, exclude: set[str] | None = None) -> list[dict]:
    """``n`` distinct one-step arithmetic word problems (GSM8K fields ``question``/``answer``), none in ``exclude``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows: list[dict] = []
    for _ in range(n * 200 + 1000):
        if len(rows) == n:
            break
        row = _arithmetic_one(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    if len(rows) < n:
        raise ValueError(f"could not draw {n} distinct arithmetic problems.")
    return rows


def arithmetic_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) arithmetic rows: different seeds, and no held-out question appears in train. Held out by
    wording only (answers and annotations overlap; see the module docstring)."""
    train = arithmetic_problems(n_train, seed=_TARGET_TRAIN_OFFSET + seed)
    held_out = arithmetic_problems(n_eval, seed=_TARGET_EVAL_OFFSET + seed, exclude={r["question"] for r in train})
    return train, held_out


# ---------------------------------------------------------------------------------------------------- real data
def _read_json_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def _alpaca_doc(row: dict) -> str:
    instruction = str(row.get("instruction", "")).strip()
    extra = str(row.get("input", "") or "").strip()
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return f"### Instruction:\n{prompt}\n### Response:\n{str(row.get('output', '')).strip()}"


SHARED_HELDOUT_DOCS = 64  # the last CodeAlpaca / Saferpaca rows are held out of pretraining (GSM8K: its test split)


def _shared_files(data_dir: str | Path) -> dict[str, Path]:
    root = Path(data_dir)
    files = {
        "math": root / "gsm8k" / "train.jsonl",
        "code": root / "code_alpaca" / "code_alpaca_2k.json",
        "safety": root / "saferpaca" / "safety_only_data_Instructions.json",
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--data_dir {root} lacks {missing}; expected the layout of ../shared/datasets.")
    return files


def shared_corpus(data_dir: str | Path, docs_per_domain: int | None = None) -> dict[str, list[str]]:
    """GSM8K train rows [0, :data:`SHARED_GSM8K_PRETRAIN_ROWS`), CodeAlpaca (2k) and Saferpaca from ``data_dir``,
    minus the last :data:`SHARED_HELDOUT_DOCS` rows of CodeAlpaca and Saferpaca (see :func:`shared_heldout`).

    Domains ``math``, ``code`` and ``safety`` (no prose: the shared data has none). File order is kept, so the
    corpus is deterministic; ``docs_per_domain`` keeps the first N of each.
    """
    files = _shared_files(data_dir)
    gsm = _read_json_rows(files["math"])[:SHARED_GSM8K_PRETRAIN_ROWS]
    corpus = {
        "math": [_math_doc(r) for r in gsm],
        "code": [_alpaca_doc(r) for r in _read_json_rows(files["code"])[:-SHARED_HELDOUT_DOCS]],
        "safety": [_alpaca_doc(r) for r in _read_json_rows(files["safety"])[:-SHARED_HELDOUT_DOCS]],
    }
    if docs_per_domain is not None:
        corpus = {d: docs[:docs_per_domain] for d, docs in corpus.items()}
    return corpus


def shared_heldout(data_dir: str | Path, n: int = SHARED_HELDOUT_DOCS) -> dict[str, list[str]]:
    """Real documents pretraining never reads: GSM8K test rows, the held-out tail of CodeAlpaca and Saferpaca."""
    files = _shared_files(data_dir)
    n = min(n, SHARED_HELDOUT_DOCS)
    test = _read_json_rows(Path(data_dir) / "gsm8k" / "test.jsonl")[:n]
    return {
        "math": [_math_doc(r) for r in test],
        "code": [_alpaca_doc(r) for r in _read_json_rows(files["code"])[-n:]],
        "safety": [_alpaca_doc(r) for r in _read_json_rows(files["safety"])[-n:]],
    }
