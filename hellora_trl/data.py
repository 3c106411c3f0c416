"""Moved to :mod:`hellora_trl.recipes.data`; this documented path stays importable as the same module object."""

import sys

from .recipes import data as _module

sys.modules[__name__] = _module
