#!/usr/bin/env bash
# The whole GPU check in one command, for a GPU machine lent for minutes:
#   the `gpu`-marked tests, then benchmarks/gpu.py (cuFFT floor, cuCIM, scikit-image, end to end),
#   then the GPU rows of benchmarks/run.py and the GPU columns of benchmarks/scaling.py.
#
#   OUT=folder bash benchmarks/gpu_machine.sh [--quick] [STEP ...]
#
# STEPs: tests, gpu, results, scaling (default: all four, in that order).
#
# Packages the machine lacks (dask, distributed, zarr, cuCIM, dask-cuda...) may wait as wheels in
# .whl/ (they are installed into /tmp/site, without touching the system's). Each step has its own
# time limit and a failing step does not stop the next. OUT receives one log and the JSON of each
# table; the Markdown tables and plots are made from the JSON afterwards (benchmarks/tables.py), so
# that few files travel back.
set -u
OUT=${OUT:-/tmp/microdecon-gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the script moves to the repository's root below
QUICK=
STEPS=
for arg in "$@"; do
    if [ "$arg" = --quick ]; then QUICK=--quick; else STEPS="$STEPS $arg"; fi
done
STEPS=${STEPS:-tests gpu results scaling}
wants() { [[ " $STEPS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/gpu_machine.log
step() {  # step SECONDS NAME COMMAND...: run with a limit, log it, go on whatever happens
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%T))" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s" | tee -a "$LOG"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import cupy, numpy, scipy, skimage; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'scipy', scipy.__version__, 'skimage', skimage.__version__)"
    python3 -c "import dask, distributed, zarr; print('dask', dask.__version__, 'zarr', zarr.__version__)"
    python3 -c "import cucim; print('cucim', cucim.__version__)"
    python3 -c "import dask_cuda; print('dask_cuda', dask_cuda.__version__)"
    nproc
} >>"$LOG" 2>&1
LIMIT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=60)  # a hung test ends, not the run
wants tests && step 150 "gpu tests" python3 -m pytest -m gpu -q -rfEs --tb=short $LIMIT tests
BENCH=$(mktemp -d)  # fresh: a failed step must not pass off an earlier run's JSON as its own
wants gpu && step 120 "benchmarks/gpu.py" python3 benchmarks/gpu.py $QUICK --output "$BENCH"
wants results && step 150 "benchmarks/run.py (GPU rows)" python3 benchmarks/run.py $QUICK --tables results \
    --cases skimage,rl-plain-gpu,rl-accel-gpu,rl-cg-gpu --output "$BENCH"
wants scaling && step 90 "benchmarks/scaling.py (GPU columns)" python3 benchmarks/scaling.py $QUICK --passes 1 \
    --cases cucim,microdecon-plain-gpu,microdecon-accel-gpu --output "$BENCH"
cp "$BENCH"/*.json "$OUT"/ 2>/dev/null
cat "$BENCH"/*.md 2>/dev/null | tee -a "$LOG"
grep "^=== " "$LOG"
