"""The ``hellora`` command line: profile, select, train, eval, report, merge, export, ablate.

Laid out like TRL's ``trl`` CLI: the top level only picks the subcommand; each subcommand parses the rest with a
``TrlParser`` over dataclasses, so ``hellora <cmd> --help`` lists every field and ``--config x.yaml`` works for every
subcommand (command-line values win over the YAML). Heavy imports happen inside the subcommands.

Errors a user can fix (missing files, a profile of another model, bad values) are printed as one line and exit with
status 1; set ``HELLORA_TRACEBACK=1`` to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

TASKS = ("gsm8k", "codealpaca", "saferpaca")
EVAL_TASKS = ("gsm8k", "humaneval", "safety")
STRATEGIES = ("layer", "model", "cold", "random", "mass")  # mirrors selection.STRATEGIES, checked there too
TRAINER_SEED = 42  # transformers' default seed: the offline base model and warm-up slices of `hellora train`
CONFIG_EPILOG = "Every option can also be set in a YAML file passed as --config x.yaml; command-line values win."


class CLIError(Exception):
    """A problem with the user's input that a one-line message explains."""


# ------------------------------------------------------------------------------------------------ arguments
@dataclass
class ModelArguments:
    """The base model: a local directory / hub id, or an offline tiny random model (tests, demos)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base (or merged) model: local directory or hub id."}
    )
    tiny: str | None = field(
        default=None,
        metadata={
            "help": "Use an offline tiny random MoE model of this family instead (olmoe, mixtral, qwen2_moe, "
            "qwen3_moe, deepseek_v2, deepseek_v3, gpt_oss). `--tiny olmoe` is the model `hellora train` builds "
            "when given no model."
        },
    )
    tiny_seed: int = field(
        default=TRAINER_SEED, metadata={"help": "Weight seed of the tiny model (42 = `hellora train`'s default)."}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype for a loaded model.", "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1... (default: cuda if available)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})

    def given(self) -> bool:
        return self.model_name_or_path is not None or self.tiny is not None

    def describe(self) -> str:
        return self.model_name_or_path or f"tiny:{self.tiny}(seed={self.tiny_seed})"


@dataclass
class DataArguments:
    """Text to route through the model: the sources of ``hellora train``, tokenized for forward passes."""

    task: str = field(default="gsm8k", metadata={"help": "Data format of the source.", "choices": list(TASKS)})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, local JSON/JSONL file or folder (e.g. ../shared/datasets/gsm8k). None: generated "
            "GSM8K-style problems (task gsm8k only, as `hellora train` offline)."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to read."})
    limit: int | None = field(default=None, metadata={"help": "Keep only the first N rows."})
    fraction: float = field(
        default=1.0, metadata={"help": "Profile a seeded random share of the rows (the trainer's warm-up slice)."}
    )
    seed: int = field(default=TRAINER_SEED, metadata={"help": "Seed of the fraction slice (trainer default: 42)."})
    chat_format: bool = field(default=False, metadata={"help": "GSM8K as chat messages instead of prompt-completion."})
    max_length: int = field(default=512, metadata={"help": "Truncate each row to this many tokens."})
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass."})
    max_batches: int | None = field(default=None, metadata={"help": "Stop after this many batches."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})


@dataclass
class ProfileArguments:
    output: str = field(default="hellora_profile.json", metadata={"help": "Where to write the profile JSON."})
    save_model_to: str | None = field(
        default=None,
        metadata={"help": "Also save the base model and tokenizer there (handy with --tiny: later commands can "
                  "take that directory as --model_name_or_path)."},
    )


@dataclass
class SelectArguments:
    profile: str = field(default=None, metadata={"help": "Profile JSON (from `hellora profile` or a training run)."})
    output: str = field(
        default="hellora_hot_experts.json",
        metadata={"help": "Output: the profile with `hot_experts` and `selection` stored alongside (the trainer's "
                  "hellora_profile.json layout)."},
    )
    k: int | None = field(default=None, metadata={"help": "Hot experts per layer (default: experts per token, "
                                                          "doubled with shared experts)."})
    strategy: str = field(default="layer", metadata={"help": "Selection strategy.", "choices": list(STRATEGIES)})
    seed: int = field(default=TRAINER_SEED, metadata={"help": "Seed of the 'random' strategy."})
    mass: float = field(default=0.5, metadata={"help": "'mass': share of routing each layer's hot set covers."})
    min_k: int = field(default=1, metadata={"help": "'mass': smallest hot set."})
    max_k: int | None = field(default=None, metadata={"help": "'mass': largest hot set (default: all experts)."})


@dataclass
class EvalArguments:
    task: str = field(default="gsm8k", metadata={"help": "Benchmark.", "choices": list(EVAL_TASKS)})
    adapter: str | None = field(
        default=None,
        metadata={"help": "HELLoRA adapter directory (loaded on the base model). Without it, --model_name_or_path "
                  "is evaluated as is (e.g. a merged checkpoint)."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "gsm8k: file, folder or hub id (None: generated problems, the held-out set of `hellora "
                  "train` offline); humaneval: HumanEval .jsonl(.gz); safety: harmful instructions JSON/CSV."},
    )
    dataset_split: str = field(default="test", metadata={"help": "gsm8k split."})
    benign_path: str | None = field(default=None, metadata={"help": "safety: benign instructions (over-refusal)."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N examples."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation budget per example."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    chat: bool = field(default=False, metadata={"help": "gsm8k: wrap prompts in the chat template."})
    backend: str = field(default="hf", metadata={"help": "Generation backend (vllm needs a merged model directory).",
                                                "choices": ["hf", "vllm"]})
    timeout: float = field(default=5.0, metadata={"help": "humaneval: seconds per program."})
    seed: int = field(default=TRAINER_SEED, metadata={"help": "Seed of the generated GSM8K problems (+10000)."})
    output_dir: str = field(default="hellora_eval", metadata={"help": "Where results.json and results.md go."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})


@dataclass
class ReportArguments:
    profiles: list[str] = field(
        default_factory=list,
        metadata={"help": "Profile JSONs, each optionally labelled: gsm8k=runs/math/hellora_profile.json."},
    )
    output_dir: str = field(default="hellora_report", metadata={"help": "Where the PNGs and report.md go."})
    k: int | None = field(default=None, metadata={"help": "Hot experts per layer (default: the family default)."})
    strategy: str = field(default="layer", metadata={"help": "Selection for boxes when a profile stores no hot map.",
                                                    "choices": list(STRATEGIES)})
    stability_fractions: list[float] = field(
        default_factory=list,
        metadata={"help": "With a model and data: profile the full data once and compare warm-up slices of these "
                  "fractions against it (paper: 0.01 0.05 0.1 0.2 0.5)."},
    )
    stability_seeds: int = field(default=1, metadata={"help": "Slices per fraction (seeds seed..seed+n-1), averaged."})
    stability_profiles: list[str] = field(
        default_factory=list,
        metadata={"help": "Or: separately taken profiles labelled with their fraction, 0.05=p5.json (or read from "
                  "the profile's source), compared against --reference_profile."},
    )
    reference_profile: str | None = field(default=None, metadata={"help": "Full-data profile for --stability_profiles."})


@dataclass
class MergeArguments:
    adapter: str = field(default=None, metadata={"help": "HELLoRA adapter directory."})
    output_dir: str = field(default=None, metadata={"help": "Directory to write."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


@dataclass
class ExportArguments(MergeArguments):
    format: str = field(
        default="merged",
        metadata={"help": "merged: plain transformers checkpoint; peft: stock-PEFT target_parameters adapter.",
                  "choices": ["merged", "peft"]},
    )


# ------------------------------------------------------------------------------------------------ helpers
def _parse(name: str, types: Sequence[type], argv: Sequence[str], description: str) -> tuple:
    """TrlParser over ``types`` with ``--config`` support; ``--help`` exits like any argparse program."""
    from trl import TrlParser

    parser = TrlParser(list(types), prog=f"hellora {name}", description=description, epilog=CONFIG_EPILOG)
    return parser.parse_args_and_config(list(argv))


def _require(value: Any, flag: str, what: str) -> Any:
    if value is None or value == []:
        raise CLIError(f"{flag} is required ({what}).")
    return value


def _existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{what} not found: {path}")
    return path


def _device(model_args: ModelArguments) -> str:
    import torch

    return model_args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_model_source(model_args: ModelArguments) -> None:
    if model_args.model_name_or_path and model_args.tiny:
        raise CLIError("Give either --model_name_or_path or --tiny, not both.")
    if not model_args.given():
        raise CLIError("No model: pass --model_name_or_path (directory or hub id) or --tiny olmoe.")


def _tiny_overrides(family: str) -> dict[str, Any]:
    """OLMoE gets the shape of `hellora train`'s offline default model, so adapters trained offline load on it."""
    if family == "olmoe":
        from .sft import OFFLINE_MODEL

        return dict(OFFLINE_MODEL)
    return {}


