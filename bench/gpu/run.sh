#!/usr/bin/env bash
# The whole GPU check in one call on a bare lent machine (x86-64, Python 3.12, no internet; its image has torch 2.11
# + CUDA 13, transformers 5.17, accelerate 1.15):
#   1. install  the project's pinned stack from bench/gpu/wheels (only what the image lacks or has in another
#               version; torch stays the image's), into a target folder put first on PYTHONPATH;
#   2. pytest   python -m pytest -m gpu tests/gpu;
#   3. bench    bench/step_throughput.py --preset olmoe-1b-7b, then --preset qwen3-moe;
#   4. main     examples/sft_gsm8k.py (the offline default) on CUDA with a small --max_steps;
#   5. sweep    bench/step_throughput.py --sweep gpu-scaling (Qwen3-MoE and DeepSeek-V3-like layers) in what is left.
# Every step runs under its own timeout, cut to what is left of HELLORA_GPU_BUDGET_S (default 470 s, inside the
# 8 minutes); a step that fails or times out does not stop the next. Results under $OUT, 6 files:
# summary.json, summary.md (rewritten after every step, so a killed run still returns them), install.log,
# pytest.log, bench.log, main.log.
#
#   device:      bash bench/gpu/run.sh                   (carry ["bench/gpu/wheels"], timeout_s 540)
#   CPU dry run: HELLORA_GPU_DRY_RUN=1 OUT=/tmp/gpu-dry bash bench/gpu/run.sh
#
# The dry run exercises the same orchestration here: the install goes into a throwaway folder with pip's
# --python-version 3.12 / manylinux tags (what the lent machine would get; not imported here), or is skipped with a
# message when no wheels were downloaded (bench/gpu/download_wheels.sh); pytest -m gpu skips with its reason
# without CUDA; the bench runs the tiny presets; the main job runs 2 steps on the CPU.
#
# No value from the environment is pasted into code: every step is an argument array run as is under `timeout`
# (the multi-command steps are functions of this script, re-entered with `run.sh --run-step NAME ARGS...`), so a
# path with quotes or spaces stays one argument. OUT must be a folder (or not exist yet): anything else is refused
# up front.
set -uo pipefail
SKIPPED=75  # exit status of a step that chose not to run

