"""The lab model: a small OLMoE-architecture MoE pretrained in-project, so routing is learned rather than noise.

No trained MoE checkpoint can be downloaded on an offline box, and a random-init model routes by chance, so no
selection strategy can beat another on it. :func:`pretrain_lab_model` trains one from scratch on a deterministic
multi-domain corpus (:mod:`hellora_trl.recipes.lab.corpus`) with a locally trained BPE tokenizer and the router
auxiliary loss, and writes a normal transformers checkpoint plus a data card (corpus, tokens, steps, time, loss
curve). :func:`lab_model_path` returns the cached checkpoint for a recipe, building it on first use.

    hellora pretrain                                   # the default recipe, cached
    hellora pretrain --data_dir ../shared/datasets      # the real GSM8K / CodeAlpaca / Saferpaca text
    hellora pretrain --rebuild --output_dir lab-model  # rebuild, and also copy it to a directory

Cache: ``$HELLORA_LAB_CACHE`` if set, else ``$HELLORA_HOME/lab``, else ``$XDG_CACHE_HOME/hellora/lab``, else
``~/.cache/hellora/lab``; one sub-directory per recipe key (a hash of every recipe field and of the data source).

Trust nothing cached: an entry is built in a hidden temp folder, gets ``lab_manifest.json`` (size and sha256 of
every file) and is renamed into place; every use verifies all files against the manifest first. A corrupt or
partial entry is never rebuilt silently (pretraining the default recipe takes minutes, and a damaged cache can
mean a failing disk): it stops with one line naming ``hellora pretrain --rebuild`` and the options that rebuild
that very entry. Temp folders left by a killed build are removed by the next run (their process is gone, or
they are older than a day). In a multi-process run (``accelerate launch``, ``torchrun``) only the first process
of each machine builds, outside any ZeRO-3/FSDP construction context; the other processes wait for the published
entry (a file lock also keeps two jobs sharing one cache from building it twice), and stop with one line if
the building process failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...distributed import is_local_main_process, unsharded_construction
from .cache import (
    CARD_NAME,
    MANIFEST_NAME,
    LabCacheError,
    build_lock,
    clean_stale,
    failure_note,
    file_sha256,
    host_tag,
    job_id,
    verify_entry,
    wait_for_entry,
    write_manifest,
)
from ...utils import atomic_dir, check_output_dir, default_mode

__all__ = [
    "LAB_RECIPES",
    "LabCacheError",
    "LabRecipe",
    "MANIFEST_NAME",
    "PretrainArguments",
    "lab_cache_dir",
    "lab_config",
    "lab_model_path",
    "load_lab_model",
    "main",
    "pretrain_lab_model",
    "verify_entry",
    "weights_sha256",
]



@dataclass(frozen=True)
class LabRecipe:
    """Everything that determines a lab checkpoint; its hash is the cache key."""

    hidden_size: int = 128
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_experts: int = 16
    num_experts_per_tok: int = 2
    vocab_size: int = 2048
    router_aux_loss_coef: float = 0.01
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 400
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    docs_per_domain: int = 3000
    seed: int = 0
    data_dir: str | None = None  # None: the generated in-project corpus

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        if self.data_dir is not None:
            fields["data_dir"] = str(Path(self.data_dir).resolve())
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Named recipes: the default (acceptance numbers, docs/lab.md), a smaller one for the slow test suite, a tiny
# one (seconds, routing barely trained) that the default test suite uses through HELLORA_LAB_RECIPE=tiny, and
# "olmoe": the paper's routing shape (64 experts, top-8; OLMoE-1B-7B has 16 layers, the lab keeps 4) with narrow
# experts, so 8 active experts are as wide as the default's 2. Build time, measured per step only: 1.45-1.95 s per
# optimizer step on 1 torch thread of a shared 2-core machine (load ~8.5; the default recipe: ~1.0 s there), so
# ~10-13 minutes for its 400 steps plus evaluation; an end-to-end build was not timed.
LAB_RECIPES: dict[str, LabRecipe] = {
    "default": LabRecipe(),
    "small": LabRecipe(hidden_size=96, intermediate_size=96, num_hidden_layers=4, num_experts=16, steps=300,
                       docs_per_domain=1200, vocab_size=1024),
    "tiny": LabRecipe(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_experts=8, vocab_size=512, seq_len=64, batch_size=8, steps=20, warmup_steps=2,
                      docs_per_domain=60),
    "olmoe": LabRecipe(hidden_size=128, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                       num_experts=64, num_experts_per_tok=8),
}


def lab_config(recipe: LabRecipe):
    """The OLMoE config of a recipe (the one place the lab architecture is defined)."""
    from ..offline import tiny_moe_config

    return tiny_moe_config(
        "olmoe",
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_attention_heads,
        num_experts=recipe.num_experts,
        num_experts_per_tok=recipe.num_experts_per_tok,
        router_aux_loss_coef=recipe.router_aux_loss_coef,
        max_position_embeddings=max(512, recipe.seq_len),
        output_router_logits=False,
    )


def lab_cache_dir() -> Path:
    """Where lab checkpoints are cached (see the module docstring for the environment overrides)."""
    if os.environ.get("HELLORA_LAB_CACHE"):
        return Path(os.environ["HELLORA_LAB_CACHE"]).expanduser()
    if os.environ.get("HELLORA_HOME"):
        return Path(os.environ["HELLORA_HOME"]).expanduser() / "lab"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "hellora" / "lab"


def _corpus(recipe: LabRecipe) -> dict[str, list[str]]:
    from .corpus import generated_corpus, shared_corpus

    if recipe.data_dir is None:
        return generated_corpus(recipe.docs_per_domain, seed=recipe.seed)
    return shared_corpus(recipe.data_dir, docs_per_domain=recipe.docs_per_domain)


def _pack(tokenizer, corpus: dict[str, list[str]], seq_len: int, seed: int):
    """Shuffle the documents of all domains together and pack ``<bos> doc <eos>`` into ``seq_len`` blocks."""
    import torch

    docs = [(d, t) for d, texts in corpus.items() for t in texts]
    random.Random(seed).shuffle(docs)
    ids: list[int] = []
    per_domain: dict[str, int] = {d: 0 for d in corpus}
    encoded = tokenizer([t for _, t in docs], add_special_tokens=False)["input_ids"]
    for (domain, _), tokens in zip(docs, encoded):
        row = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
        per_domain[domain] += len(row)
        ids.extend(row)
    usable = len(ids) // seq_len * seq_len
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, seq_len), per_domain


def domain_loss(model, tokenizer, texts: Sequence[str], seq_len: int) -> float:
    """Mean next-token loss over ``texts`` (one document per row, padded; pad positions ignored)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), 16):
            enc = tokenizer(
                [f"{tokenizer.bos_token}{t}{tokenizer.eos_token}" for t in texts[start:start + 16]],
                add_special_tokens=False, padding=True, truncation=True, max_length=seq_len, return_tensors="pt",
            )
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    model.train()
    return total / max(count, 1)