def load_model(model_args: ModelArguments):
    """The base model (float32 tiny model, or from_pretrained in the requested dtype) on its device."""
    _check_model_source(model_args)
    if model_args.tiny:
        from .offline import tiny_moe_model

        model = tiny_moe_model(model_args.tiny, seed=model_args.tiny_seed, **_tiny_overrides(model_args.tiny))
        if model_args.dtype != "auto":
            import torch

            model = model.to(getattr(torch, model_args.dtype))
    else:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = "auto" if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, dtype=dtype, trust_remote_code=model_args.trust_remote_code
        )
    return model.to(_device(model_args))


def load_tokenizer(model_args: ModelArguments, *preferred: str | os.PathLike | None):
    """From the first of ``preferred`` that holds tokenizer files (an adapter dir), else the base model."""
    from transformers import AutoTokenizer

    _check_model_source(model_args)
    for source in preferred:
        if source and (Path(source) / "tokenizer_config.json").is_file():
            return _with_pad(AutoTokenizer.from_pretrained(str(source)))
    if model_args.tiny:
        from .offline import build_tokenizer

        return build_tokenizer()
    return _with_pad(AutoTokenizer.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code))


def _with_pad(tokenizer):
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def meta_model(model_args: ModelArguments):
    """The model's module tree without weights: enough to check a profile against it, at no memory cost."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_model_source(model_args)
    if model_args.tiny:
        from .offline import tiny_moe_config

        config = tiny_moe_config(model_args.tiny, **_tiny_overrides(model_args.tiny))
    else:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)


@contextlib.contextmanager
def base_model_path(model_args: ModelArguments) -> Iterator[str]:
    """A path/hub id for functions that load the base themselves; a tiny model is saved to a temporary directory
    with its tokenizer, so exports get a tokenizer to carry over."""
    _check_model_source(model_args)
    if not model_args.tiny:
        yield model_args.model_name_or_path
        return
    with tempfile.TemporaryDirectory(prefix="hellora_tiny_") as tmp:
        save_model(load_model(model_args), load_tokenizer(model_args), tmp)
        yield tmp


def save_model(model, tokenizer, path: str | os.PathLike) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def _row_text(row: dict[str, Any], tokenizer) -> str:
    """One training row as the text the model reads (prompt+completion, chat messages, or plain text)."""
    if "messages" in row:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return "\n".join(m["content"] for m in row["messages"])
    if "prompt" in row:
        prompt, completion = row["prompt"], row.get("completion", "")
        if isinstance(prompt, list):  # conversational prompt-completion
            return _row_text({"messages": prompt + (completion or [])}, tokenizer)
        return prompt + completion
    if "text" in row:
        return row["text"]
    raise CLIError(f"Cannot read text from a row with columns {sorted(row)} (expected messages, prompt or text).")


def tokenized_rows(data_args: DataArguments, tokenizer):
    """The task's training rows (as `hellora train` loads them), sliced by fraction and tokenized."""
    from datasets import Dataset

    from .data import sample_fraction
    from .sft import HELLoRAScriptArguments, load_task_data

    script = HELLoRAScriptArguments(
        task=data_args.task, dataset_name=data_args.dataset_name, dataset_train_split=data_args.dataset_split,
        train_limit=data_args.limit, chat_format=data_args.chat_format, eval_limit=0,
    )
    rows, _ = load_task_data(script, seed=data_args.seed)
    if data_args.fraction < 1.0:
        rows = sample_fraction(rows, data_args.fraction, data_args.seed)
    texts = [_row_text(row, tokenizer) for row in rows]
    enc = tokenizer(texts, truncation=True, max_length=data_args.max_length)
    keep = [i for i, ids in enumerate(enc["input_ids"]) if ids]
    return Dataset.from_dict({
        "input_ids": [enc["input_ids"][i] for i in keep],
        "attention_mask": [enc["attention_mask"][i] for i in keep],
    })


