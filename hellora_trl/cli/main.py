"""The ``hellora`` router: the top level only picks the subcommand, as in TRL's ``trl/cli/main.py``.

Each command lives in :mod:`hellora_trl.cli.commands` as a module with a ``run(argv) -> int`` function; it is
imported only when that command runs, so ``hellora --help`` stays fast and torch-free. Each command parses the
rest of the command line itself (a ``TrlParser`` over dataclasses, so ``hellora <cmd> --help`` lists every field
and ``--config x.yaml`` works).

Errors a user can fix (missing files, a profile of another model, bad values, an option argparse rejects such as an
invalid choice or a non-integer, an adapter that does not fit the model) are printed as one line and exit with
status 1; set ``HELLORA_TRACEBACK=1`` to see the full traceback (and argparse's usage block) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Sequence

from ..constants import VERSION
from .arguments import CONFIG_EPILOG, CLIError

__all__ = ["COMMANDS", "Command", "main"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str

    @property
    def module(self) -> str:
        return f"{__package__}.commands.{self.name}"

    def run(self, argv: Sequence[str]) -> int:
        return importlib.import_module(self.module).run(list(argv))


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("profile", "count routed tokens per expert (forward only) -> profile JSON"),
        Command("select", "profile JSON -> hot experts per layer (JSON + table)"),
        Command("train", "profile, select and train with HELLoRA (the SFT recipe)"),
        Command("dpo", "profile, select and train with HELLoRA under TRL's DPOTrainer (preference pairs)"),
        Command("grpo", "profile, select and train with HELLoRA under TRL's GRPOTrainer (reward functions)"),
        Command("eval", "GSM8K / HumanEval / safety metrics of an adapter or merged model"),
        Command("report", "heatmaps, concentration, Jaccard and stability figures + report.md"),
        Command("merge", "base + adapter -> plain transformers checkpoint"),
        Command("export", "adapter -> merged checkpoint or stock-PEFT layout"),
        Command("ablate", "ablations: selection / k / components / warm-up / variant, one axis at a time"),
        Command("pretrain", "pretrain (or reuse the cached) small lab MoE with learned routing"),
    )
}


def top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hellora", allow_abbrev=False,
        description="HELLoRA: LoRA fine-tuning of MoE models with adapters on the hot experts only.",
        epilog="Run `hellora <command> --help` for a command's options. " + CONFIG_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"hellora-trl {VERSION}")
    sub = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    for command in COMMANDS.values():
        sub.add_parser(command.name, help=command.help, add_help=False)
    return parser


@contextlib.contextmanager
def one_line_option_errors(name: str):
    """While a command runs, an option argparse rejects (invalid choice, wrong type, missing value) raises
    :class:`CLIError` instead of printing the whole usage block and exiting with status 2: every parser a command
    builds (``TrlParser``, ``HfArgumentParser``) inherits ``error`` from ``argparse.ArgumentParser``."""
    original = argparse.ArgumentParser.error

    def error(parser: argparse.ArgumentParser, message: str):
        raise CLIError(f"{message} (see `hellora {name} --help`)")

    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def size_mismatch(err: RuntimeError) -> str | None:
    """The first ``size mismatch`` line of a state-dict load error (an adapter trained on another model), or None."""
    lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
    return lines[0] if lines else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hellora` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = top_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help / --version / an unknown command or option exit here
        parser.print_help()
        return 0
    name = argv[0]
    try:
        if os.environ.get("HELLORA_TRACEBACK"):
            return COMMANDS[name].run(argv[1:])
        with one_line_option_errors(name):
            return COMMANDS[name].run(argv[1:])
    except (CLIError, OSError, ValueError, ImportError) as err:  # OSError: missing, read-only, a folder for a file
        if os.environ.get("HELLORA_TRACEBACK"):
            raise
        print(f"hellora {name}: error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        mismatch = size_mismatch(err)
        if mismatch is None or os.environ.get("HELLORA_TRACEBACK"):
            raise
        print(f"hellora {name}: error: the adapter does not fit this base model ({mismatch}). Pass the model it was "
              "trained on; for `hellora train`'s offline run that is the lab model: --model_name_or_path <the path "
              "`hellora pretrain` prints>, not --tiny olmoe.", file=sys.stderr)
        return 1
    except Exception as err:
        if type(err).__module__.split(".")[0] != "yaml" or os.environ.get("HELLORA_TRACEBACK"):
            raise
        print(f"hellora {name}: error: the --config YAML does not parse: {err}", file=sys.stderr)
        return 1
