"""Test environment and fixtures only; shared builders live in ``testing_utils``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# tests/ mirrors the package (tests/recipes, tests/cli, ...); the shared helpers live in tests/fixtures and
# tests/distributed and are imported by their module names (`from testing_utils import tiny_model`).
HELPER_DIRS = [Path(__file__).resolve().parent / name for name in ("fixtures", "distributed")]
for _helpers in HELPER_DIRS:
    if str(_helpers) not in sys.path:
        sys.path.insert(0, str(_helpers))

from testing_utils import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a shared 2-core box oversubscribed threads made one
# training step take seconds instead of milliseconds. Subprocesses (examples) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# The main job fine-tunes the lab model when given no model. Tests (and the example subprocesses they start) use
# the seconds-sized "tiny" lab recipe in a per-session cache, never the multi-minute default or the user's cache.
os.environ.setdefault("HELLORA_LAB_RECIPE", "tiny")
if "HELLORA_LAB_CACHE" not in os.environ:
    import tempfile

    os.environ["HELLORA_LAB_CACHE"] = tempfile.mkdtemp(prefix="hellora-lab-cache-")


@pytest.fixture
def olmoe():
    return tiny_model("olmoe")
