"""Report figures and numbers: image sizes, hot-expert boxes, Jaccard matrices, per-row profiles and warm-up
stability (the paper's Table 10)."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from hellora_trl import ExpertProfile, profile_experts, select_hot_experts
from hellora_trl.profiling import profile_rows, warmup_indices
from hellora_trl.recipes.reporting import (
    check_same_model,
    jaccard_matrix,
    plot_concentration,
    plot_heatmap,
    plot_jaccard_matrix,
    plot_stability,
    stability_from_profiles,
    subset_profile,
    warmup_stability,
    write_report,
)

from testing_utils import tiny_model
from modulelist_model import DeepseekStyleConfig, DeepseekStyleForCausalLM, LegacyMoEConfig, LegacyMoEForCausalLM


def make_profile(counts, k=2, tokens=None) -> ExpertProfile:
    counts = torch.as_tensor(counts, dtype=torch.int64)
    layers = [f"model.layers.{i}.mlp.experts" for i in range(counts.shape[0])]
    tokens = tokens if tokens is not None else int(counts[0].sum()) // k
    return ExpertProfile(counts=counts, layer_names=layers, num_experts=counts.shape[1], experts_per_token=k,
                         family="olmoe", tokens_seen=tokens)


def random_profile(layers=4, experts=16, seed=0, k=2) -> ExpertProfile:
    generator = torch.Generator().manual_seed(seed)
    return make_profile(torch.randint(0, 1000, (layers, experts), generator=generator), k=k)


def red_pixels(path) -> int:
    """Pure-ish red pixels: the hot-expert boxes (viridis has no red)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)).sum())


def size(path):
    return Image.open(path).size


def random_rows(n=13, seed=0, vocab=500):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (n,), generator=generator)
    return Dataset.from_list([{"input_ids": torch.randint(3, vocab, (int(m),), generator=generator).tolist()} for m in lengths])


# ------------------------------------------------------------------------------------------------ figures
@pytest.mark.parametrize("layers, experts, expected", [(4, 16, (600, 300)), (16, 64, (1402, 710)), (58, 256, (2400, 1800))])
def test_heatmap_size_grows_with_the_model_and_is_capped(tmp_path, layers, experts, expected):
    profile = random_profile(layers, experts)
    path = plot_heatmap(profile, select_hot_experts(profile, 2), tmp_path / "h.png")
    assert size(path) == expected


def test_heatmap_boxes_the_hot_experts(tmp_path):
    profile = random_profile()
    boxed = plot_heatmap(profile, select_hot_experts(profile, 3), tmp_path / "boxed.png")
    plain = plot_heatmap(profile, None, tmp_path / "plain.png")
    assert red_pixels(plain) == 0
    assert red_pixels(boxed) > 4 * 3 * 20  # 12 boxes, each tens of red pixels


def test_jaccard_matrix_values():
    a = make_profile([[9, 8, 1, 0], [0, 1, 8, 9]])
    b = make_profile([[9, 1, 8, 0], [0, 1, 8, 9]])  # layer 0 shares 1 of 3 experts, layer 1 all
    c = make_profile([[0, 0, 8, 9], [9, 8, 0, 0]])  # disjoint everywhere
    matrix = jaccard_matrix({"a": a, "b": b, "c": c}, k=2)
    assert matrix[0][0] == matrix[1][1] == 1.0
    assert matrix[0][1] == matrix[1][0] == pytest.approx((1 / 3 + 1) / 2)
    assert matrix[0][2] == 0.0


def test_check_same_model_names_the_odd_profile():
    with pytest.raises(ValueError, match="'b'.*different models"):
        check_same_model({"a": random_profile(4, 16), "b": random_profile(4, 8)})


def test_other_figures_have_their_sizes(tmp_path):
    profiles = {"a": random_profile(seed=0), "b": random_profile(seed=1)}
    assert size(plot_jaccard_matrix(profiles, 2, tmp_path / "j.png"))[0] >= 450
    assert size(plot_concentration(profiles, 2, tmp_path / "c.png")) == (700, 400)
    many = {str(i): random_profile(seed=i) for i in range(4)}
    assert size(plot_concentration(many, 2, tmp_path / "c4.png")) == (950, 400)  # legend moves outside
    path = plot_stability([0.01, 0.1, 0.5], [0.2, 0.5, 0.9], [0.3, 0.5, 0.6], tmp_path / "s.png", ceiling=0.62)
    assert size(path) == (600, 350)


# ------------------------------------------------------------------------------------------------ per-row profiles
@pytest.mark.parametrize(
    "build",
    [
        lambda: tiny_model("olmoe"),
        lambda: tiny_model("qwen2_moe"),
        lambda: LegacyMoEForCausalLM(LegacyMoEConfig()),
        lambda: DeepseekStyleForCausalLM(DeepseekStyleConfig()),
    ],
    ids=["olmoe", "qwen2_moe", "modulelist", "deepseek_remote"],
)
def test_per_row_counts_add_up_and_match_single_row_profiles(build):
    torch.manual_seed(0)
    model = build()
    rows = random_rows(vocab=min(500, model.config.vocab_size))
    full, per_row = profile_rows(model, rows, batch_size=4, progress=False)
    assert per_row.shape == (len(rows), full.num_layers, full.num_experts)
    assert torch.equal(full.counts, profile_experts(model, rows, batch_size=4, progress=False).counts)
    for i in (0, 5, 12):  # row i alone, without padding around it
        single = profile_experts(model, rows.select([i]), progress=False)
        assert torch.equal(per_row[i].long(), single.counts)


