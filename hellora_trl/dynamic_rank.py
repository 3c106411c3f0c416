"""Moved to :mod:`hellora_trl.experimental.dynamic_rank`. This path still imports (as the same module object) but
warns, and it is removed in hellora-trl 0.3.0."""

import sys
import warnings

from .experimental import dynamic_rank as _module

warnings.warn(
    "hellora_trl.dynamic_rank moved to hellora_trl.experimental.dynamic_rank; "
    "the old path is removed in hellora-trl 0.3.0.",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
