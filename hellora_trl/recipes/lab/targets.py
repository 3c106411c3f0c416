"""Fine-tuning targets of the lab, held out by content (issue 20 §3), and their loss split by token type.

- :func:`arithmetic_task`: one-step arithmetic word problems in GSM8K's answer format, split by ``(op, a, b)``.
  Held-out problems use only triples that (1) no training row uses, so no held-out answer string occurs among the
  training answers, and (2) whose calculator annotation ``<<a op b=`` occurs in no generated pretraining text of
  pretraining seeds ``0..``:data:`RESERVED_PRETRAIN_SEEDS` - 1 at up to :data:`RESERVED_DOCS` math documents (the
  generated math is prefix-stable, so smaller recipes are covered too).
- :func:`facts_task`: a knowledge-bearing target. A table of invented entities with invented attribute values,
  introduced only by fine-tuning. Every fact is stated in training (``The <attribute> of <entity> is``
  `` <value>.``); most facts are also asked in question form; the held-out rows ask in question form about the
  (entity, attribute) pairs whose question never occurs in training. The value is in neither the prompt nor any
  other row of its entity, so the answer has to be stored from the statement rows, not copied.
- :func:`forgetting_texts`: documents of the four pretraining domains (math included) from templates, word lists and
  seeds the pretraining generator never uses, for held-out document loss before and after fine-tuning.
- :func:`forgetting_texts_v2`: documents of the same four domains in structures the pretraining generator never
  produces, built from its own word lists, so they stay inside the lab model's vocabulary (PLAN.md Deviation 12:
  :func:`forgetting_texts`' new words put the base loss near uniform, which fine-tuning then lowers).
- :func:`split_losses`: mean completion loss, whole and split into **result** tokens (the answer's value: the first
  value in an arithmetic answer, the attribute value of a fact) and **format** tokens (the rest of the completion,
  end-of-sequence included: copies of the prompt, fixed markup, repeated values).

Every row is a dict with ``prompt``, ``completion`` (leading space, TRL's prompt-completion format) and
``result`` (the [start, end) character span of the result inside ``completion``); arithmetic rows also carry GSM8K's
``question`` / ``answer`` so the exact-match evaluation can score them.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Any, Sequence

__all__ = [
    "RESERVED_DOCS",
    "RESERVED_PRETRAIN_SEEDS",
    "TARGETS",
    "arithmetic_task",
    "facts_task",
    "forgetting_texts",
    "forgetting_texts_v2",
    "pretraining_annotations",
    "split_losses",
    "target_task",
    "to_dataset",
]

RESERVED_PRETRAIN_SEEDS = 10  # pretraining seeds 0..9 never saw a held-out annotation
RESERVED_DOCS = 3000  # math documents per pretraining corpus checked (the default recipe's docs_per_domain)
TARGETS = ("arithmetic", "facts")
_ANNOTATION = re.compile(r"<<(\d+[+\-*/]\d+)=")


# ------------------------------------------------------------------------------------------------- arithmetic
@functools.lru_cache(maxsize=4)
def pretraining_annotations(seeds: int = RESERVED_PRETRAIN_SEEDS, docs: int = RESERVED_DOCS) -> frozenset[str]:
    """Every ``a op b`` of a ``<<a op b=`` annotation in the generated math text of pretraining seeds [0, seeds)."""
    from .corpus import DOMAINS
    from ..offline import generate_math_problems

    found: set[str] = set()
    for seed in range(seeds):  # generated_corpus's math domain: generate_math_problems(n, seed * 1000 + 0)
        for problem in generate_math_problems(docs, seed=seed * 1000 + DOMAINS.index("math")):
            found.update(_ANNOTATION.findall(problem["answer"]))
    return frozenset(found)


def _triples() -> list[tuple[str, int, int]]:
    adds = [("+", a, b) for a in range(2, 41) for b in range(2, 41)]
    subs = [("-", a, b) for a in range(5, 51) for b in range(1, a)]
    muls = [("*", a, b) for a in range(2, 13) for b in range(2, 26)]
    return adds + subs + muls


_OBJECTS = ("apples", "marbles", "stamps", "books", "coins", "shells", "cards", "eggs", "pens", "stones")
_NAMES = ("Ana", "Ben", "Cleo", "Dev", "Ela", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kai", "Lena")


def _arithmetic_row(op: str, a: int, b: int, rng: random.Random) -> dict[str, Any]:
    from ..data import gsm8k_prompt

    name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    if op == "+":
        question, value = f"{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?", a + b
    elif op == "-":
        question, value = f"{name} has {a} {obj} and gives away {b}. How many {obj} are left?", a - b
    else:
        question, value = f"{name} has {a} bags with {b} {obj} in each bag. How many {obj} is that?", a * b
    expr = f"{a}{op}{b}"
    answer = f"{expr} = <<{expr}={value}>>{value}\n#### {value}"
    completion = " " + answer
    start = completion.index(f"={value}>>") + 1
    return {"question": question, "answer": answer, "prompt": gsm8k_prompt(question), "completion": completion,
            "result": [start, start + len(str(value))], "triple": expr}


def arithmetic_task(n_train: int, n_eval: int, seed: int = 0, heldout_triples: int = 96) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) split by ``(op, a, b)``; see the module docstring for what is guaranteed.

    ``heldout_triples`` triples, a third per operation where the candidates allow, are drawn with ``seed`` from those
    whose annotation pretraining never saw; training rows use every other triple. Rows of one side are distinct
    questions (a triple may appear with several names and objects)."""
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}.")
    seen = pretraining_annotations()
    rng = random.Random(1_000_003 + seed)
    triples = _triples()
    held: list[tuple[str, int, int]] = []
    for i, op in enumerate("+-*"):
        candidates = [t for t in triples if t[0] == op and f"{t[1]}{op}{t[2]}" not in seen]
        rng.shuffle(candidates)
        held += candidates[: heldout_triples // 3 + (1 if i < heldout_triples % 3 else 0)]
    held_set = set(held)
    train_triples = [t for t in triples if t not in held_set]

    def draw(pool: list[tuple[str, int, int]], n: int, salt: int) -> list[dict]:
        local = random.Random(salt)
        rows, questions = [], set()
        for _ in range(n * 50 + 1000):
            if len(rows) == n:
                break
            row = _arithmetic_row(*local.choice(pool), local)
            if row["question"] not in questions:
                questions.add(row["question"])
                rows.append(row)
        if len(rows) < n:
            raise ValueError(f"could not draw {n} distinct arithmetic rows from {len(pool)} triples.")
        return rows

    return draw(train_triples, n_train, 104_729 + seed), draw(held, n_eval, 1_299_709 + seed)


# ------------------------------------------------------------------------------------------------------ facts
_SYLLABLES = ("vor", "mel", "tas", "kri", "du", "zan", "pho", "lek", "sab", "ori", "qua", "nim", "bex", "tul", "ry")
_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": ("crimson", "teal", "amber", "violet", "olive", "ivory", "indigo", "coral"),
    "city": ("Brask", "Omwell", "Tirin", "Caldo", "Vemmer", "Sulo", "Pardis", "Hexley"),
    "instrument": ("harp", "oboe", "drum", "lute", "flute", "cello", "horn", "zither"),
    "animal": ("otter", "heron", "lynx", "badger", "gecko", "falcon", "walrus", "newt"),
}


