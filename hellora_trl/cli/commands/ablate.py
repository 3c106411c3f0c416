"""``hellora ablate``: the ablation grid of :mod:`hellora_trl.recipes.ablation` (its own options first, every
other option a ``hellora train`` option)."""

from __future__ import annotations

import importlib
from typing import Sequence

DESCRIPTION = ("Ablation runs: train one row per setting (selection strategy, k, components, warm-up fraction, "
               "variant) and tabulate trainable %, adapter FLOPs, throughput, loss and the task metric.")
EPILOG = "Every other option is a `hellora train` option (see `hellora train --help`), including --config x.yaml."


def run(argv: Sequence[str]) -> int:
    ablation = importlib.import_module("hellora_trl.recipes.ablation")  # a broken install fails here, in one line

    if any(a in ("-h", "--help") for a in argv):
        from transformers import HfArgumentParser

        HfArgumentParser(ablation.AblationArguments, prog="hellora ablate", description=DESCRIPTION,
                         epilog=EPILOG).print_help()
        return 0
    ablation.main(list(argv), prog="hellora ablate")
    return 0