def _plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="step loss")
    window = max(1, len(losses) // 25)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    ax.plot(range(1, len(losses) + 1), smooth, lw=1.6, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (+ aux)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _card_markdown(card: dict[str, Any]) -> str:
    r = card["recipe"]
    lines = [
        "# HELLoRA lab model",
        "",
        f"OLMoE architecture, {card['parameters']:,} parameters: hidden {r['hidden_size']}, {r['num_hidden_layers']} "
        f"layers, {r['num_experts']} experts (top-{r['num_experts_per_tok']}), expert width {r['intermediate_size']}, "
        f"byte-level BPE vocabulary of {r['vocab_size']} trained on the corpus. Router aux loss coefficient "
        f"{r['router_aux_loss_coef']}.",
        "",
        f"- corpus: {card['corpus']['source']}",
        "- domains (documents / tokens): "
        + ", ".join(f"{d} {card['corpus']['documents'][d]} / {card['corpus']['tokens'][d]:,}" for d in card['corpus']['documents']),
        f"- training: {card['steps']} steps x {r['batch_size']} x {r['seq_len']} tokens = {card['tokens_trained']:,} "
        f"tokens ({card['epochs']:.2f} epochs), AdamW lr {r['learning_rate']} (cosine, {r['warmup_steps']} warm-up "
        f"steps), seed {r['seed']}",
        f"- time: {card['seconds']:.0f} s on {card['threads']} torch thread(s); weights sha256 "
        f"`{card['weights_sha256'][:16]}`",
        f"- loss: first step {card['loss_first']:.3f}, mean of the last 20 steps {card['loss_last']:.3f}",
        "- held-out loss per domain (documents from seeds pretraining never used, same templates): "
        + ", ".join(f"{d} {v:.3f}" for d, v in card["heldout_loss"].items()),
        "- routing on held-out text, top-k share per layer (uniform: "
        f"{r['num_experts_per_tok'] / r['num_experts']:.3f}): "
        + "; ".join(f"{d} " + "/".join(f"{x:.2f}" for x in v) for d, v in card["routing_concentration"].items()),
        "",
        "![loss curve](loss_curve.png)",
        "",
        f"Recipe key `{card['key']}`; rebuild with `hellora pretrain --rebuild`.",
    ]
    return "\n".join(lines) + "\n"


def pretrain_lab_model(
    recipe: LabRecipe | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    threads: int | None = None,
) -> Path:
    """Pretrain the lab model of ``recipe`` from scratch and write it to ``output_dir``; returns the directory.

    Writes a transformers checkpoint (``config.json``, ``model.safetensors``, ``generation_config.json``), the
    tokenizer, ``lab_card.json`` / ``README.md`` (the data card: corpus, tokens, steps, time, held-out loss and
    routing concentration per domain) and ``loss_curve.png``. Deterministic for a recipe and a torch thread count
    on one machine (seeded data order and init; CPU kernels reduce in a thread-dependent order, and may differ
    across machines in the last bits): the card records ``threads``, every seed and ``weights_sha256``.
    ``threads``: torch intra-op threads for this build (restored afterwards); default: the current setting.
    The model is built and trained whole, outside any ZeRO-3/FSDP construction context of the calling process,
    with no collective.
    """
    recipe = recipe or LabRecipe()
    out = Path(output_dir) if output_dir is not None else lab_cache_dir() / recipe.key()
    out.mkdir(parents=True, exist_ok=True)
    with unsharded_construction(), _torch_threads(threads):  # one process, whole weights, never ZeRO-3 shards
        return _pretrain(recipe, out, progress)


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch intra-op threads set to ``threads`` for the block (None: unchanged), restored afterwards."""
    import torch

    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}.")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _pretrain(recipe: LabRecipe, out: Path, progress: bool) -> Path:
    import torch
    from datasets import Dataset
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from ...profiling import profile_experts
    from .corpus import heldout_domain_texts, heldout_seed, shared_heldout
    from ..offline import build_tokenizer

    started = time.perf_counter()

    corpus = _corpus(recipe)
    tokenizer = build_tokenizer([t for texts in corpus.values() for t in texts], vocab_size=recipe.vocab_size)
    tokenizer.model_max_length = max(512, recipe.seq_len)
    blocks, domain_tokens = _pack(tokenizer, corpus, recipe.seq_len, recipe.seed)

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(lab_config(recipe), dtype=torch.float32).float()
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate, betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress_frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(recipe.seed)
    order = torch.randperm(len(blocks), generator=generator)
    losses: list[float] = []
    cursor = 0
    bar = tqdm(range(recipe.steps), desc="lab pretraining", disable=not progress, unit="step")
    for _ in bar:
        if cursor + recipe.batch_size > len(order):
            order, cursor = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[cursor:cursor + recipe.batch_size]]
        cursor += recipe.batch_size
        outputs = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(outputs.loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - started

    model.eval()
    if recipe.data_dir is None:
        heldout = heldout_domain_texts(min(64, recipe.docs_per_domain), seed=recipe.seed, domains=tuple(corpus))
    else:
        heldout = shared_heldout(recipe.data_dir)
    heldout_loss = {d: round(domain_loss(model, tokenizer, texts, recipe.seq_len), 4) for d, texts in heldout.items()}
    concentration = {}
    for domain, texts in heldout.items():
        rows = [{"input_ids": tokenizer(f"{tokenizer.bos_token}{t}", add_special_tokens=False)["input_ids"][: recipe.seq_len]}
                for t in texts]
        profile = profile_experts(model, Dataset.from_list(rows), batch_size=16, progress=False, reduce=False)
        concentration[domain] = [round(x, 4) for x in profile.concentration()]

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    _save_model(model, out)
    tokenizer.save_pretrained(out)
    tail = losses[-20:]
    card = {
        "key": recipe.key(),
        "recipe": dataclasses.asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": {
            "source": "generated in-project (hellora_trl.recipes.lab.corpus.generated_corpus)"
            if recipe.data_dir is None
            else f"{recipe.data_dir}: the first {recipe.docs_per_domain} rows of GSM8K train[:6000] and of "
            "CodeAlpaca 2k and Saferpaca minus their last 64 rows",
            "documents": {d: len(t) for d, t in corpus.items()},
            "tokens": domain_tokens,
        },
        "steps": recipe.steps,
        "tokens_trained": recipe.steps * recipe.batch_size * recipe.seq_len,
        "epochs": recipe.steps * recipe.batch_size / max(1, len(blocks)),
        "seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # every seed the build uses: same recipe + same threads + same machine -> the same bits (weights_sha256)
        "seeds": {
            "corpus": {d: recipe.seed * 1000 + i for i, d in enumerate(corpus)} if recipe.data_dir is None else None,
            "document_shuffle": recipe.seed,
            "init": recipe.seed,
            "block_order": recipe.seed,
            "heldout_documents": {d: heldout_seed(recipe.seed, d) for d in heldout} if recipe.data_dir is None else None,
        },
        "weights_sha256": weights_sha256(out),
        "loss_first": losses[0],
        "loss_last": sum(tail) / len(tail),
        "losses": [round(x, 4) for x in losses],
        "heldout_loss": heldout_loss,
        "routing_concentration": concentration,
    }
    _plot_losses(losses, out / "loss_curve.png", f"lab model {recipe.key()}: {card['parameters']:,} params")
    (out / CARD_NAME).write_text(json.dumps(card, indent=2))
    (out / "README.md").write_text(_card_markdown(card))
    return out


def _save_model(model, out: Path) -> None:
    """``config.json``, ``generation_config.json`` and ``model.safetensors`` as ``save_pretrained`` writes them, on
    whichever process builds: ``save_pretrained`` silently writes nothing on a process whose global rank is not 0
    (the first process of a second machine, which builds its own cache entry)."""
    from safetensors.torch import save_file

    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint directory's ``model.safetensors`` (the identity of a lab model's weights)."""
    return file_sha256(Path(path) / "model.safetensors")


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The data card of a lab checkpoint directory."""
    return json.loads((Path(path) / CARD_NAME).read_text())


def rebuild_command(recipe: LabRecipe, cache_dir: str | os.PathLike | None = None) -> str:
    """The ``hellora pretrain`` command line that rebuilds ``recipe``'s cache entry."""
    parts = ["hellora", "pretrain", "--rebuild"]
    named = next((name for name, base in LAB_RECIPES.items()
                  if dataclasses.replace(base, steps=recipe.steps, seed=recipe.seed, data_dir=recipe.data_dir) == recipe),
                 None)
    if named is None:
        return "hellora pretrain --rebuild with the same recipe (it is not a named one)"
    base = LAB_RECIPES[named]
    if named != "default":
        parts += ["--recipe", named]
    if recipe.data_dir is not None:
        parts += ["--data_dir", str(recipe.data_dir)]
    if recipe.steps != base.steps:
        parts += ["--steps", str(recipe.steps)]
    if recipe.seed != base.seed:
        parts += ["--seed", str(recipe.seed)]
    if cache_dir is not None:
        parts += ["--cache_dir", str(cache_dir)]
    return " ".join(parts)


def _publish(recipe: LabRecipe, root: Path, final: Path, progress: bool, threads: int | None = None) -> None:
    """Pretrain into a temp sibling named after this host and pid, write the manifest, rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.key()}.tmp-{host_tag()}-{os.getpid()}-", dir=root))
    try:
        pretrain_lab_model(recipe, tmp, progress=progress, threads=threads)
        write_manifest(tmp)
        tmp.chmod(default_mode(directory=True))
        old = None
        if final.exists() or final.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{recipe.key()}.old-{host_tag()}-{os.getpid()}-", dir=root))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def lab_model_path(
    recipe: LabRecipe | str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    progress: bool = True,
    threads: int | None = None,
) -> Path:
    """The cached checkpoint directory of ``recipe`` (a :class:`LabRecipe` or a name in :data:`LAB_RECIPES`).

    Built on first use (or when ``rebuild``) into a temporary sibling directory, given a manifest (size and sha256
    of every file) and renamed into place, so an interrupted run never leaves a half-written checkpoint behind that
    later runs would trust; every use verifies the entry against its manifest (:class:`LabCacheError`, one line
    naming ``hellora pretrain --rebuild``, when it does not match). Temp folders of killed builds are removed.
    Under ``accelerate launch``/``torchrun`` only the first process of each machine builds (outside any ZeRO-3/FSDP
    construction context); the others wait for the published entry.
    ``threads`` is the torch thread count of a build (:func:`pretrain_lab_model`); it is not part of the cache key,
    the card records it.
    """
    if isinstance(recipe, str):
        if recipe not in LAB_RECIPES:
            raise ValueError(f"unknown lab recipe {recipe!r}; choose one of {sorted(LAB_RECIPES)}.")
        recipe = LAB_RECIPES[recipe]
    recipe = recipe or LabRecipe()
    root = Path(cache_dir) if cache_dir is not None else lab_cache_dir()
    key = recipe.key()
    final = root / key
    fix = rebuild_command(recipe, cache_dir)
    if final.exists() and not final.is_dir():
        raise LabCacheError(f"The lab model cache entry {final} is not a folder; remove it or rebuild: {fix}")
    if not rebuild and final.is_dir() and any(final.iterdir()):
        verify_entry(final, fix)
        return final
    since = time.time() if rebuild else 0.0
    if not is_local_main_process():
        return wait_for_entry(root, final, key, fix, since)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    note = failure_note(root, key)
    with build_lock(root, key):
        if not rebuild and final.is_dir():  # another process built it while this one waited for the lock
            verify_entry(final, fix)
            return final
        note.unlink(missing_ok=True)
        try:
            _publish(recipe, root, final, progress, threads)
        except BaseException as err:
            with contextlib.suppress(OSError):
                note.write_text(json.dumps({"job": job_id(), "time": time.time(), "pid": os.getpid(),
                                            "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}))
            raise
    return final


def load_lab_model(recipe: LabRecipe | str | None = None, **kwargs):
    """(model, tokenizer) of the cached lab checkpoint, float32 on CPU; builds it first if needed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = lab_model_path(recipe, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------------------------------------------- CLI
@dataclass
class PretrainArguments:
    """``hellora pretrain``: build (or reuse) the cached lab model of a recipe."""

    recipe: str = field(default="default", metadata={"help": f"Named recipe: one of {sorted(LAB_RECIPES)}."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Pretrain on the real text in this folder (../shared/datasets layout: gsm8k, code_alpaca, "
                          "saferpaca) instead of the generated in-project corpus."},
    )
    steps: int | None = field(default=None, metadata={"help": "Override the recipe's optimizer steps."})
    seed: int | None = field(default=None, metadata={"help": "Override the recipe's seed (data order and init)."})
    rebuild: bool = field(default=False, metadata={"help": "Pretrain again even if the cache has this recipe."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Cache root (default: $HELLORA_LAB_CACHE, $HELLORA_HOME/lab or ~/.cache/hellora/lab)."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Also copy the checkpoint to this directory (a new or empty one, or pass "
                          "--overwrite_output_dir to replace what is there)."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a non-empty --output_dir (its old files are removed)."}
    )
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: torch's choice)."})

    def check(self) -> None:
        """One-line errors for bad numbers and output paths, before any corpus, tokenizer or training work."""
        for name in ("steps", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be a whole number >= 1, got {value!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"--seed must be a whole number >= 0, got {self.seed!r}.")
        if self.output_dir is not None:
            check_output_dir(self.output_dir, overwrite=self.overwrite_output_dir, flag="--overwrite_output_dir")

    def to_recipe(self) -> LabRecipe:
        self.check()
        base = LAB_RECIPES.get(self.recipe)
        if base is None:
            raise ValueError(f"unknown lab recipe {self.recipe!r}; choose one of {sorted(LAB_RECIPES)}.")
        changes: dict[str, Any] = {}
        if self.data_dir is not None:
            changes["data_dir"] = self.data_dir
        if self.steps is not None:
            changes["steps"] = self.steps
        if self.seed is not None:
            changes["seed"] = self.seed
        return dataclasses.replace(base, **changes)


def run_pretrain(args: PretrainArguments) -> Path:
    """Build or reuse the checkpoint, print its card, copy it to ``output_dir`` when given; returns its path."""
    recipe = args.to_recipe()  # checks every argument first
    path = lab_model_path(recipe, cache_dir=args.cache_dir, rebuild=args.rebuild, threads=args.threads or None)
    if args.output_dir:
        # the cache entry is an input: it may not be, hold or lie inside the copy (checked again now it exists)
        with atomic_dir(args.output_dir, args.overwrite_output_dir, inputs=(path,)) as tmp:
            shutil.copytree(path, tmp, dirs_exist_ok=True)
        path_note = f" (copied to {args.output_dir})"
    else:
        path_note = ""
    print((path / "README.md").read_text())
    print(f"lab model: {path}{path_note}")
    return path


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> Path:
    """Entry point of ``hellora pretrain``: ``--help`` lists the fields of :class:`PretrainArguments`."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(PretrainArguments, prog=prog)
    (args,) = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    return run_pretrain(args)


if __name__ == "__main__":
    main()
