"""Moved to :mod:`hellora_trl.recipes.sft`. This path still imports (as the same module object) but warns, and it is
removed in hellora-trl 0.3.0."""

import sys
import warnings

from .recipes import sft as _module

warnings.warn(
    "hellora_trl.sft moved to hellora_trl.recipes.sft; the old path is removed in hellora-trl 0.3.0.",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