def _data_source(data_args: DataArguments, model_args: ModelArguments, rows: int) -> dict[str, Any]:
    return {
        "task": data_args.task, "dataset": data_args.dataset_name or "offline:synthetic_gsm8k",
        "split": data_args.dataset_split, "rows": rows, "fraction": data_args.fraction, "seed": data_args.seed,
        "max_length": data_args.max_length, "model": model_args.describe(),
    }


def _print_profile_summary(profile, path: Path) -> None:
    from .selection import default_k

    k = default_k(profile)
    conc = profile.concentration(k)
    print(
        f"Wrote {path}: {profile.num_layers} MoE layers x {profile.num_experts} experts, {profile.tokens_seen} tokens; "
        f"top-{k} experts take {sum(conc) / len(conc):.1%} of routing on average (uniform: {k / profile.num_experts:.1%})."
    )


# ------------------------------------------------------------------------------------------------ subcommands
def cmd_profile(argv: Sequence[str]) -> int:
    """Forward-only routing profile of a model on a dataset -> profile JSON."""
    from .profiling import profile_experts

    model_args, data_args, args = _parse(
        "profile", (ModelArguments, DataArguments, ProfileArguments), argv,
        "Count how many tokens the router sends to each expert of each MoE layer (forward passes only).",
    )
    tokenizer = load_tokenizer(model_args)
    rows = tokenized_rows(data_args, tokenizer)  # data problems surface before the model loads
    model = load_model(model_args)
    if args.save_model_to:
        save_model(model, tokenizer, args.save_model_to)
    profile = profile_experts(
        model, rows, batch_size=data_args.batch_size, max_batches=data_args.max_batches,
        progress=not data_args.disable_tqdm, source=_data_source(data_args, model_args, len(rows)),
    )
    _print_profile_summary(profile, profile.save(args.output))
    return 0


