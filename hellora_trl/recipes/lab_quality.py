"""Moved to :mod:`hellora_trl.recipes.lab.quality`. This path still imports (as the same module object) but warns, and
it is removed in hellora-trl 0.3.0."""

import sys
import warnings

from .lab import quality as _module

warnings.warn(
    "hellora_trl.recipes.lab_quality moved to hellora_trl.recipes.lab.quality; "
    "the old path is removed in hellora-trl 0.3.0.",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
