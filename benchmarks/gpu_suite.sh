#!/usr/bin/env bash
# The GPU acceptance suite in one device call: install the carried wheels (.whl: pydantic and its three
# companions, torch-fidelity, diffusers), then `pytest -m gpu` with its time, per-test results and durations and a
# JUnit report under $OUT. With pytest-xdist present it runs on WORKERS processes sharing the one GPU (default 6;
# WORKERS=0 runs serially): the tests are tiny, so their time is compiling on the CPU, which parallelises. The
# slow tests start first (tests/conftest.py); the shared trained checkpoint is trained once (its fixture's lock).
#   [WORKERS=N] bash benchmarks/gpu_suite.sh [pytest args...]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
workers=${WORKERS:-6}
parallel=()
if [ "$workers" -gt 0 ] && python3 -c "import xdist" 2>/dev/null; then
  parallel=(-n "$workers" --dist load)
  export TORCHINDUCTOR_COMPILE_THREADS=$(( $(nproc) / workers > 1 ? $(nproc) / workers : 1 ))
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# What code ran: the device copies the working tree's files, but its .git may be an earlier call's (2026-12-05: `git
# log` there named a commit two behind the files), so the files' own digest, to match with the same line run here.
echo "code $(find ddpm_cli tests -name '*.py' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
t0=$(date +%s)
python3 -m pytest -m gpu -v -p no:cacheprovider "${parallel[@]}" --durations=25 --junitxml="$out/gpu-junit.xml" \
  "$@" 2>&1 | tee "$out/gpu-suite.log"
status=${PIPESTATUS[0]}
how=serial; [ ${#parallel[@]} -gt 0 ] && how="$workers workers"
echo "GPU-SUITE exit $status in $(( $(date +%s) - t0 )) s on $(nvidia-smi --query-gpu=name --format=csv,noheader) ($how)"
exit "$status"
