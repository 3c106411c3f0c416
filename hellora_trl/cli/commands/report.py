"""``hellora report``: profiles (and optionally a model + data) -> heatmaps, concentration, Jaccard and warm-up
stability PNGs + report.md / report.json."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...constants import RUN_MARKER_FILE, STRATEGIES
from ..arguments import CLIError, DataArguments, ModelArguments, parse_command, require
from ..loading import data_source, device_of, prepared_rows, source_of

DESCRIPTION = ("Figures and a markdown summary from routing profiles: activation heatmaps with hot experts boxed, "
               "top-k concentration, task-vs-task hot-set Jaccard, and warm-up-fraction stability (paper Table 10).")


@dataclass
class ReportArguments:
    profiles: list[str] = field(
        default_factory=list,
        metadata={"help": "Profile JSONs, each optionally labelled: gsm8k=runs/math/hellora_profile.json."},
    )
    output_dir: str = field(default="hellora_report", metadata={"help": "Where the PNGs and report.md go."})
    k: int | None = field(default=None, metadata={"help": "Hot experts per layer (default: the family default)."})
    strategy: str = field(default="layer", metadata={"help": "Selection for boxes when a profile stores no hot map.",
                                                    "choices": list(STRATEGIES)})
    stability_fractions: list[float] = field(
        default_factory=list,
        metadata={"help": "With a model and data: profile the full data once and compare warm-up slices of these "
                  "fractions against it (paper: 0.01 0.05 0.1 0.2 0.5)."},
    )
    stability_seeds: int = field(default=1, metadata={"help": "Slices per fraction (seeds seed..seed+n-1), averaged."})
    stability_profiles: list[str] = field(
        default_factory=list,
        metadata={"help": "Or: separately taken profiles labelled with their fraction, 0.05=p5.json (or read from "
                  "the profile's source), compared against --reference_profile."},
    )
    reference_profile: str | None = field(default=None, metadata={"help": "Full-data profile for --stability_profiles."})


def labelled(spec: str) -> tuple[str | None, str]:
    """'label=path' -> (label, path); a bare path -> (None, path). Paths containing '=' need a label."""
    label, sep, path = spec.partition("=")
    return (label, path) if sep and label and not Path(spec).exists() else (None, spec)


def load_profiles(specs: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict]]:
    """Labelled profiles, plus the hot map stored in each file (by `hellora select` or the trainer), if any."""
    from ...selection import load_plan

    profiles, hot_maps = {}, {}
    for spec in specs:
        label, path = labelled(spec)
        profile, stored, _ = load_plan(path)
        marker = Path(path).parent / RUN_MARKER_FILE
        if marker.is_file():  # as load_hellora (eval / export / merge) warns about the same folder
            warnings.warn(
                f"{Path(path).parent} holds {RUN_MARKER_FILE}: a training run started writing there and did not "
                f"finish (interrupted?); {Path(path).name} and its hot map may be the unfinished run's, not those "
                "of the adapter saved there.",
                stacklevel=2,
            )
        if label is None:
            task = profile.source.get("task")
            label = f"{task} ({Path(path).stem})" if task else Path(path).stem
        while label in profiles:
            label += "'"
        profiles[label] = profile
        if stored:
            hot_maps[label] = stored
    return profiles, hot_maps


def fraction_of(spec: str) -> tuple[float, Any]:
    """A warm-up profile and its fraction: the label, else the fraction its source records."""
    from ...profile import ExpertProfile

    label, path = labelled(spec)
    profile = ExpertProfile.load(path)
    value = label or profile.source.get("fraction") or profile.source.get("warmup_fraction")
    if value is None:
        raise CLIError(f"{path}: no warm-up fraction; label it as 0.05={path}.")
    try:
        return float(value), profile
    except ValueError:
        raise CLIError(f"{spec}: the label must be the warm-up fraction (e.g. 0.05={path}).") from None


def stability(args: ReportArguments, model_args: ModelArguments, data_args: DataArguments, profiles: dict) -> dict | None:
    """Table 10 from one full-data pass of a model (added to the report as 'full data'), or from labelled profiles."""
    from ...profile import ExpertProfile
    from ...profiling import profile_rows
    from ...recipes.reporting import stability_from_profiles, warmup_stability

    if args.stability_profiles:
        reference = ExpertProfile.load(require(args.reference_profile, "--reference_profile",
                                               "the full-data profile the warm-up profiles are compared with"))
        return stability_from_profiles(reference, dict(fraction_of(s) for s in args.stability_profiles), args.k)
    if not model_args.given():
        if args.stability_fractions:
            raise CLIError("--stability_fractions needs a model and data to profile (--tiny or --model_name_or_path).")
        return None
    from ...recipes.models import load_model, load_tokenizer

    source = source_of(model_args)
    rows = prepared_rows(data_args, load_tokenizer(source))
    model = load_model(source, device=device_of(model_args))
    for label, profile in profiles.items():
        try:
            profile.check_matches(model)
        except ValueError as err:
            raise CLIError(f"Profile {label!r}: {err}") from None
    full, per_row = profile_rows(model, rows, batch_size=data_args.batch_size, progress=not data_args.disable_tqdm,
                                 source=data_source(data_args, model_args, len(rows)))
    full.save(Path(args.output_dir) / "full_profile.json")
    profiles["full data"] = full
    if not args.stability_fractions:
        return None
    seeds = [data_args.seed + i for i in range(max(args.stability_seeds, 1))]
    return warmup_stability(full, per_row, args.stability_fractions, args.k, seeds)


def run(argv: Sequence[str]) -> int:
    from ...recipes.reporting import write_report

    args, model_args, data_args = parse_command("report", (ReportArguments, ModelArguments, DataArguments), argv,
                                                DESCRIPTION)
    if not (args.profiles or model_args.given() or args.stability_profiles):
        raise CLIError("Nothing to report: pass --profiles, --stability_profiles, or a model (--tiny / "
                       "--model_name_or_path) with data.")
    profiles, hot_maps = load_profiles(args.profiles)
    table10 = stability(args, model_args, data_args, profiles)
    files = write_report(profiles, args.output_dir, k=args.k, strategy=args.strategy, hot_maps=hot_maps,
                         stability=table10)
    print("Wrote " + ", ".join(str(p) for p in files.values()))
    return 0
