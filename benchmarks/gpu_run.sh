#!/usr/bin/env bash
# The one script a session with a lent GPU runs (DESIGN.md §8). Stages, most valuable first:
#
#   install    carried wheels (.whl/) into /tmp/site, then pip install --no-deps --no-build-isolation
#              -e . into the machine's own Python (its torch untouched); else a copied package on PYTHONPATH
#   env        versions, the GPU, and which Python packages import as the later stages will see them
#              (missing ones are logged; a stage that needs one is skipped with the reason)
#   check      benchmarks/gpu_check.py: compiled kernels vs float64 oracles, the whole step vs the
#              reference model under the same precision
#   report     the whole-step report: fastbeit, timm-compile, fastbeit-compile, timm, reference
#              (same batch, same tokenizer, same run), MFU, compile time, breakdown
#   bench      the kernel and attention pytest-benchmarks to JSON; json: a report from that JSON
#   ablate     the step's optimizations one at a time
#   reproduce  the small-scale reproduction (issue 7), with whatever time is left
#
# Every stage has a time limit (T_<stage> overrides it); the fixed limits, the reproduction's
# minimum and a closing margin add up to TOTAL_S (default 570 s, under the device tool's 600 s),
# and no stage starts past what is left. A failing stage is recorded and the run goes on; a failed
# check is reported, it does not switch later stages to other code paths. A stage whose Python
# packages are missing is skipped with the reason.
#
#   bash benchmarks/gpu_run.sh                               # everything
#   STAGES="env install check report" bash benchmarks/gpu_run.sh
#   PLAN_ONLY=1 bash benchmarks/gpu_run.sh                   # print the stages and limits, run nothing
#
# Results go to $RESULTS (default /tmp/fastbeit-gpu) and are packed after every stage into
# $OUT/results.tgz, beside $OUT/status.txt (one line per stage: rc and seconds) and the results note
# $OUT/summary.md + $OUT/summary.json (benchmarks/gpu_summary.py, rewritten from whatever has come
# back so far): the device tool brings back at most 8 files from $OUT.
# Real images for the reproduction: $REPRO_DATA (default .gpudata/imagenette128, a 128-px copy of
# Imagenette made by benchmarks/shrink_images.py and carried with the call).
#
# Dry run (tests/test_gpu_scripts.py): GPU_RUN_FAKE="check=30 report=999:1" replaces every stage's
# command by a sleep of that many seconds and that exit status (stages not named: 0 s, status 0);
# GPU_RUN_FAKE_MISSING="timm" pretends those packages are missing; TIME_UNIT_MS=10 makes each
# budget second last 10 ms, so the whole 570 s budget plays out in under 6 s.

set -u -o pipefail

cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS=${RESULTS:-/tmp/fastbeit-gpu}
mkdir -p "$RESULTS"
STAGES=${STAGES:-"install env check report bench json ablate reproduce"}
TOTAL_S=${TOTAL_S:-570}
MARGIN_S=${MARGIN_S:-20}      # after the last stage: its kill grace, the last pack and note
KILL_AFTER_S=${KILL_AFTER_S:-10}
UNIT_MS=${TIME_UNIT_MS:-1000}
REPRO_DATA=${REPRO_DATA:-.gpudata/imagenette128}
REPRO_SCALE=${REPRO_SCALE:-gpu}
STATUS="$OUT/status.txt"

# The plan: stage, time limit in seconds ("rest": what is left, at least REPRO_MIN_S), and the
# Python modules it needs. The order is the run order.
REPRO_MIN_S=${REPRO_MIN_S:-30}
PLAN=(
    "install   40   -"
    "env       15   -"
    "check     150  triton"
    "report    180  triton safetensors matplotlib"
    "bench     80   triton pytest pytest_benchmark safetensors"
    "json      10   safetensors matplotlib"
    "ablate    45   triton safetensors matplotlib"
    "reproduce rest triton safetensors matplotlib timm scipy"
)

fixed_total=0
for entry in "${PLAN[@]}"; do
    read -r name limit _ <<< "$entry"
    var="T_$name"
    [[ $limit == rest ]] || fixed_total=$(( fixed_total + ${!var:-$limit} ))
done
if [[ -n ${PLAN_ONLY:-} ]]; then
    for entry in "${PLAN[@]}"; do
        read -r name limit needs <<< "$entry"
        var="T_$name"
        [[ $limit == rest ]] && limit="rest (>= $REPRO_MIN_S)" || limit=${!var:-$limit}
        echo "stage $name limit $limit needs $needs"
    done
    echo "fixed $fixed_total + reproduce >= $REPRO_MIN_S + margin $MARGIN_S = $(( fixed_total + REPRO_MIN_S + MARGIN_S )) of TOTAL_S $TOTAL_S"
    exit 0
