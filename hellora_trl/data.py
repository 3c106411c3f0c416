"""Moved to :mod:`hellora_trl.recipes.data`. This path still imports (as the same module object) but warns, and it is
removed in hellora-trl 0.3.0."""

import sys
import warnings

from .recipes import data as _module

warnings.warn(
    "hellora_trl.data moved to hellora_trl.recipes.data; the old path is removed in hellora-trl 0.3.0.",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