def cmd_select(argv: Sequence[str]) -> int:
    """Profile -> hot experts per layer, stored next to the profile; prints a table."""
    from .profiling import ExpertProfile
    from .selection import select_hot_experts

    args, model_args = _parse(
        "select", (SelectArguments, ModelArguments), argv,
        "Choose the hot experts of each MoE layer from a routing profile. Pass a model to check the profile fits it.",
    )
    profile = ExpertProfile.load(_require(args.profile, "--profile", "the profile JSON to select from"))
    if model_args.given():
        profile.check_matches(meta_model(model_args))
    hot = select_hot_experts(profile, args.k, args.strategy, seed=args.seed, mass=args.mass, min_k=args.min_k,
                             max_k=args.max_k)
    selection = {"strategy": args.strategy, "k": args.k, "per_layer_k": {n: len(v) for n, v in hot.items()},
                 "seed": args.seed, "mass": args.mass if args.strategy == "mass" else None, "profile": args.profile}
    path = profile.save(args.output, extra={"hot_experts": hot, "selection": selection})
    print(hot_table(profile, hot))
    print(f"Wrote {path}")
    return 0


def hot_table(profile, hot: dict[str, list[int]]) -> str:
    """Per layer: how many experts are hot, which, and what share of that layer's routing they take."""
    shares = profile.shares()
    lines = [f"{'layer':<8} {'k':>3} {'share':>6}  hot experts"]
    for i, name in enumerate(profile.layer_names):
        ids = hot[name]
        lines.append(f"{_short(name):<8} {len(ids):>3} {float(shares[i, ids].sum()):>6.1%}  {', '.join(map(str, ids))}")
    total = sum(float(shares[i, hot[n]].sum()) for i, n in enumerate(profile.layer_names)) / profile.num_layers
    lines.append(f"mean share of routing on hot experts: {total:.1%}")
    return "\n".join(lines)


def _short(name: str) -> str:
    from .reporting import _short as short

    return short(name)


def cmd_train(argv: Sequence[str]) -> int:
    """The SFT recipe: every SFTConfig / HELLoRAConfig / ModelConfig field (see `hellora train --help`)."""
    from . import sft

    with _program_name("hellora train"):
        sft.main(list(argv))
    return 0


@contextlib.contextmanager
def _program_name(name: str) -> Iterator[None]:
    """argparse names the program after sys.argv[0]; make `--help` of a delegated parser say `hellora <cmd>`."""
    saved = sys.argv[0] if sys.argv else None
    if saved is None:
        sys.argv.append(name)
    else:
        sys.argv[0] = name
    try:
        yield
    finally:
        if saved is None:
            sys.argv.pop(0)
        else:
            sys.argv[0] = saved