fi
if (( fixed_total + REPRO_MIN_S + MARGIN_S > TOTAL_S )); then
    echo "warning: stage limits ($fixed_total s) + reproduction minimum + margin exceed TOTAL_S=$TOTAL_S;" \
        "later stages will be cut" >&2
fi

: > "$STATUS"
rm -f "$RESULTS/modules.txt"
now_ms() { date +%s%3N; }
START_MS=$(now_ms)
elapsed() { echo $(( ($(now_ms) - START_MS) / UNIT_MS )); }       # budget seconds since the start
real_s() { local ms=$(( $1 * UNIT_MS )); printf '%d.%03d' $(( ms / 1000 )) $(( ms % 1000 )); }

export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1
export MPLBACKEND=Agg

# The results note and JSON from whatever is in $RESULTS, then everything packed (checkpoints and
# any file over 4 MiB left out and listed in skipped_files.txt: the tool returns files up to 16 MiB);
# each written to a temporary name first, so an interrupted pack leaves the last one whole.
pack() {
    cp "$STATUS" "$RESULTS/status.txt"
    timeout 20 "$PY" benchmarks/gpu_summary.py "$RESULTS" --out "$OUT" > "$RESULTS/summary.log" 2>&1 ||
        echo "summary failed" >> "$RESULTS/summary.log"
    cp "$OUT/summary.md" "$OUT/summary.json" "$RESULTS/" 2>/dev/null
    (cd "$RESULTS" && find . -type f \( -name '*.pt' -o -name '*.safetensors' -o -size +4M \)) > "$OUT/exclude.txt"
    cp "$OUT/exclude.txt" "$RESULTS/skipped_files.txt"
    tar czf "$OUT/results.tgz.part" -C "$RESULTS" --exclude-from="$OUT/exclude.txt" . 2>/dev/null &&
        mv "$OUT/results.tgz.part" "$OUT/results.tgz"
    rm -f "$OUT/exclude.txt"
}

MISSING=""
missing_for() {  # the modules of "$@" that did not import in the env stage
    local m out=""
    for m in "$@"; do
        [[ $m == - ]] && continue
        case " $MISSING " in *" $m "*) out="$out $m" ;; esac
    done
    echo "${out# }"
}

# stage NAME COMMAND...: run under `timeout` with the plan's limit (capped by what is left), log
# to $RESULTS/NAME.log, record "NAME rc=.. ..s" in status.txt, pack, never abort the script.
stage() {
    local name=$1
    shift
    local entry n limit needs var left lack
    for entry in "${PLAN[@]}"; do
        read -r n limit needs <<< "$entry"
        [[ $n == "$name" ]] && break
    done
    case " $STAGES " in
        *" $name "*) ;;
        *) echo "$name skipped (not in STAGES)" >> "$STATUS"; return 0 ;;
    esac
    # shellcheck disable=SC2086
    lack=$(missing_for $needs)
    if [[ -n $lack ]]; then
        echo "$name skipped (missing Python packages: $lack)" | tee -a "$STATUS"
        pack
        return 0
    fi
    left=$(( TOTAL_S - MARGIN_S - $(elapsed) ))
    var="T_$name"
    if [[ $limit == rest ]]; then
        limit=${!var:-$left}
        if (( left < REPRO_MIN_S )); then
            echo "$name skipped (${left}s left, under its ${REPRO_MIN_S}s minimum)" | tee -a "$STATUS"
            return 0
        fi
    else
        limit=${!var:-$limit}
    fi
    if (( left < 5 )); then
        echo "$name skipped (TOTAL_S=$TOTAL_S spent)" | tee -a "$STATUS"
        return 0
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local t0 rc
    t0=$(elapsed)
    if [[ -n ${GPU_RUN_FAKE+x} ]]; then  # dry run: sleep and exit as told
        local spec="" s
        for s in $GPU_RUN_FAKE; do [[ ${s%%=*} == "$name" ]] && spec=${s#*=}; done
        local secs=${spec%%:*} code=0
        [[ $spec == *:* ]] && code=${spec#*:}
        set -- bash -c "sleep $(real_s "${secs:-0}"); exit $code"
    fi
    timeout --signal=TERM --kill-after="$(real_s "$KILL_AFTER_S")" "$(real_s "$limit")" "$@" 2>&1 |
        tee "$RESULTS/$name.log" | tail -n 40
    rc=$?
    echo "$name rc=$rc $(( $(elapsed) - t0 ))s$( (( rc == 124 || rc == 137 )) && echo ' (time limit)')" |
        tee -a "$STATUS"
    pack
    return 0
}

environment() {
    nvidia-smi || true
    df -h /dev/shm /tmp 2>/dev/null || true   # data workers pass batches through /dev/shm
    "$PY" - "$RESULTS/modules.txt" <<'EOF'
import importlib, os, platform, sys
import torch
print("python", platform.python_version(), sys.executable, "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cpus", os.cpu_count())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
missing = []
for name in ("fastbeit.kernels", "triton", "timm", "safetensors", "scipy", "matplotlib", "pytest", "pytest_benchmark",
             "numpy", "PIL", "torchvision", "tqdm", "setuptools", "nvidia.dali"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", None) or getattr(module, "__file__", "?"))
    except Exception as exc:
        print(name, "MISSING:", exc)
        missing.append(name)
with open(sys.argv[1], "w") as fh:
    fh.write(" ".join(missing) + "\n")
EOF
    git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -n 20 || true
}

install() {
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || return $?
    fi
    # A Python 3.12 venv may lack setuptools, which -e needs: then the copied package below serves.
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e .; then
        echo "pip install -e . failed: the run falls back to a copied package on PYTHONPATH"
        return 3
    fi
    "$PY" -c "import fastbeit, fastbeit.kernels; print('fastbeit from', fastbeit.__file__)"
}

export -f environment install
export PY RESULTS
stage install bash -c install
if [[ -d /tmp/site ]]; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -z ${GPU_RUN_FAKE+x} ]] && ! "$PY" -c "import fastbeit.kernels" 2>/dev/null; then
    # No editable install: a copy laid out as installed (kernels/ as fastbeit/kernels).
    rm -rf /tmp/fastbeit-src && mkdir -p /tmp/fastbeit-src && cp -r fastbeit /tmp/fastbeit-src/ &&
        cp -r kernels /tmp/fastbeit-src/fastbeit/kernels && export PYTHONPATH="/tmp/fastbeit-src${PYTHONPATH:+:$PYTHONPATH}"
    # `python -m` and `-c` put the working directory first on sys.path, where ./fastbeit (no kernels/
    # inside) would shadow the copy: keep it off (Python >= 3.11).
    export PYTHONSAFEPATH=1
    echo "install fallback: PYTHONPATH=$PYTHONPATH PYTHONSAFEPATH=1" | tee -a "$STATUS"
    "$PY" -c "import fastbeit.kernels" || echo "install fallback FAILED: fastbeit.kernels still does not import" |
        tee -a "$STATUS"