def test_warmup_slices_are_the_trainers():
    from hellora_trl.profiling import warmup_slice as sample_warmup_slice

    ds = Dataset.from_dict({"row": list(range(200))})
    for fraction, seed in [(0.01, 42), (0.1, 3), (0.5, 42)]:
        assert warmup_indices(200, fraction, seed) == sample_warmup_slice(ds, fraction, seed)["row"]


def test_warmup_stability_full_fraction_is_exact_and_subsets_sum():
    model = tiny_model("olmoe")
    rows = random_rows(n=20)
    full, per_row = profile_rows(model, rows, batch_size=8, progress=False)
    table = warmup_stability(full, per_row, [0.1, 0.5, 1.0], k=2, seeds=(0, 1))
    last = table["rows"][-1]
    assert last["jaccard"] == 1.0 and last["coverage"] == pytest.approx(table["ceiling"])
    for row in table["rows"]:
        assert 0.0 <= row["jaccard"] <= 1.0 and 0.0 < row["coverage"] <= table["ceiling"] + 1e-9
        assert row["repeats"] == 2
    idx = warmup_indices(20, 0.5, 0)
    part = subset_profile(full, per_row, idx, {})
    assert torch.equal(part.counts, profile_experts(model, rows.select(idx), progress=False).counts)


def test_stability_from_labelled_profiles():
    reference = make_profile([[9, 8, 1, 0], [0, 1, 8, 9]])
    table = stability_from_profiles(reference, {0.5: reference, 0.1: make_profile([[9, 1, 8, 0], [0, 1, 8, 9]])}, k=2)
    assert [r["fraction"] for r in table["rows"]] == [0.1, 0.5]
    assert table["rows"][0]["jaccard"] == pytest.approx((1 / 3 + 1) / 2)
    assert table["rows"][1]["jaccard"] == 1.0 and table["rows"][1]["coverage"] == pytest.approx(table["ceiling"])


# ------------------------------------------------------------------------------------------------ the report
def test_write_report_files_and_summary(tmp_path):
    a, b = random_profile(seed=0), random_profile(seed=1)
    stored = select_hot_experts(a, 3)
    stability = stability_from_profiles(a, {0.1: b, 1.0: a}, k=2)
    files = write_report({"math": a, "code": b}, tmp_path, k=2, hot_maps={"math": stored}, stability=stability)
    for name in ("heatmap math", "heatmap code", "concentration", "jaccard", "stability"):
        assert files[name].stat().st_size > 1000 and min(size(files[name])) >= 300
    markdown = (tmp_path / "report.md").read_text()
    assert "stored hot map (k=3)" in markdown and "top-2 (layer)" in markdown
    assert "| 10% |" in markdown and "![jaccard](jaccard.png)" in markdown
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["jaccard"][0][1] == pytest.approx(jaccard_matrix({"a": a, "b": b}, 2)[0][1])
    assert summary["stability"]["rows"][1]["jaccard"] == 1.0


def test_write_report_skips_overlap_across_models(tmp_path):
    write_report({"small": random_profile(4, 8), "big": random_profile(4, 16)}, tmp_path, k=2)
    assert not (tmp_path / "jaccard.png").exists()
    assert "different models" in (tmp_path / "report.md").read_text()


def test_report_refuses_a_k_beyond_every_profile_and_an_invalid_stored_hot_map(tmp_path):
    """Review 3.35/3.36: `report --k 100` printed 'top-100' while using 16; a stored hot id 99 was drawn unchecked."""
    profile = random_profile(layers=2, experts=16)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 16\]"):
        write_report({"p": profile}, tmp_path / "r1", k=100)
    bad = {name: [0, 99] for name in profile.layer_names}
    with pytest.raises(ValueError, match=r"hot experts \[0, 99\] must be distinct ids in \[0, 16\)"):
        write_report({"p": profile}, tmp_path / "r2", hot_maps={"p": bad})


def test_run_figures_live_in_the_core_and_stay_importable_from_reporting(tmp_path):
    """Issue 18: the trainer's figures moved down to hellora_trl.plots (no upward import from the core); the
    reporting module keeps re-exporting them. The overhead figure carries its numbers and the stated definition."""
    import hellora_trl.plots as plots
    import hellora_trl.recipes.reporting as reporting

    for name in ("plot_heatmap", "plot_concentration", "plot_overhead", "short_layer_name"):
        assert getattr(reporting, name) is getattr(plots, name)
    path = plots.plot_overhead({"profiling": 1.5, "training": 6.0}, tmp_path / "o.png", note="profiling = x")
    text = Image.open(path).text
    assert json.loads(text["hellora_seconds"]) == {"profiling": 1.5, "training": 6.0}
    assert text["Description"] == "profiling = x"
    assert plots.matplotlib_available()