def _adapter_base(args: EvalArguments | MergeArguments, model_args: ModelArguments) -> None:
    """With an adapter and no base given, use the base the adapter was trained on (its adapter_config.json)."""
    if args.adapter is None or model_args.given():
        return
    config = json.loads((Path(args.adapter) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise CLIError(f"{args.adapter} does not name its base model: pass --model_name_or_path or --tiny.")
    model_args.model_name_or_path = base


def _check_adapter(path: str | None) -> None:
    if path is not None and not (Path(path) / "adapter_config.json").is_file():
        raise CLIError(f"No adapter_config.json in {path}: not a saved HELLoRA adapter directory.")


def _eval_model(args: EvalArguments, model_args: ModelArguments):
    """(model or path for vLLM, tokenizer)."""
    _check_adapter(args.adapter)
    _adapter_base(args, model_args)
    if args.backend == "vllm":
        if args.adapter or model_args.tiny:
            raise CLIError("--backend vllm serves a checkpoint directory: run `hellora merge` first and pass the merged "
                           "directory as --model_name_or_path.")
        from .eval import _check_backend

        _check_backend("vllm")
        return model_args.model_name_or_path, load_tokenizer(model_args)
    model = load_model(model_args)
    if args.adapter:
        from .adapter import load_hellora

        model = load_hellora(model, args.adapter)
    return model, load_tokenizer(model_args, args.adapter)


def _gsm8k_rows(args: EvalArguments) -> list[dict]:
    limit = args.limit
    if args.dataset_name is None:
        from .offline import generate_math_problems

        return generate_math_problems(limit or 32, seed=args.seed + 10_000)
    from .data import _load_source

    raw = _load_source(args.dataset_name, args.dataset_split, hub_config="main")
    return [dict(r) for r in raw.select(range(min(limit or len(raw), len(raw))))]


def _check_eval_inputs(args: EvalArguments) -> None:
    """Fail on missing files before spending minutes loading a model."""
    if args.task != "gsm8k":
        _existing(_require(args.dataset_name, "--dataset_name", f"the {args.task} file"), f"{args.task} file")
    if args.benign_path:
        _existing(args.benign_path, "Benign instructions file")
    _check_adapter(args.adapter)


def _run_eval(args: EvalArguments, model, tokenizer) -> dict[str, Any]:
    from . import eval as ev

    common = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=not args.disable_tqdm,
                  backend=args.backend)
    if args.task == "gsm8k":
        return ev.evaluate_gsm8k(model, tokenizer, _gsm8k_rows(args), chat=args.chat, **common)
    path = Path(args.dataset_name)
    if args.task == "humaneval":
        problems = ev.load_humaneval(path)[: args.limit]
        completions = ev.generate_batched(model, tokenizer, [p["prompt"] for p in problems], **common)
        stops = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
        samples = {p["task_id"]: [ev._cut_at_stops(c, stops)] for p, c in zip(problems, completions)}
        return ev.evaluate_humaneval(problems, samples, ks=(1,), timeout=args.timeout, progress=not args.disable_tqdm)
    harmful = ev.load_instruction_set(path)[: args.limit]
    benign = ev.load_instruction_set(args.benign_path)[: args.limit] if args.benign_path else []
    return ev.evaluate_safety(model, tokenizer, harmful, benign, **common)


def cmd_eval(argv: Sequence[str]) -> int:
    """Adapter (on its base) or merged model -> task metric, results.json + results.md."""
    from .eval import write_results

    args, model_args = _parse(
        "eval", (EvalArguments, ModelArguments), argv,
        "Evaluate a HELLoRA adapter (on its base model) or a merged checkpoint: GSM8K accuracy, HumanEval pass@1, "
        "or refusal / over-refusal rates.",
    )
    _check_eval_inputs(args)
    model, tokenizer = _eval_model(args, model_args)
    result = _run_eval(args, model, tokenizer)
    meta = {"model": model_args.describe(), "adapter": args.adapter, "task": args.task, "dataset": args.dataset_name,
            "limit": args.limit, "max_new_tokens": args.max_new_tokens, "backend": args.backend}
    json_path, md_path = write_results({"run": meta, args.task: result}, args.output_dir)
    headline = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(f"{args.task}: {json.dumps(headline)}\nWrote {json_path} and {md_path}")
    return 0


def _labelled(spec: str) -> tuple[str | None, str]:
    """'label=path' -> (label, path); a bare path -> (None, path). Paths containing '=' need a label."""
    label, sep, path = spec.partition("=")
    return (label, path) if sep and label and not Path(spec).exists() else (None, spec)


def _profile_label(profile, path: str) -> str:
    task = profile.source.get("task")
    return f"{task} ({Path(path).stem})" if task else Path(path).stem


def load_profiles(specs: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict]]:
    """Labelled profiles, plus the hot map stored in each file (by `hellora select` or the trainer), if any."""
    from .profiling import ExpertProfile

    profiles, hot_maps = {}, {}
    for spec in specs:
        label, path = _labelled(spec)
        profile = ExpertProfile.load(path)
        label = label or _profile_label(profile, path)
        while label in profiles:
            label += "'"
        profiles[label] = profile
        stored = json.loads(Path(path).read_text()).get("hot_experts")
        if stored:
            hot_maps[label] = stored
    return profiles, hot_maps


