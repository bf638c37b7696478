#!/usr/bin/env bash
# The one script a session with a lent GPU runs (DESIGN.md §8): install the project without
# touching the machine's torch, run the test suite with the Triton kernels compiled for real,
# the benchmarks, and the reports. Every log and result goes under $OUT (the folder that comes
# back); each stage has its own time limit and the whole run stays under TOTAL_S (default 540 s),
# so one slow stage cannot eat the others' time. A failing stage is recorded and the run goes on.
#
#   bash benchmarks/gpu_run.sh                      # everything
#   STAGES="install report" bash benchmarks/gpu_run.sh
#   T_bench=240 TOTAL_S=580 bash benchmarks/gpu_run.sh
#
# Optional wheels (e.g. xformers) go in .whl/ (listed in .git/info/exclude, named in `carry`);
# they are installed with --no-deps into /tmp/site and put on PYTHONPATH.
# Results: $OUT/status.txt (one line per stage: rc and seconds), $OUT/<stage>.log,
# $OUT/bench.json, $OUT/report/, $OUT/ablate/, $OUT/bench-report/ (report.md, results.json, PNGs).

set -u -o pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGES=${STAGES:-"env install tests bench report ablate json"}
TOTAL_S=${TOTAL_S:-540}
STATUS="$OUT/status.txt"
: > "$STATUS"
START=$(date +%s)

export TRITON_INTERPRET=0   # tests/conftest.py sets it to 1 only when unset: run the kernels on the GPU
export PYTHONUNBUFFERED=1
export MPLBACKEND=Agg

# stage NAME DEFAULT_LIMIT_S COMMAND...: run under `timeout` (override the limit with T_<NAME>),
# log to $OUT/NAME.log, record "NAME rc=.. ..s" in status.txt, never abort the script.
stage() {
    local name=$1 default=$2
    shift 2
    case " $STAGES " in
        *" $name "*) ;;
        *) echo "$name skipped (not in STAGES)" >> "$STATUS"; return 0 ;;
    esac
    local var="T_$name"
    local limit=${!var:-$default}
    local left=$(( TOTAL_S - ($(date +%s) - START) ))
    if (( left < 20 )); then
        echo "$name skipped (TOTAL_S=$TOTAL_S spent)" | tee -a "$STATUS"
        return 0
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
    rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s$( (( rc == 124 )) && echo ' (time limit)')" | tee -a "$STATUS"
    return 0
}

environment() {
    nvidia-smi || true
    python - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as exc: print("triton missing:", exc)
try:
    import timm; print("timm", timm.__version__)
except Exception as exc: print("timm missing:", exc)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
EOF
    git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -n 40 || true
}

install() {
    python -m pip install --no-deps --no-build-isolation -e . || return $?
    if compgen -G ".whl/*.whl" > /dev/null; then
        python -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl || return $?
    fi
    python -c "import fastbeit, fastbeit.kernels; print('fastbeit from', fastbeit.__file__)"
}

export -f environment install
stage env 15 bash -c environment
stage install 45 bash -c install
if [[ -d /tmp/site ]]; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
stage tests 100 python -m pytest tests -x -q -p no:cacheprovider
# torch.compile takes a minute per graph: the bench stage leaves timm-compile to the report stage,
# whose rows are saved one by one (a stage cut short by its limit still leaves a report).
stage bench 160 python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/bench.json" -k "not timm-compile"
stage report 100 python -m fastbeit.report --output "$OUT/report"
stage ablate 90 python -m fastbeit.report --ablate --warmup 3 --iters 10 --output "$OUT/ablate"
if [[ -s "$OUT/bench.json" ]]; then
    stage json 15 python -m fastbeit.report --from-json "$OUT/bench.json" --output "$OUT/bench-report"
fi

echo "== done in $(( $(date +%s) - START ))s"
cat "$STATUS"
