#!/usr/bin/env bash
# The GPU check: run on an air-gapped GPU node that already has PyTorch, torchvision, pytorch-lightning and
# torchmetrics (recent versions, not necessarily the pinned ones) but no network. Nothing is installed from a
# registry: trustcnn runs from this source tree (PYTHONPATH), and the pure-Python packages the node lacks
# (hydra-core, omegaconf, antlr4-python3-runtime, submitit, hydra-submitit-launcher, ...) come from a local
# wheel folder, made beforehand on a machine with a package index by benchmarks/device_wheels.sh.
#
#   bash benchmarks/device_check.sh [WHEEL_DIR]        # default WHEEL_DIR: .whl (or $TRUSTCNN_WHEELS)
#
# Under 5 minutes on one GPU. It runs, each with its own time limit:
#   1. the tests marked `gpu` (pytest -m gpu): CUDA maps and step gradients against the CPU float64
#      reference, 16-mixed / bf16-mixed runs of every loss and both saliency methods, half-precision maps;
#   2. the step-time benchmark on CUDA: CE vs trust + Grad-CAM vs trust + Guided Grad-CAM, float32 and bf16,
#      MobileNetV2 transfer and VGG-16 at batch 32, 224 px (benchmarks/paper_step_time.py), and
#      benchmarks/speed.py --device cuda where it exists;
#   3. a 2-job submitit-local sweep on the GPU(s) present, checking that both jobs ran on a GPU.
# Output: benchmarks/results/device_check_<card>.md (+ the raw logs beside it), also copied to $OUT when
# that is set. Exit code: the number of failed stages (0 = all passed); 2 without a CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=${1:-${TRUSTCNN_WHEELS:-.whl}}
SITE=${TRUSTCNN_SITE:-/tmp/trustcnn-device-site}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "device_check: no CUDA device visible to $PY (torch.cuda.is_available() is False); run it on a GPU node." >&2
    exit 2
fi

# --- missing pure-Python packages, from the wheel folder only (never a registry) ---------------------------
mkdir -p "$SITE"
if [ -d "$WHEELS" ]; then
    # Only the wheels whose distribution this Python lacks: a wheel of something already there (torch,
    # lightning, numpy, ...) would shadow the node's own build.
    TO_INSTALL=$($PY - "$WHEELS" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
    if [ -n "$TO_INSTALL" ]; then
        # shellcheck disable=SC2086
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $TO_INSTALL \
            || { echo "device_check: installing the wheels from $WHEELS failed" >&2; exit 1; }
    fi
else
    echo "device_check: no wheel folder '$WHEELS'; using only what this Python has." >&2
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! $PY -c "import hydra, omegaconf, submitit, hydra_plugins.hydra_submitit_launcher, trustcnn.train" 2>/tmp/device_check_import.err; then
    echo "device_check: a package is still missing ($(tail -1 /tmp/device_check_import.err));" \
         "put its wheel in $WHEELS (benchmarks/device_wheels.sh makes the folder)." >&2
    exit 1
fi

CARD=$($PY -c "import torch; print(torch.cuda.get_device_name(0))")
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
SLUG=$(echo "$CARD" | tr '[:upper:]' '[:lower:]' | sed -E 's/^nvidia //; s/[^a-z0-9]+/_/g; s/^_+|_+$//g')
RESULTS=benchmarks/results/device_check_$SLUG
REPORT=benchmarks/results/device_check_$SLUG.md
mkdir -p "$RESULTS"
FAILED=0
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $RESULTS/NAME.log, count failures
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s"
    [ $rc -eq 0 ] || { FAILED=$((FAILED + 1)); tail -25 "$RESULTS/$name.log"; }
    STATUS[$name]="exit $rc, $((SECONDS - start)) s"
}
declare -A STATUS

# 1. tests marked gpu (the last -m wins over pyproject's -m 'not slow')
stage gpu_tests 150 $PY -m pytest -m gpu -q -p no:cacheprovider tests

