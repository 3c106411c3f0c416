"""The leaf helpers: atomic output with one permission policy, unwrapping, real shapes, markdown tables."""

import os
import stat

import pytest
import torch

from hellora_trl.utils import (
    atomic_dir,
    atomic_write,
    atomic_write_text,
    clean_param_name,
    default_mode,
    full_shape,
    has_zero3_params,
    is_zero3_param,
    load_causal_lm,
    markdown_table,
    publish_staged,
    unwrap_layer,
    unwrap_model,
)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_folders_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        text = atomic_write_text(tmp_path / "a" / "p.json", "{}")
        binary = atomic_write(tmp_path / "m.bin", lambda tmp: open(tmp, "wb").write(b"x"))
        with atomic_dir(tmp_path / "out", overwrite=False) as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert mode(text) == mode(binary) == 0o644 and mode(tmp_path / "out") == 0o755
    assert default_mode() == 0o666 & ~old and default_mode(directory=True) == 0o777 & ~old
    assert text.read_text() == "{}" and binary.read_bytes() == b"x" and (tmp_path / "out" / "f").read_text() == "y"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = atomic_write_text(tmp_path / "p.json", "old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    with pytest.raises(TypeError, match="needs a str"):
        atomic_write_text(target, 123)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_atomic_dir_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("1")
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_dir(tmp_path / "out", overwrite=False):
            pass
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new"]
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a directory"):
        with atomic_dir(tmp_path / "file", overwrite=True):
            pass


def test_publish_staged_moves_entries_and_replaces_folders(tmp_path):
    staging, target = tmp_path / "stage", tmp_path / "target"
    (staging / "d").mkdir(parents=True)
    (staging / "d" / "new").write_text("n")
    (staging / "f").write_text("f")
    (target / "d").mkdir(parents=True)
    (target / "d" / "stale").write_text("s")
    publish_staged(staging, target)
    assert not staging.exists() and (target / "f").read_text() == "f"
    assert [p.name for p in (target / "d").iterdir()] == ["new"]


def test_unwrapping_and_names(olmoe):
    from hellora_trl import apply_hellora, default_lora_config, find_moe_layers

    hot = {layer.name: [0] for layer in find_moe_layers(olmoe)}
    peft_model = apply_hellora(olmoe, hot, default_lora_config(r=2, lora_alpha=4))

    class Wrapper(torch.nn.Module):  # DDP-style: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap_model(Wrapper(peft_model)) is olmoe
    experts = olmoe.get_submodule(next(iter(hot)))
    assert unwrap_layer(experts) is experts.get_base_layer() and unwrap_layer(olmoe) is olmoe
    assert clean_param_name("module._orig_mod.model.layers.0.x") == "model.layers.0.x"


def test_shapes_of_plain_and_zero3_parameters():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    assert full_shape(p) == (3, 4) and not is_zero3_param(p)
    p.data, p.ds_shape, p.ds_id = torch.empty(0), (3, 4), 0  # what zero.Init leaves
    assert full_shape(p) == (3, 4) and is_zero3_param(p)
    module = torch.nn.Linear(2, 2)
    assert not has_zero3_params(module)
    module.weight.ds_id = 1
    assert has_zero3_params(module)


def test_markdown_table_formats_and_escapes():
    lines = markdown_table(["a", "b"], [[1.23456, None], ["x|y", "two\nlines"]], empty="–", float_format="{:.2f}")
    assert lines == ["| a | b |", "|---|---|", "| 1.23 | – |", "| x\\|y | two lines |"]


def test_load_causal_lm_keeps_the_saved_dtype(tmp_path, olmoe):
    olmoe.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    loaded = load_causal_lm(tmp_path / "m")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert next(load_causal_lm(tmp_path / "m", dtype=torch.float32).parameters()).dtype == torch.float32
