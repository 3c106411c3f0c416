"""The leaf helpers: atomic output with one permission policy, unwrapping, real shapes, markdown tables."""

import os
import stat

import pytest
import torch

from hellora_trl.utils import (
    apply_default_mode,
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


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_safetensors_weights_get_the_one_policy_too(tmp_path, umask_022):
    # safetensors' save_file creates 0600 files: merged checkpoints and exports (atomic_dir) and staged adapters
    # (publish_staged) used to come out owner-only while their json files were 0644
    from safetensors.torch import save_file

    with atomic_dir(tmp_path / "merged", overwrite=False) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "sub").mkdir(mode=0o700)
        save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "x.safetensors"))
    assert mode(tmp_path / "merged" / "model.safetensors") == 0o644
    assert mode(tmp_path / "merged" / "sub") == 0o755 and mode(tmp_path / "merged" / "sub" / "x.safetensors") == 0o644
    staging = tmp_path / "stage"
    staging.mkdir()
    save_file({"w": torch.zeros(2)}, str(staging / "adapter_model.safetensors"))
    publish_staged(staging, tmp_path / "run")
    assert mode(tmp_path / "run" / "adapter_model.safetensors") == 0o644


def test_apply_default_mode_since_leaves_older_files(tmp_path, umask_022):
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_text("o")
    new.write_text("n")
    old.chmod(0o600)
    new.chmod(0o600)
    os.utime(old, (1_000_000, 1_000_000))
    apply_default_mode(tmp_path, since=2_000_000)
    assert mode(old) == 0o600 and mode(new) == 0o644


def test_hellora_save_pretrained_and_model_saves_are_readable(tmp_path, olmoe, umask_022):
    from hellora_trl import apply_hellora, default_lora_config, find_moe_layers
    from hellora_trl.recipes.models import ModelSource, load_tokenizer, save_model_and_tokenizer

    peft_model = apply_hellora(olmoe, {l.name: [0, 1] for l in find_moe_layers(olmoe)}, default_lora_config(r=2))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert mode(tmp_path / "adapter" / "adapter_model.safetensors") == 0o644
    base = peft_model.get_base_model()
    save_model_and_tokenizer(base, load_tokenizer(ModelSource(tiny_family="olmoe")), tmp_path / "model")
    assert {mode(p) for p in (tmp_path / "model").iterdir()} == {0o644}


@pytest.mark.parametrize("killed_at", range(4))
def test_a_killed_publish_never_pairs_a_new_config_with_old_weights(tmp_path, monkeypatch, killed_at):
    # publish_staged renamed adapter_config.json before adapter_model.safetensors: a kill between the two left a
    # new config beside old weights, which loads silently as the wrong adapter
    import hellora_trl.utils as utils

    target, staging = tmp_path / "run", tmp_path / "run" / ".staging"
    staging.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "hellora_profile.json"):
        (target / name).write_text("old")
        (staging / name).write_text("new")
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        if len(calls) == killed_at:
            raise KeyboardInterrupt("killed")
        calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", replace)
    if killed_at < 3:
        with pytest.raises(KeyboardInterrupt):
            publish_staged(staging, target)
    else:
        publish_staged(staging, target)
    config = target / "adapter_config.json"
    if config.exists():
        assert config.read_text() == (target / "adapter_model.safetensors").read_text()
    assert killed_at == 3 or not config.exists()  # (a finished publish has the new config)
    if killed_at == 3:
        assert {p.read_text() for p in target.iterdir() if p.is_file()} == {"new"}


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
