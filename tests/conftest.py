"""Test environment and fixtures only; shared builders live in ``testing_utils``."""

from __future__ import annotations

import os

import pytest
import torch

from testing_utils import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a shared 2-core box oversubscribed threads made one
# training step take seconds instead of milliseconds. Subprocesses (examples) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def olmoe():
    return tiny_model("olmoe")