fi

stage env bash -c environment
if [[ -n ${GPU_RUN_FAKE+x} ]]; then
    MISSING=${GPU_RUN_FAKE_MISSING:-}
elif [[ -s "$RESULTS/modules.txt" ]]; then
    MISSING=$(cat "$RESULTS/modules.txt")
fi
[[ -n ${MISSING// /} ]] && echo "missing Python packages: $MISSING" | tee -a "$STATUS"

stage check "$PY" benchmarks/gpu_check.py --json "$RESULTS/check.json"
if grep -q "^check rc=[1-9]" "$STATUS"; then
    echo "check failed: reported in check.json; later stages still run the default paths" | tee -a "$STATUS"
fi

stage report "$PY" -m fastbeit.report --contenders fastbeit,timm-compile,fastbeit-compile,timm,reference \
    --output "$RESULTS/report"
stage bench "$PY" -m pytest benchmarks/test_bench_kernels.py benchmarks/test_bench_attention.py \
    --benchmark-only -q -p no:cacheprovider --benchmark-json "$RESULTS/bench.json"
if [[ -s "$RESULTS/bench.json" || -n ${GPU_RUN_FAKE+x} ]]; then
    stage json "$PY" -m fastbeit.report --from-json "$RESULTS/bench.json" --output "$RESULTS/bench-report"
else
    echo "json skipped (no bench.json)" | tee -a "$STATUS"
fi
stage ablate "$PY" -m fastbeit.report --ablate --warmup 3 --iters 10 --no-profile --output "$RESULTS/ablate" \
    --ablations base,attn-sdpa,attn-eager,kernels-reference,tokenizer-fp32,plain-adamw,exact-masks,host-sync

if [[ -d "$REPRO_DATA/train" || -n ${GPU_RUN_FAKE+x} ]]; then
    # BEiT and the from-scratch baseline first, then pixel regression (the paper's largest ablation gap):
    # a run cut short still answers the main questions, and finished variants are kept in results.json.
    stage reproduce "$PY" -m fastbeit.experiments.reproduce --data "$REPRO_DATA" --scale "$REPRO_SCALE" \
        --variants 1,5,3,2,4 --output "$RESULTS/reproduce"
else
    echo "reproduce skipped ($REPRO_DATA/train not found)" | tee -a "$STATUS"
fi

echo "== done in $(elapsed)s (budget TOTAL_S=$TOTAL_S)" | tee -a "$STATUS"
pack
cat "$STATUS"
