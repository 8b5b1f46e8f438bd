#!/usr/bin/env bash
# The GPU acceptance suite in one device call: install the carried wheels (.whl: pydantic and its three
# companions, torch-fidelity), then `pytest -m gpu` with its time, per-test durations and a JUnit report under $OUT.
#   bash benchmarks/gpu_suite.sh [pytest args...]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
t0=$(date +%s)
python3 -m pytest -m gpu -q -p no:cacheprovider --durations=25 --junitxml="$out/gpu-junit.xml" "$@" 2>&1 \
  | tee "$out/gpu-suite.log"
status=${PIPESTATUS[0]}
echo "GPU-SUITE exit $status in $(( $(date +%s) - t0 )) s on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
exit "$status"