# ------------------------------------------------------------------------------------- multi-command steps
# Each takes its values as arguments; `run.sh --run-step NAME ARGS...` runs one (that is how step() calls them).
install_wheels() {  # PY DRY WHEELS SITE
    local py=$1 dry=$2 wheels=$3 site=$4
    local found=("$wheels"/*.whl)
    if [ ! -f "${found[0]}" ]; then
        echo "No wheels in $wheels: install skipped, the image packages are used as they are" \
             "(download them here with bench/gpu/download_wheels.sh and carry bench/gpu/wheels)."
        return "$SKIPPED"
    fi
    du -sh -- "$wheels"
    ls -- "$wheels"
    local flags=(-q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site")
    if [ "$dry" = 1 ]; then
        # What the lent machine would install, resolved for its Python and platform; not imported here.
        flags+=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    fi
    "$py" -m pip install "${flags[@]}" -- "${found[@]}" || return
    find "$site" -maxdepth 1 -iname '*.dist-info' -printf '%f\n'
}

show_stack() {  # PY STACK_JSON
    "$1" bench/gpu/kit.py stack "$2" || return
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true; } | head -3
}

main_job() {  # PY STEPS EVAL OUTPUT_DIR
    "$1" examples/sft_gsm8k.py --max_steps "$2" --eval_limit "$3" --output_dir "$4" --hellora_plots false || return
    "$1" -c "import torch; print('main job device:', 'cuda' if torch.cuda.is_available() else 'cpu')"
}

cd "$(dirname "$0")/../.." || exit 1
if [ "${1:-}" = --run-step ]; then
    case ${2:-} in
        install_wheels|show_stack|main_job) step_fn=$2; shift 2; "$step_fn" "$@"; exit ;;
        *) echo "run.sh --run-step: unknown step '${2:-}'" >&2; exit 2 ;;
    esac
fi

REPO=$(pwd)
SELF=("bash" "$REPO/bench/gpu/run.sh" --run-step)
DRY=${HELLORA_GPU_DRY_RUN:-0}
OUT=${OUT:-$REPO/outputs/gpu_check}
WHEELS=${HELLORA_WHEELS:-$REPO/bench/gpu/wheels}
BUDGET=${HELLORA_GPU_BUDGET_S:-470}
PY=${PYTHON:-python3}
case $BUDGET in
    ''|*[!0-9]*) echo "run.sh: HELLORA_GPU_BUDGET_S must be a whole number of seconds, got '$BUDGET'." >&2; exit 2 ;;
esac
if [ -e "$OUT" ] && [ ! -d "$OUT" ]; then
    echo "run.sh: OUT=$OUT exists and is not a directory; set OUT to a folder (new or existing) for the results." >&2
    exit 2
fi
if ! mkdir -p -- "$OUT"; then
    echo "run.sh: cannot create OUT=$OUT; set OUT to a writable folder." >&2
    exit 2
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hellora-gpu.XXXXXX") || exit 2
START=$(date +%s)
DEADLINE=$((START + BUDGET))
mkdir -p "$WORK/bench"
[ "$DRY" = 1 ] && touch "$WORK/DRY_RUN"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

summarize() { "$PY" bench/gpu/kit.py summary "$WORK" "$OUT" >/dev/null 2>>"$OUT/install.log" || true; }

# step NAME LIMIT LOG COMMAND ARGS...: the command (an argument array, never re-parsed) under min(LIMIT, time
# left) seconds, output appended to $OUT/LOG.
step() {
    local name=$1 limit=$2 log=$OUT/$3
    shift 3
    local left=$((DEADLINE - $(date +%s) - 5))  # 5 s kept for the last summary
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 15 ]; then
        echo "[$name] not run: ${left}s left of the ${BUDGET}s budget" | tee -a "$log"
        printf '%s\tskipped\t0\t0\t%s\n' "$name" "$limit" >>"$WORK/steps.tsv"
        summarize
        return 0
    fi
    echo "=== [$name] $*   (limit ${limit}s)" | tee -a "$log"
    local t0 rc status
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then status=ok
    elif [ "$rc" -eq "$SKIPPED" ]; then status=skipped
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout
    else status=failed; fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$limit" >>"$WORK/steps.tsv"
    echo "[$name] $status (rc $rc, $(($(date +%s) - t0))s)" | tee -a "$log"
    summarize
}

# ------------------------------------------------------------------------------------------------ 1. install
SITE=$WORK/site
step install 90 install.log "${SELF[@]}" install_wheels "$PY" "$DRY" "$WHEELS" "$SITE"
if [ "$DRY" != 1 ] && [ -d "$SITE" ]; then export PYTHONPATH="$SITE:$PYTHONPATH"; fi
step stack 30 install.log "${SELF[@]}" show_stack "$PY" "$WORK/stack.json"

# ------------------------------------------------------------------------------------------------- 2. pytest
step pytest 120 pytest.log "$PY" -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider "--junitxml=$WORK/pytest.xml"

# -------------------------------------------------------------------------------------------------- 3. bench
if [ "$DRY" = 1 ]; then
    BENCH_ARGS=(--steps 1 --warmup 1 --routers skewed --out "$WORK/bench")
    step bench-olmoe 120 bench.log "$PY" bench/step_throughput.py --preset tiny "${BENCH_ARGS[@]}"
    step bench-qwen3 120 bench.log "$PY" bench/step_throughput.py --preset tiny-qwen3 --autocast on --with-noautocast \
        "${BENCH_ARGS[@]}"
else
    BENCH_ARGS=(--steps 5 --warmup 2 --out "$WORK/bench")
    step bench-olmoe 140 bench.log "$PY" bench/step_throughput.py --preset olmoe-1b-7b --with-noautocast "${BENCH_ARGS[@]}"
    step bench-qwen3 120 bench.log "$PY" bench/step_throughput.py --preset qwen3-moe "${BENCH_ARGS[@]}"
fi

# ----------------------------------------------------------------------------------------------- 4. main job
if [ "$DRY" = 1 ]; then MAIN_STEPS=2; MAIN_EVAL=2; else MAIN_STEPS=10; MAIN_EVAL=8; fi
step main 90 main.log "${SELF[@]}" main_job "$PY" "$MAIN_STEPS" "$MAIN_EVAL" "$WORK/main"

# ------------------------------------------------------------------------- 5. expert-count sweep (what is left)
# Real layer shapes (Qwen3-MoE 128 experts, DeepSeek-V3-like 256): last, so it never starves the main job; on its
# own: python bench/step_throughput.py --sweep gpu-scaling --runs 3 --steps 3 --warmup 1 --out DIR
if [ "$DRY" = 1 ]; then
    step bench-scaling 120 bench.log "$PY" bench/step_throughput.py --sweep tiny-scaling --runs 1 --steps 1 --warmup 1 \
        --out "$WORK/bench"
else
    step bench-scaling 150 bench.log "$PY" bench/step_throughput.py --sweep gpu-scaling --runs 3 --steps 3 --warmup 1 \
        --out "$WORK/bench"
fi

summarize
echo "HELLoRA GPU check done in $(($(date +%s) - START))s; results in $OUT:"
ls -la -- "$OUT"
cat -- "$OUT/summary.md"
rm -rf -- "$WORK"
"$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$OUT/summary.json"
