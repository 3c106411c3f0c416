"""Moved to :mod:`hellora_trl.recipes.offline`; this documented path stays importable as the same module object."""

import sys

from .recipes import offline as _module

sys.modules[__name__] = _module