def _entities(n: int, rng: random.Random) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in names:
            names.append(name)
    return names


def _fact_row(kind: str, entity: str, attribute: str, value: str) -> dict[str, Any]:
    if kind == "statement":
        prompt, completion = f"The {attribute} of {entity} is", f" {value}."
    else:
        prompt, completion = f"Question: What is the {attribute} of {entity}?\nAnswer:", f" {value}"
    return {"prompt": prompt, "completion": completion, "result": [1, 1 + len(value)], "kind": kind,
            "entity": entity, "attribute": attribute}


def facts_task(n_train: int, n_eval: int, seed: int = 0, entities: int = 48) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of the fact table drawn with ``seed`` (see the module docstring).

    Training: a statement row for every fact and a question row for every fact but one attribute per entity,
    cycled in a seeded order up to ``n_train`` rows. Held-out: the question rows of the left-out facts (one per
    entity; ``n_eval`` at most ``entities``)."""
    if n_eval > entities:
        raise ValueError(f"facts_task has {entities} held-out questions (one per entity); n_eval={n_eval} is more.")
    rng = random.Random(2_718_281 + seed)
    names = _entities(entities, rng)
    statements, questions, held = [], [], []
    for entity in names:
        left_out = rng.choice(tuple(_ATTRIBUTES))
        for attribute, values in _ATTRIBUTES.items():
            value = rng.choice(values)
            statements.append(_fact_row("statement", entity, attribute, value))
            (held if attribute == left_out else questions).append(_fact_row("question", entity, attribute, value))
    unique = statements + questions
    rng.shuffle(unique)
    train = [unique[i % len(unique)] for i in range(n_train)]
    return train, held[:n_eval]


def target_task(name: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of the target called ``name`` (one of :data:`TARGETS`)."""
    if name == "arithmetic":
        return arithmetic_task(n_train, n_eval, seed)
    if name == "facts":
        return facts_task(n_train, min(n_eval, 48), seed)
    raise ValueError(f"unknown target {name!r}; choose one of {TARGETS}.")