# 2. step time on CUDA: float32 and bf16 side by side, both paper models, batch 32, 224 px
stage step_time 100 $PY benchmarks/paper_step_time.py --device cuda --precision 32 bf16 --batch 32 --size 224 \
    --repeats 5 --probe-batch 32 --json "$RESULTS/step_time.json"
if [ -f benchmarks/speed.py ] && $PY benchmarks/speed.py --help 2>/dev/null | grep -q -- "--device"; then
    stage speed 120 $PY benchmarks/speed.py --quick --device cuda --out "$RESULTS/speed.md"
fi

# 3. a 2-job submitit-local sweep on this node's GPU(s)
SWEEP=/tmp/trustcnn_device_sweep_$$
stage sweep 90 $PY -m trustcnn.train -m hydra/launcher=submitit_local seed=1,2 trainer.accelerator=gpu \
    trainer.max_epochs=1 model.pretrain.epochs=3 "hydra.launcher.gpus_per_node=$GPUS" \
    "hydra.sweep.dir=$SWEEP" "paths.cache_dir=$SWEEP/cache"
SWEEP_JOBS=$(ls -d "$SWEEP"/[0-9]* 2>/dev/null | wc -l)
SWEEP_DONE=$(ls "$SWEEP"/[0-9]*/metrics.json 2>/dev/null | wc -l)
SWEEP_ON_GPU=$(grep -l "GPU available: True (cuda), used: True" "$SWEEP"/[0-9]*/train.log 2>/dev/null | wc -l)
if [ "$SWEEP_DONE" -ne 2 ] || [ "$SWEEP_ON_GPU" -lt 2 ]; then
    echo "   sweep: $SWEEP_DONE of 2 jobs finished, $SWEEP_ON_GPU logs say they used the GPU"
    [ "${STATUS[sweep]%%,*}" = "exit 0" ] && FAILED=$((FAILED + 1))
fi

# --- the report ----------------------------------------------------------------------------------------------
{
    echo "# Device check on $CARD"
    echo
    echo "\`bash benchmarks/device_check.sh\`, $(date -u +%Y-%m-%d), $GPUS × $CARD;" \
         "$($PY -c 'import torch, pytorch_lightning as pl, platform; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), pytorch-lightning {pl.__version__}, Python {platform.python_version()}")');" \
         "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
    echo
    echo "| stage | result |"
    echo "|---|---|"
    for name in gpu_tests step_time speed sweep; do
        [ -n "${STATUS[$name]:-}" ] && echo "| $name | ${STATUS[$name]} |"
    done
    echo
    echo "## Tests marked gpu"
    echo
    echo '```'
    tail -3 "$RESULTS/gpu_tests.log"
    echo '```'
    echo
    echo "## Step time on CUDA (benchmarks/paper_step_time.py; peak memory = torch.cuda.max_memory_allocated)"
    grep -E '^\|' "$RESULTS/step_time.log" || echo "(no table: see $RESULTS/step_time.log)"
    if [ -n "${STATUS[speed]:-}" ]; then
        echo
        echo "## benchmarks/speed.py --quick --device cuda"
        echo
        echo '```'
        tail -40 "$RESULTS/speed.log"
        echo '```'
    fi
    echo
    echo "## 2-job submitit-local sweep"
    echo
    echo "$SWEEP_DONE of 2 jobs wrote metrics.json; $SWEEP_ON_GPU job logs report \"GPU available: True (cuda), used: True\"."
    grep -h '"test/acc"' "$SWEEP"/[0-9]*/metrics.json 2>/dev/null | sed 's/^ */    /'
} > "$REPORT"
cp -r "$SWEEP/.submitit" "$RESULTS/sweep_submitit" 2>/dev/null || true
echo "device_check: $FAILED failed stage(s); report: $REPORT"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results"
    cp "$REPORT" "$OUT/" && cp "$RESULTS"/*.log "$RESULTS"/*.json "$OUT/results/" 2>/dev/null
fi
exit $FAILED
