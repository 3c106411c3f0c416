"""Moved to :mod:`hellora_trl.experimental.dynamic_rank`; this documented path stays importable as the same module."""

import sys

from .experimental import dynamic_rank as _module

sys.modules[__name__] = _module
