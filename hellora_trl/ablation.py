"""Moved to :mod:`hellora_trl.recipes.ablation`; this documented path stays importable as the same module object."""

import sys

from .recipes import ablation as _module

sys.modules[__name__] = _module
