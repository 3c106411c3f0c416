"""Moved to :mod:`hellora_trl.recipes.ablation`. This path still imports (as the same module object) but warns, and it
is removed in hellora-trl 0.3.0."""

import sys
import warnings

from .recipes import ablation as _module

warnings.warn(
    "hellora_trl.ablation moved to hellora_trl.recipes.ablation; the old path is removed in hellora-trl 0.3.0.",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