def _fraction_of(spec: str) -> tuple[float, Any]:
    from .profiling import ExpertProfile

    label, path = _labelled(spec)
    profile = ExpertProfile.load(path)
    value = label or profile.source.get("fraction") or profile.source.get("warmup_fraction")
    if value is None:
        raise CLIError(f"{path}: no warm-up fraction; label it as 0.05={path}.")
    try:
        return float(value), profile
    except ValueError:
        raise CLIError(f"{spec}: the label must be the warm-up fraction (e.g. 0.05={path}).") from None


def _stability(args: ReportArguments, model_args: ModelArguments, data_args: DataArguments, profiles: dict) -> dict | None:
    """Table 10 from one full-data pass of a model (added to the report as 'full data'), or from labelled profiles."""
    from .profiling import ExpertProfile
    from .reporting import profile_rows, stability_from_profiles, warmup_stability

    if args.stability_profiles:
        reference = ExpertProfile.load(_require(args.reference_profile, "--reference_profile",
                                                "the full-data profile the warm-up profiles are compared with"))
        return stability_from_profiles(reference, dict(_fraction_of(s) for s in args.stability_profiles), args.k)
    if not model_args.given():
        if args.stability_fractions:
            raise CLIError("--stability_fractions needs a model and data to profile (--tiny or --model_name_or_path).")
        return None
    rows = tokenized_rows(data_args, load_tokenizer(model_args))
    model = load_model(model_args)
    for label, profile in profiles.items():
        try:
            profile.check_matches(model)
        except ValueError as err:
            raise CLIError(f"Profile {label!r}: {err}") from None
    full, per_row = profile_rows(model, rows, batch_size=data_args.batch_size, progress=not data_args.disable_tqdm,
                                 source=_data_source(data_args, model_args, len(rows)))
    full.save(Path(args.output_dir) / "full_profile.json")
    profiles["full data"] = full
    if not args.stability_fractions:
        return None
    seeds = [data_args.seed + i for i in range(max(args.stability_seeds, 1))]
    return warmup_stability(full, per_row, args.stability_fractions, args.k, seeds)


