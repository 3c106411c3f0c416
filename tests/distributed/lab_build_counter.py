"""Run an example script with every lab-model build recorded in a file (one line per build: the rank).

Used by tests/distributed/test_lab_cache_launch.py under ``accelerate launch``: the test reads the file rather than the
interleaved output of two ranks. Usage: ``lab_build_counter.py <record file> <script> [script args...]``.
"""

from __future__ import annotations

import os
import runpy
import sys

from hellora_trl.recipes.lab import model as lab_model

record, script = sys.argv[1], sys.argv[2]
original = lab_model.pretrain_lab_model


def counted(*args, **kwargs):
    line = f"rank {os.environ.get('RANK', '?')} local {os.environ.get('LOCAL_RANK', '?')} pid {os.getpid()}\n"
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # one write per build: no torn lines
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return original(*args, **kwargs)


lab_model.pretrain_lab_model = counted
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
