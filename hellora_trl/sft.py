"""Moved to :mod:`hellora_trl.recipes.sft`; this documented path stays importable as the same module object."""

import sys

from .recipes import sft as _module

sys.modules[__name__] = _module