def cmd_report(argv: Sequence[str]) -> int:
    """Profiles (and optionally a model + data) -> heatmaps, concentration, Jaccard, stability PNGs + report.md."""
    from .reporting import write_report

    args, model_args, data_args = _parse(
        "report", (ReportArguments, ModelArguments, DataArguments), argv,
        "Figures and a markdown summary from routing profiles: activation heatmaps with hot experts boxed, top-k "
        "concentration, task-vs-task hot-set Jaccard, and warm-up-fraction stability (paper Table 10).",
    )
    if not (args.profiles or model_args.given() or args.stability_profiles):
        raise CLIError("Nothing to report: pass --profiles, --stability_profiles, or a model (--tiny / "
                       "--model_name_or_path) with data.")
    profiles, hot_maps = load_profiles(args.profiles)
    stability = _stability(args, model_args, data_args, profiles)
    files = write_report(profiles, args.output_dir, k=args.k, strategy=args.strategy, hot_maps=hot_maps,
                         stability=stability)
    print("Wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def _optional_module(name: str):
    """A hellora_trl module another part of the project provides, or None when this installation lacks it."""
    import importlib

    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.{name}":
            raise  # the module exists but one of its own imports is missing: show that error
        return None


def _export(args: MergeArguments, model_args: ModelArguments, fmt: str) -> Path:
    _require(args.adapter, "--adapter", "the HELLoRA adapter directory")
    _require(args.output_dir, "--output_dir", "where to write the export")
    _check_adapter(args.adapter)
    _adapter_base(args, model_args)
    export = _optional_module("export")
    if export is None:
        raise CLIError("hellora_trl.export is not part of this installation yet; update hellora-trl.")
    write = export.merge_adapter if fmt == "merged" else export.export_peft_target_parameters
    if not args.overwrite and Path(args.output_dir).is_dir() and any(Path(args.output_dir).iterdir()):
        raise CLIError(f"{args.output_dir} is not empty; pass --overwrite to replace it.")
    with base_model_path(model_args) as base:
        return write(base, args.adapter, args.output_dir, overwrite=args.overwrite)


def cmd_merge(argv: Sequence[str]) -> int:
    """Base + adapter -> one plain transformers checkpoint."""
    args, model_args = _parse(
        "merge", (MergeArguments, ModelArguments), argv,
        "Fold a HELLoRA adapter into its base model and write a plain transformers checkpoint (any engine serves it).",
    )
    print(f"Wrote merged checkpoint {_export(args, model_args, 'merged')}")
    return 0


def cmd_export(argv: Sequence[str]) -> int:
    """Adapter -> merged checkpoint or stock-PEFT layout."""
    args, model_args = _parse(
        "export", (ExportArguments, ModelArguments), argv,
        "Export a HELLoRA adapter for stacks without hellora_trl: --format merged (plain checkpoint) or peft "
        "(stock PEFT target_parameters layout, zeros for cold experts).",
    )
    print(f"Wrote {args.format} export {_export(args, model_args, args.format)}")
    return 0


ABLATION_MISSING = "hellora ablate needs hellora_trl.ablation, which is not part of this installation yet."


def cmd_ablate(argv: Sequence[str]) -> int:
    """Delegates to hellora_trl.ablation.main(argv)."""
    ablation = _optional_module("ablation")
    if ablation is None:
        if any(a in ("-h", "--help") for a in argv):
            print(f"usage: hellora ablate [options]\n\nAblation runs (selection strategies, k, components).\n\n"
                  f"{ABLATION_MISSING}")
            return 0
        raise CLIError(ABLATION_MISSING) from None
    with _program_name("hellora ablate"):
        result = ablation.main(list(argv))
    return result if isinstance(result, int) else 0


def cmd_pretrain(argv: Sequence[str]) -> int:
    """Delegates to hellora_trl.recipes.lab.main(argv): build (or reuse) the cached lab model."""
    from .recipes import lab

    with _program_name("hellora pretrain"):
        lab.main(list(argv))
    return 0


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[Sequence[str]], int]


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("profile", "count routed tokens per expert (forward only) -> profile JSON", cmd_profile),
        Command("select", "profile JSON -> hot experts per layer (JSON + table)", cmd_select),
        Command("train", "profile, select and train with HELLoRA (the SFT recipe)", cmd_train),
        Command("eval", "GSM8K / HumanEval / safety metrics of an adapter or merged model", cmd_eval),
        Command("report", "heatmaps, concentration, Jaccard and stability figures + report.md", cmd_report),
        Command("merge", "base + adapter -> plain transformers checkpoint", cmd_merge),
        Command("export", "adapter -> merged checkpoint or stock-PEFT layout", cmd_export),
        Command("ablate", "ablation runs (hellora_trl.ablation)", cmd_ablate),
        Command("pretrain", "pretrain (or reuse the cached) small lab MoE with learned routing", cmd_pretrain),
    )
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hellora", allow_abbrev=False,
        description="HELLoRA: LoRA fine-tuning of MoE models with adapters on the hot experts only.",
        epilog="Run `hellora <command> --help` for a command's options. " + CONFIG_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"hellora-trl {_version()}")
    sub = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    for command in COMMANDS.values():
        sub.add_parser(command.name, help=command.help, add_help=False)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hellora` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help / --version / an unknown command or option exit here
        parser.print_help()
        return 0
    name = argv[0]
    try:
        return COMMANDS[name].run(argv[1:])
    except (CLIError, FileNotFoundError, ValueError, ImportError) as err:
        if os.environ.get("HELLORA_TRACEBACK"):
            raise
        print(f"hellora {name}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
