"""Moved to :mod:`hellora_trl.recipes.eval`; this documented path stays importable as the same module object."""

import sys

from .recipes import eval as _module

sys.modules[__name__] = _module