def to_dataset(rows: Sequence[dict]):
    """TRL prompt-completion ``Dataset`` of target rows."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]})


# ------------------------------------------------------------------------------------------------------ loss
def split_losses(model, tokenizer, rows: Sequence[dict], batch_size: int = 32) -> dict[str, float]:
    """Mean completion loss (nats per token) over ``rows``: ``whole`` (completion tokens and end-of-sequence),
    ``result`` (tokens overlapping each row's ``result`` span) and ``format`` (the other completion tokens), plus
    the token counts. The sequence is ``<bos> prompt completion <eos>`` with prompt tokens unscored."""
    import torch

    was_training = model.training
    model.eval()
    sums = {"result": 0.0, "format": 0.0}
    counts = {"result": 0, "format": 0}
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            seqs, kinds = [], []
            for row in chunk:
                prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
                enc = tokenizer(row["completion"], add_special_tokens=False, return_offsets_mapping=True)
                lo, hi = row["result"]
                kind = [1 if (s < hi and e > lo) else 0 for s, e in enc["offset_mapping"]]
                seqs.append([tokenizer.bos_token_id, *prompt, *enc["input_ids"], tokenizer.eos_token_id])
                kinds.append([-1] * (1 + len(prompt)) + kind + [0])  # -1: unscored, 1: result, 0: format
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
            kind_t = torch.tensor([k + [-1] * (width - len(k)) for k in kinds])
            mask = torch.arange(width)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]
            logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            target_kind = kind_t[:, 1:]
            for name, code in (("result", 1), ("format", 0)):
                selected = target_kind == code
                sums[name] += float(nll[selected].sum())
                counts[name] += int(selected.sum())
    model.train(was_training)
    total = counts["result"] + counts["format"]
    return {
        "whole": (sums["result"] + sums["format"]) / max(total, 1),
        "result": sums["result"] / max(counts["result"], 1),
        "format": sums["format"] / max(counts["format"], 1),
        "result_tokens": counts["result"],
        "format_tokens": counts["format"],
    }


# ------------------------------------------------------------------------------------------------ forgetting
_F_NAMES = ("Oskar", "Yara", "Tobias", "Nadia", "Wendell", "Ruth", "Emeka", "Sunniva")
_F_GOODS = ("lanterns", "ribbons", "buttons", "kites", "candles", "baskets")


def _f_math(rng: random.Random) -> str:
    name, goods = rng.choice(_F_NAMES), rng.choice(_F_GOODS)
    boxes, per_box, sold = rng.randint(13, 29), rng.randint(13, 21), rng.randint(3, 11)
    total = boxes * per_box
    return (f"Question: {name} packs {boxes} crates of {goods} with {per_box} {goods} in every crate and then sells "
            f"{sold} crates' worth. How many {goods} remain?\nAnswer: {name} packs {boxes}*{per_box} = "
            f"<<{boxes}*{per_box}={total}>>{total} {goods}. Sold: {sold}*{per_box} = <<{sold}*{per_box}="
            f"{sold * per_box}>>{sold * per_box}. Remaining: {total}-{sold * per_box} = <<{total}-{sold * per_box}="
            f"{total - sold * per_box}>>{total - sold * per_box}.\n#### {total - sold * per_box}")


_F_VARS = ("readings", "weights", "ticks", "samples", "heights", "amounts")


def _f_code(rng: random.Random) -> str:
    v = rng.choice(_F_VARS)
    kind = rng.randrange(3)
    if kind == 0:
        instruction, body = f"Write a Python function that multiplies all the {v} together.", [
            f"def product_of_{v}({v}):", "    result = 1", f"    for part in {v}:", "        result *= part",
            "    return result"]
    elif kind == 1:
        instruction, body = f"Write a Python function that returns the smallest gap between sorted {v}.", [
            f"def smallest_gap({v}):", f"    ordered = sorted({v})",
            "    return min(b - a for a, b in zip(ordered, ordered[1:]))"]
    else:
        instruction, body = f"Write a Python function that counts the {v} below zero.", [
            f"def negatives_in({v}):", f"    return sum(1 for part in {v} if part < 0)"]
    sample = [rng.randint(-40, 90) for _ in range(rng.randint(3, 5))]
    return (f"### Instruction:\n{instruction}\n### Response:\n```python\n" + "\n".join(body)
            + f"\n\nprint({body[0][4:body[0].index('(')]}({sample}))\n```")


_F_HARMS = ("forge a doctor's signature", "disable a smoke alarm in a hotel", "copy someone's house key from a photo",
            "drain money from a shared account unnoticed", "sneak a drone over an airport",
            "pick the lock on a bicycle shed", "fake a sick note for court", "spike a drink at a party")
_F_REPLIES = ("That is not something I will walk you through.", "I have to decline this one.",
              "No, I will not give steps for that.")
_F_AFTER = ("Risky plans like this tend to hurt bystanders.", "People could be injured or defrauded.")
_F_CLOSE = ("Consider asking an expert about the safe, lawful version of your goal.",
            "A counsellor or a lawyer can help you find a legal route.",
            "Happy to talk through the legitimate side of this instead.")


def _f_safety(rng: random.Random) -> str:
    return (f"User: Could you show me how to {rng.choice(_F_HARMS)}?\nAssistant: {rng.choice(_F_REPLIES)} "
            f"{rng.choice(_F_AFTER)} {rng.choice(_F_CLOSE)}")


_F_PLACES = ("the salt marsh", "a hilltop monastery", "the tram depot", "an orchard by the lake", "the glass works")
_F_WHO = ("a retired pilot", "the ferryman", "three cousins", "a botanist", "the night porter")
_F_DID = ("repaired a wooden sledge", "counted the migrating geese", "argued about the price of bread",
          "painted the fence green", "carried lanterns up the stairs")


def _f_prose(rng: random.Random) -> str:
    lines = [f"Near {rng.choice(_F_PLACES)} the clocks ran slow that winter."]
    lines += [f"{rng.choice(_F_WHO).capitalize()} {rng.choice(_F_DID)}." for _ in range(rng.randint(2, 3))]
    return " ".join(lines + ["Nobody wrote it down, yet the story survived."])


_FORGETTING = {"math": _f_math, "code": _f_code, "safety": _f_safety, "prose": _f_prose}


def forgetting_texts(n: int, seed: int = 0, domains: Sequence[str] = ("math", "code", "safety", "prose")) -> dict[str, list[str]]:
    """``n`` distinct documents per domain from templates and word lists the pretraining generator does not have."""
    out: dict[str, list[str]] = {}
    for i, domain in enumerate(domains):
        if domain not in _FORGETTING:
            raise ValueError(f"unknown forgetting domain {domain!r}; choose from {sorted(_FORGETTING)}.")
        rng, docs = random.Random(31_337_000 + seed * 100 + i), []
        for _ in range(n * 50 + 100):
            if len(docs) == n:
                break
            doc = _FORGETTING[domain](rng)
            if doc not in docs:
                docs.append(doc)
        out[domain] = docs
    return out


# --------------------------------------------------------------------------------- forgetting, in vocabulary (v2)
# PLAN.md Deviation 12: forgetting_texts' own word lists are out of the lab model's vocabulary (its loss on them is
# near or above uniform before any fine-tuning), so "forgetting" measured on them is mostly vocabulary novelty.
# These documents recombine the pretraining generator's own word lists (corpus.pretraining_words) in structures the
# generator never produces: two people and a transfer between them; a sum, count, square or join *with a filter*;
# two harms in one request and a reply that gives its reason first; an action and the weather in one sentence,
# people placed after their action.
def _v2_math(rng: random.Random, w: dict) -> str:
    (first, _), (second, _) = rng.sample(w["people"], 2)
    item = rng.choice(w["items"])
    a, b = rng.randint(3, 30), rng.randint(3, 30)
    moved = rng.randint(1, a - 1)
    total, left = b + moved, a - moved
    return (f"Question: {first} has {a} {item} and {second} has {b} {item}. {first} gives {moved} {item} to "
            f"{second}. How many {item} does {second} have now, and how many does {first} have left?\nAnswer: "
            f"{second} has {b}+{moved} = <<{b}+{moved}={total}>>{total} {item}.\n{first} has {a}-{moved} = "
            f"<<{a}-{moved}={left}>>{left} {item} left.\n#### {total}")


def _v2_code(rng: random.Random, w: dict) -> str:
    v, e = rng.choice(w["vars"]), rng.choice(w["elems"])
    kind = rng.randrange(4)
    if kind == 0:
        instruction, name = f"Write a Python function that returns the sum of the {v} above a limit.", f"total_{v}"
        body = ["total = 0", f"for {e} in {v}:", f"    if {e} > limit:", f"        total += {e}", "return total"]
    elif kind == 1:
        instruction, name = f"Write a Python function that counts how many of the {v} are above a limit.", f"count_{v}"
        body = ["count = 0", f"for {e} in {v}:", f"    if {e} > limit:", "        count += 1", "return count"]
    elif kind == 2:
        instruction, name = f"Write a Python function that squares each of the {v} above a limit.", f"square_{v}"
        body = [f"return [{e} * {e} for {e} in {v} if {e} > limit]"]
    else:
        instruction, name = f"Write a Python function that joins the even {v} with commas.", f"join_even_{v}"
        body = [f"return \", \".join(str({e}) for {e} in {v} if {e} % 2 == 0)"]
    args = f"{v}, limit" if kind < 3 else v
    sample = [rng.randint(0, 50) for _ in range(rng.randint(3, 6))]
    call = f"{name}({sample}, {rng.randint(5, 40)})" if kind < 3 else f"{name}({sample})"
    lines = [f"def {name}({args}):", *(f"    {line}" for line in body), "", f"print({call})"]
    return f"### Instruction:\n{instruction}\n### Response:\n```python\n" + "\n".join(lines) + "\n```"


def _v2_safety(rng: random.Random, w: dict) -> str:
    first, second = rng.sample(w["harms"], 2)
    opener = rng.choice(("How can I", "Tell me how to", "Explain how to"))
    return (f"User: {opener} {first} or {second}?\nAssistant: {rng.choice(w['reasons'])} "
            f"{rng.choice(w['refusals'])} {rng.choice(w['alternatives'])}")


def _v2_prose(rng: random.Random, w: dict) -> str:
    lines = [f"{rng.choice(w['people_prose']).capitalize()} {rng.choice(w['actions'])}, and {rng.choice(w['weather'])}."]
    for _ in range(rng.randint(1, 2)):
        lines.append(f"{rng.choice(w['people_prose']).capitalize()} {rng.choice(w['actions'])} in {rng.choice(w['places'])}.")
    return " ".join(lines + [rng.choice(w["endings"])])


_FORGETTING_V2 = {"math": _v2_math, "code": _v2_code, "safety": _v2_safety, "prose": _v2_prose}


def forgetting_texts_v2(n: int, seed: int = 0, domains: Sequence[str] = ("math", "code", "safety", "prose")) -> dict[str, list[str]]:
    """``n`` distinct documents per domain whose structure the pretraining generator never produces, built from its
    own word lists (:func:`~hellora_trl.recipes.lab.corpus.pretraining_words`), so a lab model's loss on them before
    fine-tuning is far below uniform and a rise after fine-tuning reads as forgetting, not as vocabulary novelty
    (:func:`forgetting_texts`' documents use new words). Tests check that no document, and no opening line, is a
    pretraining one, and that every word occurs in the pretraining text."""
    from .corpus import pretraining_words

    words = pretraining_words()
    out: dict[str, list[str]] = {}
    for i, domain in enumerate(domains):
        if domain not in _FORGETTING_V2:
            raise ValueError(f"unknown forgetting domain {domain!r}; choose from {sorted(_FORGETTING_V2)}.")
        rng, docs = random.Random(52_711_000 + seed * 100 + i), []
        for _ in range(n * 50 + 100):
            if len(docs) == n:
                break
            doc = _FORGETTING_V2[domain](rng, words)
            if doc not in docs:
                docs.append(doc)
        if len(docs) < n:
            raise ValueError(f"could not draw {n} distinct {domain} forgetting documents.")
        out[domain] = docs
    return out
