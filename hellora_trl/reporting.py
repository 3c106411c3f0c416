"""Moved to :mod:`hellora_trl.recipes.reporting`; this documented path stays importable as the same module object."""

import sys

from .recipes import reporting as _module

sys.modules[__name__] = _module
